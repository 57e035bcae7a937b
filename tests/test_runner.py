"""Runner: resume after real SIGKILLs, worker processes, limits, refinement, refusals."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from flipguard.campaign.planner import PlanConfig, make_plan
from flipguard.campaign.runner import (
    chunks_of,
    first_faults,
    open_campaign,
    probe_rate,
    refine,
    run_campaign,
)
from flipguard.campaign.stats import leveugle_n
from flipguard.campaign.store import CampaignStore, StoreError
from flipguard.study.engines import RunEngineFactory

SRC = Path(__file__).resolve().parents[1] / "src"
PLAN = PlanConfig(strata="layer", error=0.2, confidence=0.9, seed=3)


def make_tiny_run(root: Path, seed: int = 0, threshold: float | None = None) -> Path:
    """An untrained 16 px CAE run on a synthetic dataset (8 test images)."""
    from flipguard.data import load_mvtec, make_synthetic
    from flipguard.detect import ScoreConfig, Scorer
    from flipguard.models import CAEConfig, build_cae
    from flipguard.study.rundir import (
        DataSection,
        ModelSection,
        RunConfig,
        ThresholdSection,
        save_run,
    )

    data = root / "data"
    if not data.exists():
        make_synthetic(data, n_train=2, n_test=8, size=16, seed=0)
    cfg = CAEConfig(input_size=16, channels=1, width=0.125, latent_dim=4, seed=seed)
    net = build_cae(cfg).eval()
    score = ScoreConfig(map="l2", smooth_sigma=0, reduce="max")
    if threshold is None:
        ds = load_mvtec(data, size=16)
        with torch.no_grad():
            threshold = float(np.median(Scorer(score).scores(ds.test, net(ds.test)).numpy()))
    rc = RunConfig(data=DataSection(path=str(data), size=16, channels=1),
                   model=ModelSection(kind="cae", params=cfg.model_dump()),
                   score=score.model_dump(), threshold=ThresholdSection(value=threshold))
    return save_run(root / f"run{seed}", rc, net)


def outcomes(path: Path) -> dict[int, str]:
    con = sqlite3.connect(str(path))
    try:
        return dict(con.execute("SELECT fault_id, outcome FROM results"))
    finally:
        con.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny run and the outcomes of an uninterrupted in-process campaign on it."""
    torch.set_num_threads(1)  # module-scoped: runs before the autouse one-thread fixture
    root = tmp_path_factory.mktemp("campaign")
    run = make_tiny_run(root)
    factory = RunEngineFactory(str(run))
    ref = root / "reference.sqlite"
    with open_campaign(run, PLAN, factory, path=ref) as store:
        summary = run_campaign(store, factory, chunk=8)
        assert summary["ran"] == summary["planned"] == store.counts()["done"]
    return run, ref, outcomes(ref)


def test_uninterrupted_run_matches_plan(reference):
    run, ref, rows = reference
    with CampaignStore(ref) as store:
        plan = make_plan(RunEngineFactory(str(run)).model(), PLAN)
        assert store.planned() == plan.faults()
        assert sorted(rows) == [pf.fault_id for pf in plan.faults()]
        assert store.get_meta("golden")["n_images"] == 8


def test_sigkill_at_random_points_resumes_exactly(reference, tmp_path):
    run, _, expected = reference
    work = tmp_path / "killed.sqlite"
    script = (
        "import sys, time, torch; torch.set_num_threads(1)\n"
        "import flipguard.campaign.runner as R\n"
        "from flipguard.campaign.runner import open_campaign, run_campaign\n"
        "_run = R.execute_chunk\n"  # a wide window for the kill, whatever the machine's load
        "R.execute_chunk = lambda e, c: (time.sleep(0.03), _run(e, c))[1]\n"
        "from flipguard.study.engines import RunEngineFactory\n"
        "from flipguard.campaign.planner import PlanConfig\n"
        "f = RunEngineFactory(sys.argv[1]); cfg = PlanConfig(**eval(sys.argv[3]))\n"
        "s = open_campaign(sys.argv[1], cfg, f, path=sys.argv[2])\n"
        "run_campaign(s, f, chunk=4)\n"
    )
    cfg = repr({"strata": "layer", "error": 0.2, "confidence": 0.9, "seed": 3})
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    rng = np.random.default_rng(0)
    for attempt in range(3):  # three SIGKILLs at random points
        proc = subprocess.Popen([sys.executable, "-c", script, str(run), str(work), cfg],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start, wait_s = time.monotonic(), rng.uniform(0.3, 2.5)
        target = (len(outcomes(work)) if work.exists() else 0) + int(rng.integers(1, 40))
        while proc.poll() is None and time.monotonic() - start < 120:
            if attempt == 0 and time.monotonic() - start > wait_s:
                break  # at a random time, possibly before the store exists
            if attempt > 0 and work.exists() and len(outcomes(work)) >= target:
                break  # at a random number of committed results
            time.sleep(0.005)
        assert proc.poll() is None, "the campaign ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert len(outcomes(work) if work.exists() else {}) < len(expected)
    proc = subprocess.run([sys.executable, "-c", script, str(run), str(work), cfg], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = outcomes(work)
    assert got == expected  # nothing lost, nothing run twice, identical outcomes


def test_workers_match_single_process(reference, tmp_path):
    run, _, expected = reference
    factory = RunEngineFactory(str(run))
    with open_campaign(run, PLAN, factory, path=tmp_path / "w.sqlite") as store:
        res = run_campaign(store, factory, workers=2, chunk=16)
        assert res["ran"] == len(expected)
    assert outcomes(tmp_path / "w.sqlite") == expected


def test_limit_probe_and_chunks(reference, tmp_path):
    run, _, expected = reference
    factory = RunEngineFactory(str(run))
    store = open_campaign(run, PLAN, factory, path=tmp_path / "l.sqlite")
    engine = factory()
    ids = [pf.fault_id for pf in store.planned()]
    per = probe_rate(store, engine, 3)  # first, middle and last pending fault
    probed = {ids[0], ids[round((len(ids) - 1) / 2)], ids[-1]}
    assert per is not None and per > 0 and set(outcomes(store.path)) == probed
    seen = []
    pending = store.pending()
    res = run_campaign(store, factory, engine=engine, limit=10,
                       progress=lambda d, t: seen.append((d, t)))
    assert res["ran"] == 10 and store.counts()["done"] == 13
    assert seen[0] == (3, len(expected)) and seen[-1] == (13, len(expected))
    seed = store.definition["plan"]["seed"]
    first = [pf.fault_id for pf in first_faults(pending, 10, seed)]
    layers = {pf.fault.layer for pf in pending}
    per = Counter(pf.fault.layer for pf in pending if pf.fault_id in first)
    counts = [per.get(layer, 0) for layer in layers]
    assert sum(counts) == 10 and max(counts) - min(counts) <= 1  # every layer advances
    for layer in layers:  # each layer's share is the head of its permuted order
        mine = [pf.fault_id for c in chunks_of(pending, 10**6, seed) for pf in c
                if pf.fault.layer == layer]
        assert set(mine[:per[layer]]) == {i for i in first if i in mine}
    assert set(outcomes(store.path)) == probed | set(first)
    assert outcomes(store.path) == {k: expected[k] for k in probed | set(first)}
    run_campaign(store, factory, engine=engine)
    assert outcomes(store.path) == expected
    assert run_campaign(store, factory, engine=engine)["ran"] == 0
    planned = store.planned()
    chunks = chunks_of(planned, 8, seed=3)
    assert all(len({pf.fault.layer for pf in c}) == 1 for c in chunks)
    assert sorted(pf.fault_id for c in chunks for pf in c) == sorted(expected)
    layers = list(dict.fromkeys(pf.fault.layer for pf in planned))
    # round-robin: the first chunks visit every layer before any layer's second chunk
    assert [c[0].fault.layer for c in chunks[:len(layers)]] == layers
    order = [pf.fault_id for c in chunks for pf in c if pf.fault.layer == layers[0]]
    assert order != sorted(order)  # a permutation within the layer, not id order
    assert chunks_of(planned, 8, seed=3) == chunks  # deterministic
    assert chunks_of(planned, 8, seed=4) != chunks
    # resuming keeps the relative order of the remaining faults
    rest = [pf for pf in planned if pf.fault_id not in set(order[:5])]
    again = [pf.fault_id for c in chunks_of(rest, 8, seed=3) for pf in c
             if pf.fault.layer == layers[0]]
    assert again == order[5:]
    store.close()


def test_refusals_and_fresh(reference, tmp_path):
    run, ref, _ = reference
    factory = RunEngineFactory(str(run))
    path = tmp_path / "r.sqlite"
    open_campaign(run, PLAN, factory, path=path).close()
    other_plan = PlanConfig(strata="layer", error=0.25, confidence=0.9)
    with pytest.raises(StoreError, match="different plan") as exc:
        open_campaign(run, other_plan, factory, path=path)
    assert "\n" not in str(exc.value)
    with open_campaign(run, other_plan, factory, path=path, fresh=True) as store:
        assert store.definition["plan"]["error"] == 0.25
    other = make_tiny_run(run.parent, seed=1)
    with pytest.raises(StoreError, match="another model"):
        open_campaign(other, other_plan, RunEngineFactory(str(other)), path=path)
    moved = make_tiny_run(tmp_path, seed=0, threshold=0.123)
    with pytest.raises(StoreError, match="another threshold"):
        open_campaign(moved, PLAN, RunEngineFactory(str(moved)), path=ref)


def test_refine_tops_up_with_new_faults(reference, tmp_path):
    run, _, _ = reference
    factory = RunEngineFactory(str(run))
    cfg = PlanConfig(strata="layer", error=0.2, confidence=0.9, p="data-aware", seed=1)
    with open_campaign(run, cfg, factory, path=tmp_path / "f.sqlite") as store:
        run_campaign(store, factory)
        before = {s.key: s.n for s in store.strata()}
        done_before = set(outcomes(store.path))
        added = refine(store, factory.model(), "any-flip")
        strata = {s.key: s for s in store.strata()}
        observed: dict[str, list[int]] = {}
        from flipguard.campaign.analysis import classify_store

        for pf, cls in classify_store(store, "any-flip"):
            observed.setdefault(pf.stratum, []).append(cls in ("sdc-critical", "non-finite"))
        for key, s in strata.items():
            p_hat = min(max(np.mean(observed[key]), 0.01), 0.99)
            assert s.n == max(before[key], leveugle_n(s.N, 0.2, 0.9, p_hat))
        assert added == sum(s.n for s in strata.values()) - sum(before.values()) > 0
        new = store.pending()
        assert len(new) == added and all(pf.round == 1 for pf in new)
        keys = [(pf.stratum, pf.k) for pf in store.planned()]
        assert len(set(keys)) == len(keys)  # without replacement across rounds
        run_campaign(store, factory)
        assert set(outcomes(store.path)) > done_before
