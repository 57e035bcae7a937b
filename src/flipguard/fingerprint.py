"""Content fingerprints (sha256) of tensors, arrays and state dicts: what a campaign store,
an RA store or a cache was computed from, so a changed model or dataset is never mixed in.

>>> import torch
>>> tensor_fingerprint(torch.zeros(2)) == tensor_fingerprint(torch.zeros(2, dtype=torch.float32))
True
>>> tensor_fingerprint(torch.zeros(2)) == tensor_fingerprint(torch.zeros(3))
False
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["state_fingerprint", "tensor_fingerprint"]


def _update(h: Any, a: Any) -> None:
    t = a.detach().cpu().contiguous() if isinstance(a, torch.Tensor) else torch.as_tensor(
        np.ascontiguousarray(a))
    h.update(f"{t.dtype}:{tuple(t.shape)};".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def tensor_fingerprint(*arrays: Any) -> str:
    """sha256 over tensors/arrays (dtype, shape, bytes), independent of device."""
    h = hashlib.sha256()
    for a in arrays:
        _update(h, a)
    return h.hexdigest()


def state_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a state dict (names, dtypes, shapes and raw bytes), independent of device.

    >>> net = torch.nn.Linear(2, 1)
    >>> state_fingerprint(net.state_dict()) == state_fingerprint(net.state_dict())
    True
    """
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
