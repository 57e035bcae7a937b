"""Small shared file helpers: atomic writes (never half-written) and JSON-safe values."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def replacing(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temp file beside ``path`` (ordinary permissions, 0666 & ~umask); on success it
    replaces ``path`` atomically, on any error it is removed and ``path`` is left untouched.

    Example::

        with replacing("RUN/model.pt") as tmp:
            torch.save(state, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(path, suffix)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.",
                                suffix=suffix)
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        os.close(fd)
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_orphans(path: str | Path, suffix: str = "") -> list[Path]:
    """Remove temp files that :func:`replacing` left beside ``path`` when its process was
    killed (``.<name>.<pid>.<random><suffix>`` whose pid no longer runs); returns them.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / ".x.json.999999999.abc").write_text("half")
    >>> [p.name for p in remove_orphans(d / "x.json")]
    ['.x.json.999999999.abc']
    """
    path = Path(path)
    gone: list[Path] = []
    try:
        candidates = list(path.parent.glob(f".{path.name}.*{suffix}"))
    except OSError:
        return gone
    for p in candidates:
        pid = p.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            try:
                p.unlink()
                gone.append(p)
            except OSError:
                pass
    return gone


def atomic_write(path: str | Path, data: bytes | memoryview | str) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`replacing`), fsync'ed.

    Example::

        atomic_write("RUN/metrics.json", '{"f1": 0.9}\\n')
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    with replacing(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def save_torch(obj: Any, path: str | Path) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically (see :func:`atomic_write`).

    The archive is serialised to memory first, so its inner folder is always ``archive/`` and
    not the temp file's name: equal content gives byte-identical files (a model trained twice
    with the same seed has one sha256).

    Example::

        save_torch(model.state_dict(), "RUN/model.pt")
    """
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, buf.getbuffer())
    return Path(path)


def json_clean(obj: Any) -> Any:
    """Recursively replace NaN floats by None so the object serialises as strict JSON."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_clean(v) for v in obj]
    return obj
