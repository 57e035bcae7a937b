"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MAGNETIC_TILE = ROOT.parent / "shared" / "datasets" / "magnetic_tile"


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests run in parallel workers: keep torch to one thread each."""
    torch.set_num_threads(1)
    yield


@pytest.fixture
def magnetic_tile() -> Path:
    """Path to the real Magnetic-Tile dataset; skips the test when it is absent."""
    if not (MAGNETIC_TILE / "train" / "good").is_dir():
        pytest.skip(f"dataset not found at {MAGNETIC_TILE}")
    return MAGNETIC_TILE
