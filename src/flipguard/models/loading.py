"""Load any PyTorch model from a ``"pkg.module:factory"`` spec plus optional weights."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flipguard.errors import FlipguardError

__all__ = ["ModelLoadError", "is_builtin_spec", "load_model"]

_SPEC = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_FILE_SPEC = re.compile(r"^.+\.py:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


class ModelLoadError(FlipguardError, ValueError):
    """A model spec or weight file cannot be used (one line naming it)."""


def _line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def is_builtin_spec(spec: str) -> bool:
    """True for factories of flipguard itself (safe to import from a received run).

    >>> is_builtin_spec("flipguard.models.cae:build_cae"), is_builtin_spec("os:system")
    (True, False)
    """
    return isinstance(spec, str) and spec.split(":", 1)[0].split(".", 1)[0] == "flipguard" \
        and not spec.split(":", 1)[0].endswith(".py")


def _file_module(spec: str, path: Path) -> Any:
    if not path.is_file():
        raise ModelLoadError(f"model spec {spec!r}: file {path} not found")
    name = "flipguard_user_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ModelLoadError(f"model spec {spec!r}: {path} is not a Python module")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise ModelLoadError(f"model spec {spec!r}: importing {path} failed "
                             f"({_line(exc)})") from exc
    return module


def _import_factory(spec: str) -> Any:
    if isinstance(spec, str) and _FILE_SPEC.match(spec):
        path_text, attr_path = spec.rsplit(":", 1)
        return _attribute(spec, _file_module(spec, Path(path_text)), path_text, attr_path)
    if not isinstance(spec, str) or not _SPEC.match(spec):
        raise ModelLoadError(f"model spec {spec!r}: expected 'package.module:factory' or "
                             f"'path/to/file.py:factory'")
    mod_name, attr_path = spec.split(":")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        if exc.name and (mod_name == exc.name or mod_name.startswith(exc.name + ".")):
            raise ModelLoadError(f"model spec {spec!r}: module {mod_name!r} not found "
                                 f"(is it on PYTHONPATH?)") from exc
        raise ModelLoadError(f"model spec {spec!r}: importing {mod_name!r} failed "
                             f"({_line(exc)})") from exc
    except Exception as exc:
        raise ModelLoadError(f"model spec {spec!r}: importing {mod_name!r} failed "
                             f"({_line(exc)})") from exc
    return _attribute(spec, obj, mod_name, attr_path)


def _attribute(spec: str, obj: Any, mod_name: str, attr_path: str) -> Any:
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ModelLoadError(f"model spec {spec!r}: {mod_name!r} has no attribute "
                                 f"{attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelLoadError(f"model spec {spec!r}: {attr_path!r} is not callable")
    return obj


def _read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    if not path.is_file():
        raise ModelLoadError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file  # type: ignore[import-not-found]
        except ImportError as exc:
            raise ModelLoadError(f"{path}: reading .safetensors needs the 'safetensors' "
                                 f"package (pip install safetensors) or a .pt state dict") from exc
        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise ModelLoadError(f"{path}: cannot read safetensors file ({_line(exc)})") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot read weights with torch.load(weights_only=True) "
                             f"({_line(exc)})") from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise ModelLoadError(f"{path}: expected a state dict (mapping of names to tensors), "
                             f"got {type(obj).__name__}")
    return obj


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:3])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > 3 else "")


def _check_keys(path: Path, model: nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}"
              for k, v in want.items() if k in sd and sd[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing keys {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_names(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch {_names(shapes)}")
    if problems:
        raise ModelLoadError(f"{path}: weights do not match the model: " + "; ".join(problems))


def load_model(spec: str, weights: str | Path | None = None, **kwargs: Any) -> nn.Module:
    """Import ``module``, call ``factory(**kwargs)``, optionally load a state dict, ``eval()``.

    ``spec`` is ``"package.module:factory"`` or ``"path/to/file.py:factory"`` (the factory
    may be a dotted attribute such as ``Class.create``). It imports and runs that code: only
    pass specs you trust (see :func:`is_builtin_spec`). ``weights`` is a ``torch.save``-d
    state dict (read with ``weights_only=True``; a ``{"state_dict": ...}`` wrapper is
    accepted) or, when the
    ``safetensors`` package is installed, a ``.safetensors`` file. Keys and shapes must match
    exactly. Every failure raises :class:`ModelLoadError` with one line.

    Example:
        >>> m = load_model("flipguard.models.cae:build_cae")
        >>> m.training
        False
    """
    factory = _import_factory(spec)
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise ModelLoadError(f"model spec {spec!r}: calling the factory failed "
                             f"({_line(exc)})") from exc
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"model spec {spec!r}: factory returned "
                             f"{type(model).__name__}, expected a torch.nn.Module")
    if weights is not None:
        path = Path(weights)
        sd = _read_state_dict(path)
        _check_keys(path, model, sd)
        model.load_state_dict(sd, strict=True)
    return model.eval()
