"""What the search sees: training and validation data built from training data only.

Detection (:func:`detection_data`): the normal ``train/good`` images are split (seeded) into
*train*, *calibration* (normal images, and a defective copy of each, whose scores set the
threshold) and *validation* (the other held-out normal images plus a defective copy of
each); defects are pasted by :func:`flipguard.data.defects.paste_defects` with exact masks
(other seeds for the calibration copies). Classification
(:func:`classification_data`): a seeded split of the labelled training inputs. Neither
takes the test split as an argument, so no objective can read a test label.

>>> import torch
>>> d = detection_data(torch.rand(40, 1, 16, 16), val_fraction=0.3)
>>> d.train.shape[0], d.calib.shape[0], d.val.shape[0], int(d.val_labels.sum())
(28, 6, 12, 6)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flipguard.data import split_validation
from flipguard.data.defects import paste_defects
from flipguard.errors import ConfigError
from flipguard.fileio import save_torch
from flipguard.fingerprint import tensor_fingerprint

__all__ = ["SearchData", "classification_data", "detection_data", "load_bundle", "save_bundle"]


@dataclass
class SearchData:
    """Tensors of one search. Detection: ``train``, ``calib`` (normal), ``val`` with
    ``val_labels`` (1 = pasted defect) and ``val_masks``; classification: ``train`` with
    ``train_labels``, ``val`` with ``val_labels``. ``info``: sizes and split settings."""

    task: str
    train: Tensor
    val: Tensor
    val_labels: np.ndarray
    calib: Tensor | None = None
    calib_bad: Tensor | None = None
    val_masks: Tensor | None = None
    train_labels: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.train.shape[1:])

    def fingerprint(self) -> str:
        parts: list[Any] = [self.train, self.val, self.val_labels]
        parts += [t for t in (self.calib, self.calib_bad, self.val_masks, self.train_labels)
                  if t is not None]
        return tensor_fingerprint(*parts)[:16]


def detection_data(train_images: Tensor, val_fraction: float = 0.2, split_seed: int = 0,
                   defect_seed: int = 0, strength: float = 2.0) -> SearchData:
    """Split normal images into train / calibration / validation and paste a defect onto a
    copy of every validation image (module docstring). The held-out part
    (``round(n * val_fraction)``, at least 8 images) is halved: the first half (in a seeded
    order) calibrates, the second is validated."""

    n = int(train_images.shape[0])
    if n < 12:
        raise ConfigError(f"--data: train/good has {n} images; the search needs at least 12")
    frac = max(float(val_fraction), 8.5 / n)
    tr_idx, held = split_validation(n, val_fraction=frac, seed=split_seed)
    held = np.random.default_rng([split_seed, 1]).permutation(held)
    half = held.size // 2
    cal_idx, val_idx = np.sort(held[:half]), np.sort(held[half:])
    x = train_images.float()
    normal = x[torch.as_tensor(val_idx)]
    bad, masks, kinds = paste_defects(normal, seed=defect_seed, strength=strength)
    calib = x[torch.as_tensor(cal_idx)].contiguous()
    calib_bad = paste_defects(calib, seed=defect_seed + 1, strength=strength)[0]
    val = torch.cat([normal, bad])
    labels = np.r_[np.zeros(len(val_idx), np.int64), np.ones(len(val_idx), np.int64)]
    vmasks = torch.cat([torch.zeros_like(masks), masks])
    info = {"n_train": int(tr_idx.size), "n_calib": int(cal_idx.size),
            "n_val_normal": int(val_idx.size), "n_val_defective": int(val_idx.size),
            "val_fraction": frac, "split_seed": split_seed, "defect_seed": defect_seed,
            "defect_strength": strength, "defect_kinds": sorted(set(kinds))}
    return SearchData("detection", x[torch.as_tensor(tr_idx)].contiguous(), val.contiguous(),
                      labels, calib=calib, calib_bad=calib_bad.contiguous(),
                      val_masks=vmasks.contiguous(), info=info)


def classification_data(inputs: Tensor, labels: Tensor, val_fraction: float = 0.2,
                        split_seed: int = 0) -> SearchData:
    """Seeded train / validation split of labelled training inputs."""

    if labels.dim() != 1 or labels.shape[0] != inputs.shape[0] or labels.is_floating_point():
        raise ConfigError(f"--data: expected one integer label per input, got labels of shape "
                          f"{tuple(labels.shape)} for {inputs.shape[0]} inputs")
    tr_idx, val_idx = split_validation(int(inputs.shape[0]), val_fraction, seed=split_seed)
    ti, vi = torch.as_tensor(tr_idx), torch.as_tensor(val_idx)
    info = {"n_train": int(tr_idx.size), "n_val": int(val_idx.size),
            "val_fraction": val_fraction, "split_seed": split_seed}
    return SearchData("classification", inputs[ti].float().contiguous(),
                      inputs[vi].float().contiguous(), labels[vi].numpy().astype(np.int64),
                      train_labels=labels[ti].long().contiguous(), info=info)


_TENSORS = ("train", "val", "calib", "calib_bad", "val_masks", "train_labels")


def save_bundle(data: SearchData, path: str | Path) -> None:
    """Write ``data`` to one ``.pt`` file (atomic) for worker processes."""

    blob: dict[str, Any] = {k: getattr(data, k) for k in _TENSORS if getattr(data, k) is not None}
    blob["val_labels"] = torch.as_tensor(data.val_labels)
    blob["task"], blob["info"] = data.task, dict(data.info)
    save_torch(blob, path)


def load_bundle(path: str | Path) -> SearchData:
    """Read a bundle written by :func:`save_bundle`."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    kw = {k: blob.get(k) for k in _TENSORS}
    return SearchData(blob["task"], val_labels=blob["val_labels"].numpy(), info=blob["info"],
                      **kw)
