"""Golden activation cache: per-node values for every input image, in memory while they fit
the byte budget, otherwise memory-mapped on disk (numpy memmap in ``cache_dir`` or a
temporary directory removed with the cache).

>>> import torch
>>> c = GoldenCache(n_rows=4, budget_bytes=1 << 20, device="cpu")
>>> c.write("x", 0, torch.arange(8.0).reshape(2, 4)); c.write("x", 2, torch.ones(2, 4))
>>> c.read("x", 1, 3).tolist(), c.in_memory("x")
([[4.0, 5.0, 6.0, 7.0], [1.0, 1.0, 1.0, 1.0]], True)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import shutil
import sys
import tempfile
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["GoldenCache", "heap_reuse"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_AFTER_MMAP, _AFTER_TRIM = 32 << 20, 64 << 20  # where glibc's dynamic thresholds end up
_HEAP_DEPTH = [0]


def _glibc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - raises AttributeError unless glibc
        return libc
    except (OSError, AttributeError):
        return None


@contextmanager
def heap_reuse(enabled: bool = True) -> Iterator[None]:
    """Inside the block, glibc malloc keeps freed memory for reuse instead of mapping every
    large activation tensor afresh (each fresh mapping costs one page fault per 4 KiB, about
    a third of a CPU forward pass of the CAE); afterwards the thresholds are set to the
    values glibc's own dynamic adjustment reaches (32 MiB mmap, 64 MiB trim) and free memory
    is returned to the OS. No-op on other C libraries or when disabled.

    >>> with heap_reuse():
    ...     pass
    """
    libc = _glibc() if enabled else None
    if libc is None or _HEAP_DEPTH[0]:  # unsupported, disabled, or already inside one
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    _HEAP_DEPTH[0] += 1
    try:
        yield
    finally:
        _HEAP_DEPTH[0] -= 1
        libc.mallopt(_M_TRIM_THRESHOLD, _AFTER_TRIM)
        libc.mallopt(_M_MMAP_THRESHOLD, _AFTER_MMAP)
        libc.malloc_trim(0)


def _np_dtype(dtype: torch.dtype) -> Any:
    return torch.empty(0, dtype=dtype).numpy().dtype


class GoldenCache:
    """Rows ``0..n_rows-1`` of named tensors. Entries are placed on first write: in memory
    (on ``device``) while the total stays within ``budget_bytes`` (or when ``pinned``),
    otherwise in a ``.npy`` memmap under ``cache_dir`` (default: a private temp dir)."""

    def __init__(self, n_rows: int, budget_bytes: int, device: str | torch.device,
                 cache_dir: str | Path | None = None) -> None:
        self.n_rows, self.budget, self.device = int(n_rows), int(budget_bytes), device
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._mem: dict[Any, Tensor] = {}
        self._disk: dict[Any, np.memmap] = {}
        self._dtype: dict[Any, torch.dtype] = {}
        self.mem_bytes = self.disk_bytes = 0
        self._tmp: str | None = None
        self._files: list[Path] = []
        self._finalizer = weakref.finalize(self, GoldenCache._cleanup, self._files, None)

    @staticmethod
    def _cleanup(files: list[Path], tmp: str | None) -> None:
        for f in files:
            f.unlink(missing_ok=True)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    def __contains__(self, key: Any) -> bool:
        return key in self._mem or key in self._disk

    def in_memory(self, key: Any) -> bool:
        """True when ``key`` is held in memory (fast to compare against)."""
        return key in self._mem

    def nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        """Bytes ``n_rows`` rows of this per-row shape take."""
        return self.n_rows * int(np.prod(shape, dtype=np.int64)) * torch.empty(
            0, dtype=dtype).element_size()

    def _allocate(self, key: Any, row: Tensor, pinned: bool) -> None:
        shape, size = tuple(row.shape[1:]), self.nbytes(tuple(row.shape[1:]), row.dtype)
        self._dtype[key] = row.dtype
        if pinned or self.mem_bytes + size <= self.budget:
            self._mem[key] = torch.empty((self.n_rows, *shape), dtype=row.dtype,
                                         device=self.device)
            self.mem_bytes += size
            return
        if self._tmp is None and self.cache_dir is None:
            self._tmp = tempfile.mkdtemp(prefix="flipguard-cache-")
            self._finalizer.detach()
            self._finalizer = weakref.finalize(self, GoldenCache._cleanup, self._files, self._tmp)
        root = self.cache_dir if self.cache_dir is not None else Path(self._tmp or ".")
        root.mkdir(parents=True, exist_ok=True)
        path = root / f"golden-{len(self._files):04d}-{id(self):x}.npy"
        self._files.append(path)
        self._disk[key] = np.lib.format.open_memmap(
            path, mode="w+", dtype=_np_dtype(row.dtype), shape=(self.n_rows, *shape))
        self.disk_bytes += size

    def write(self, key: Any, start: int, rows: Tensor, pinned: bool = False) -> None:
        """Store ``rows`` at rows ``start..start+len(rows)-1`` (allocates on first write)."""
        if key not in self:
            self._allocate(key, rows, pinned)
        stop = start + rows.shape[0]
        if key in self._mem:
            self._mem[key][start:stop] = rows
        else:
            self._disk[key][start:stop] = rows.detach().cpu().numpy()

    def read(self, key: Any, start: int, stop: int) -> Tensor:
        """Rows ``start..stop-1`` on the device (a view for in-memory entries)."""
        if key in self._mem:
            return self._mem[key][start:stop]
        arr = np.ascontiguousarray(self._disk[key][start:stop])
        return torch.from_numpy(arr).to(self.device)

    def gather(self, key: Any, rows: np.ndarray | Tensor) -> Tensor:
        """Rows at the given indices, on the device."""
        if key in self._mem:
            t = self._mem[key]
            idx = torch.as_tensor(rows, dtype=torch.int64, device=t.device)
            return t.index_select(0, idx)
        idx_np = np.asarray(rows.cpu() if isinstance(rows, Tensor) else rows, dtype=np.int64)
        return torch.from_numpy(np.ascontiguousarray(self._disk[key][idx_np])).to(self.device)

    def drop(self) -> None:
        """Free memory and delete the disk files now."""
        self._mem.clear()
        self._disk.clear()
        self._finalizer()
