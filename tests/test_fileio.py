"""Atomic torch files: equal content gives equal bytes, a failed save leaves nothing behind."""

from __future__ import annotations

import hashlib
import pickle

import pytest
import torch

from flipguard.fileio import save_torch
from flipguard.models.cae import CAEConfig, build_cae
from flipguard.study.rundir import DataSection, ModelSection, RunConfig, save_run


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_equal_content_saved_twice_has_one_sha256(tmp_path):
    state = {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(3, dtype=torch.float16)}
    a = save_torch(state, tmp_path / "a" / "model.pt")
    b = save_torch({k: v.clone() for k, v in state.items()}, tmp_path / "other.pt")
    assert _sha(a) == _sha(b)
    back = torch.load(b, weights_only=True)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    assert _sha(save_torch({"w": state["w"] + 1}, tmp_path / "c.pt")) != _sha(a)


def test_a_failed_save_keeps_the_old_file_and_no_temp_file(tmp_path):
    path = save_torch({"x": torch.zeros(2)}, tmp_path / "m.pt")
    before = path.read_bytes()
    with pytest.raises((AttributeError, pickle.PicklingError)):
        save_torch({"f": lambda: 0}, path)  # a lambda does not pickle
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_the_same_model_saved_as_two_runs_has_identical_weights_files(tmp_path):
    cae = CAEConfig(input_size=16, width=0.125, latent_dim=4)
    cfg = RunConfig(data=DataSection(path=str(tmp_path), size=16, channels=1),
                    model=ModelSection(kind="cae", params=cae.model_dump()))
    runs = [save_run(tmp_path / name, cfg, build_cae(cae).eval())
            for name in ("run_a", "second_run")]
    assert _sha(runs[0] / "model.pt") == _sha(runs[1] / "model.pt")
