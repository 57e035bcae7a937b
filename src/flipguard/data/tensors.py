"""Inputs and labels from one tensor file, for models that are not MVTec-style detectors.

Accepted files (nothing in them is executed):

* ``.pt`` / ``.pth``: ``torch.save`` of a dict ``{"inputs": Tensor, "labels": Tensor}``
  (or a 2-tuple ``(inputs, labels)``), read with ``torch.load(weights_only=True)``;
* ``.npz``: arrays ``inputs`` and ``labels`` (``x``/``y`` also accepted);
* ``.safetensors`` (with the ``safetensors`` package): tensors ``inputs`` and ``labels``.

``inputs``: floating point (N, ...); ``labels``: integers (N,) — class ids for a classifier,
0 = normal / 1 = anomalous for a detector; optional for a tolerance task. An optional
``normal`` tensor holds normal inputs to calibrate a detector's threshold on.

>>> import tempfile, pathlib, numpy as np
>>> f = pathlib.Path(tempfile.mkdtemp()) / "d.npz"
>>> np.savez(f, inputs=np.zeros((4, 3), np.float32), labels=np.arange(4))
>>> ds = load_tensor_dataset(f)
>>> tuple(ds.inputs.shape), ds.labels.tolist()
((4, 3), [0, 1, 2, 3])
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flipguard.data.mvtec import DatasetError, MVTecDataset
from flipguard.fingerprint import tensor_fingerprint

__all__ = ["TensorDataset", "load_tensor_dataset", "TENSOR_SUFFIXES"]

TENSOR_SUFFIXES = (".pt", ".pth", ".npz", ".safetensors")
_ALIASES = {"inputs": ("inputs", "x"), "labels": ("labels", "y"), "normal": ("normal",)}


@dataclass
class TensorDataset:
    """Evaluation inputs (N, ...), integer labels (N,) or None, optional normal inputs."""

    path: Path
    inputs: torch.Tensor
    labels: np.ndarray | None
    normal: torch.Tensor | None = None

    def fingerprint(self) -> str:
        """sha256 of inputs, labels and normal inputs."""
        parts: list[Any] = [self.inputs]
        parts += [self.labels] if self.labels is not None else []
        parts += [self.normal] if self.normal is not None else []
        return tensor_fingerprint(*parts)

    def split(self) -> MVTecDataset:
        """The same data in the shape of an MVTec dataset: ``test`` = inputs with their labels
        (zeros when absent; label 0 is ``good``), ``train`` = the normal inputs (else the
        inputs), no masks.

        >>> ds = TensorDataset(Path("d.pt"), torch.zeros(3, 1, 4, 4), np.array([0, 1, 1]))
        >>> s = ds.split(); tuple(s.test.shape), s.test_types
        ((3, 1, 4, 4), ['good', 'label 1', 'label 1'])
        """
        x = self.inputs
        labels = self.labels if self.labels is not None else \
            np.zeros(x.shape[0], dtype=np.int64)
        types = ["good" if v == 0 else f"label {int(v)}" for v in labels]
        return MVTecDataset(root=self.path, size=int(x.shape[-1]) if x.dim() > 1 else 0,
                            channels=int(x.shape[1]) if x.dim() > 2 else 1,
                            train=self.normal if self.normal is not None else x, test=x,
                            test_labels=labels, test_types=types, test_masks=None)


def _read(path: Path) -> Mapping[str, Any]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        if suffix == ".safetensors":
            try:
                from safetensors.torch import load_file
            except ImportError:
                raise DatasetError(f"{path}: reading .safetensors needs the 'safetensors' "
                                   f"package") from None
            return load_file(str(path), device="cpu")
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except DatasetError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one line
        msg = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise DatasetError(f"{path}: cannot read tensors ({msg})") from None
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        return {"inputs": obj[0], "labels": obj[1]}
    if not isinstance(obj, Mapping):
        raise DatasetError(f"{path}: expected a dict with 'inputs' and 'labels', got "
                           f"{type(obj).__name__}")
    return obj


def _get(data: Mapping[str, Any], key: str) -> Any:
    for name in _ALIASES[key]:
        if name in data:
            return data[name]
    return None


def _floats(path: Path, key: str, value: Any) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
    if not t.is_floating_point() or t.dim() < 1 or t.shape[0] < 1:
        raise DatasetError(f"{path}: '{key}' must be a floating-point tensor (N, ...) with "
                           f"N >= 1, got dtype {t.dtype} shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise DatasetError(f"{path}: '{key}' holds non-finite values (NaN/Inf)")
    return t.float().contiguous()


def load_tensor_dataset(path: str | Path, need_labels: bool = True) -> TensorDataset:
    """Read and validate a tensor file (see module docstring); one-line
    :class:`~flipguard.data.DatasetError` naming the file and key on bad input."""
    path = Path(path)
    if path.suffix.lower() not in TENSOR_SUFFIXES:
        raise DatasetError(f"{path}: expected a {', '.join(TENSOR_SUFFIXES)} tensor file")
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    data = _read(path)
    raw = _get(data, "inputs")
    if raw is None:
        raise DatasetError(f"{path}: missing 'inputs' (found: {', '.join(map(str, data)) or '-'})")
    inputs = _floats(path, "inputs", raw)
    labels = None
    lab = _get(data, "labels")
    if lab is None and need_labels:
        raise DatasetError(f"{path}: missing 'labels'")
    if lab is not None:
        arr = np.asarray(lab.numpy() if isinstance(lab, torch.Tensor) else lab)
        if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
            raise DatasetError(f"{path}: 'labels' must be 1-D integers, got dtype {arr.dtype} "
                               f"shape {arr.shape}")
        if arr.shape[0] != inputs.shape[0]:
            raise DatasetError(f"{path}: 'labels' has {arr.shape[0]} entries for "
                               f"{inputs.shape[0]} inputs")
        labels = arr.astype(np.int64)
    normal = _get(data, "normal")
    return TensorDataset(path, inputs, labels,
                         None if normal is None else _floats(path, "normal", normal))
