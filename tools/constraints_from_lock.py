"""Write constraints.txt (``name==version`` per package) from pylock.toml, so pip-style tools
and a plain ``pip install -c constraints.txt`` get the exact versions the lock holds.

    python tools/constraints_from_lock.py [--check]
"""

from __future__ import annotations

import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"  # installed first from its CPU wheel (Makefile TORCH), not in the lock


def constraints(lock: Path = ROOT / "pylock.toml") -> str:
    """The constraints text for ``lock``."""
    pkgs = tomllib.loads(lock.read_text(encoding="utf-8"))["packages"]
    lines = sorted({f"{p['name']}=={p['version']}" for p in pkgs} | {TORCH}, key=str.lower)
    return ("# exact versions of pylock.toml (written by `make lock`; "
            "tools/constraints_from_lock.py)\n" + "\n".join(lines) + "\n")


def main() -> int:
    out = ROOT / "constraints.txt"
    text = constraints()
    if "--check" in sys.argv[1:]:
        if not out.exists() or out.read_text(encoding="utf-8") != text:
            print("constraints.txt: out of date with pylock.toml; run `make lock`")
            return 1
        return 0
    out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
