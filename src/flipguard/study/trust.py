"""Which code a run directory may make flipguard import.

A run whose model is a user factory (``model.factory = "pkg.mod:fn"``) names code that
opening it would import and call. A received run directory must never do that on its own:
only flipguard's own factories load freely. A factory is also trusted when

* the user passes ``trust_code=True`` (CLI ``--trust-code``) — the consent is then recorded
  in the run (``RUN/trust.json``) so later verbs on it need no flag; or
* ``RUN/trust.json`` holds a valid HMAC of the factory spec and parameters made with this
  user's secret key (``$FLIPGUARD_HOME/trust.key``, default ``~/.config/flipguard``, created
  0600 on first use): ``flipguard init`` signs the runs it makes, so a user's own runs work
  without flags while a copied or received one (other key, edited spec) is refused.

>>> import tempfile, os, pathlib
>>> os.environ["FLIPGUARD_HOME"] = tempfile.mkdtemp()
>>> run = pathlib.Path(tempfile.mkdtemp())
>>> trusted(run, "mypkg.nets:resnet20", {"classes": 10})
False
>>> sign(run, "mypkg.nets:resnet20", {"classes": 10})
>>> trusted(run, "mypkg.nets:resnet20", {"classes": 10}), trusted(run, "os:system", {})
(True, False)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Any

from flipguard.fileio import atomic_write

__all__ = ["TRUST_FILE", "key_path", "sign", "trusted"]

TRUST_FILE = "trust.json"


def key_path() -> Path:
    """This user's trust key: ``$FLIPGUARD_HOME/trust.key`` (default ``~/.config/flipguard``)."""
    home = os.environ.get("FLIPGUARD_HOME") or Path.home() / ".config" / "flipguard"
    return Path(home) / "trust.key"


def _key(create: bool) -> bytes | None:
    path = key_path()
    try:
        return bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):
        if not create:
            return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
    except FileExistsError:
        pass
    except OSError:
        return None
    try:
        return bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _mac(key: bytes, spec: str, params: dict[str, Any]) -> str:
    msg = json.dumps({"factory": spec, "params": params}, sort_keys=True, default=str)
    return hmac.new(key, msg.encode(), hashlib.sha256).hexdigest()


def sign(run: str | Path, spec: str, params: dict[str, Any]) -> None:
    """Record this user's consent to import ``spec`` for ``run`` (best effort: nothing is
    written where the key or the run directory is not writable)."""
    key = _key(create=True)
    if key is None:
        return
    try:
        atomic_write(Path(run) / TRUST_FILE, json.dumps(
            {"factory": spec, "hmac": _mac(key, spec, params)}, indent=1) + "\n")
    except OSError:
        pass


def trusted(run: str | Path, spec: str, params: dict[str, Any]) -> bool:
    """True when ``RUN/trust.json`` vouches for ``spec`` with ``params`` under this user's key."""
    key = _key(create=False)
    if key is None:
        return False
    try:
        rec = json.loads((Path(run) / TRUST_FILE).read_text())
        return isinstance(rec, dict) and rec.get("factory") == spec and hmac.compare_digest(
            str(rec.get("hmac", "")), _mac(key, spec, params))
    except (OSError, ValueError):
        return False
