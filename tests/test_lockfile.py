"""The lock files at the root agree: constraints.txt pins exactly what pylock.toml locks."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tomllib")  # Python >= 3.11, the version the lock is resolved for

ROOT = Path(__file__).resolve().parents[1]


def test_constraints_match_the_lock():
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "constraints_from_lock.py"),
                          "--check"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line)
    assert {"numpy", "scipy", "torch"} <= set(pins)
