"""Datasets: MVTec-layout reader, validation split and synthetic surface-defect generator.

>>> from flipguard.data import load_mvtec, split_validation
>>> ds = load_mvtec("data/magnetic_tile", size=64)   # doctest: +SKIP
>>> tr_idx, val_idx = split_validation(len(ds.train), val_fraction=0.1, seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

from flipguard.data.mvtec import (
    IMAGE_EXTENSIONS,
    DatasetError,
    MVTecDataset,
    load_mvtec,
    split_folds,
    split_validation,
)
from flipguard.data.synth import DEFECT_TYPES, make_synthetic

__all__ = [
    "DEFECT_TYPES",
    "IMAGE_EXTENSIONS",
    "DatasetError",
    "MVTecDataset",
    "load_mvtec",
    "make_synthetic",
    "split_folds",
    "split_validation",
]
