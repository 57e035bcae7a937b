"""Ray backend: a local 2-CPU cluster gives exactly the single-process outcomes."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
import torch

from flipguard.campaign.planner import PlanConfig
from flipguard.campaign.ray_backend import ray_chunks
from flipguard.campaign.runner import open_campaign, run_campaign
from flipguard.errors import ConfigError
from flipguard.study.engines import RunEngineFactory

ray = pytest.importorskip("ray", reason="the [ray] extra is not installed")

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _rows(path: Path) -> dict[int, str]:
    con = sqlite3.connect(str(path))
    try:
        return dict(con.execute("SELECT fault_id, outcome FROM results"))
    finally:
        con.close()


def test_local_cluster_equals_single_process(tmp_path, monkeypatch):
    from test_runner import make_tiny_run

    torch.set_num_threads(1)
    # Ray workers inherit the driver's environment: make flipguard importable there.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (SRC, os.environ.get("PYTHONPATH")) if p))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run = make_tiny_run(tmp_path)
    factory = RunEngineFactory(str(run), images=6)
    cfg = PlanConfig(strata="layer,field", error=0.3, confidence=0.9, seed=5,
                     layers=("encoder.0", "encoder.8", "decoder.16"))
    with open_campaign(run, cfg, factory, path=tmp_path / "single.sqlite") as store:
        run_campaign(store, factory, chunk=8)
    with open_campaign(run, cfg, factory, path=tmp_path / "ray.sqlite") as store:
        seen = []
        res = run_campaign(store, factory, ray="local", workers=2, chunk=8,
                           progress=lambda d, t: seen.append(d))
        assert res["ran"] == res["planned"] == store.counts()["done"]
        assert seen == sorted(seen) and seen[-1] == res["planned"]
    single = _rows(tmp_path / "single.sqlite")
    assert len(single) == res["planned"] > 0
    assert _rows(tmp_path / "ray.sqlite") == single
    assert not ray.is_initialized()  # the private cluster was shut down



def test_no_chunks_and_bad_address_need_no_cluster():
    assert list(ray_chunks(lambda: None, [], address="local")) == []
    with pytest.raises(ConfigError, match="--ray"):
        list(ray_chunks(lambda: None, [[object()]], address=""))
    assert not ray.is_initialized()
