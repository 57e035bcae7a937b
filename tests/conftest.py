"""Shared fixtures."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MAGNETIC_TILE = ROOT.parent / "shared" / "datasets" / "magnetic_tile"


def pytest_configure(config: pytest.Config) -> None:
    """Tests run in parallel workers on small machines: one torch thread per worker. The
    trust key of the runs tests make lives in a temporary home, not the user's."""
    torch.set_num_threads(1)
    os.environ["FLIPGUARD_HOME"] = tempfile.mkdtemp(prefix="flipguard-home-")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


@pytest.fixture
def magnetic_tile() -> Path:
    """Path to the real Magnetic-Tile dataset; skips the test when it is absent."""
    if not (MAGNETIC_TILE / "train" / "good").is_dir():
        pytest.skip(f"dataset not found at {MAGNETIC_TILE}")
    return MAGNETIC_TILE
