"""Class groups of stratified plans and the run's persistent predictor calibration: merged
predicted classes are sampled as one sub-stratum, chosen from calibrated rates, and the
estimate still covers the exact CFR."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from flipguard.campaign.grouping import (
    choose_groups,
    group_label,
    group_map,
    groups_text,
    parse_groups,
    partitions,
)
from flipguard.campaign.planner import PlanConfig
from flipguard.campaign.substrata import Cell, allocate, draw, estimate, plan_rates
from flipguard.errors import ConfigError

CRIT = "accuracy-drop:0.01"


def test_groups_text_round_trips_and_bad_groups_are_one_line():
    parts = partitions(5)
    assert len({groups_text(g) for g in parts}) == 16
    for g in parts:
        assert parse_groups(groups_text(g)) == g
        assert sorted(set(group_map(g).tolist())) == [x[0] for x in g]
    for bad in ("0-2,4", "0-2,2-4", "2-0,3,4", "0-5", "a,b", "", "0-1,3,2,4"):
        with pytest.raises(ConfigError, match="class-groups") as e:
            parse_groups(bad)
        assert "\n" not in str(e.value)
    assert group_label(3, parse_groups("0-2,3-4")) == "critical+extreme"
    with pytest.raises(ConfigError, match="stratified"):
        PlanConfig(class_groups="0-2,3,4")
    # ungrouped plans keep their digests: the field is absent from their definition
    assert "class_groups" not in PlanConfig(sampling="stratified").to_dict()


def test_choose_groups_merges_equal_rates_keeps_different_ones_and_predicts_allocate():
    sizes = [{0: 500_000, 1: 250_000, 2: 150_000, 3: 60_000, 4: 40_000},
             {0: 20_000, 1: 5_000, 2: 3_000, 4: 900}]
    zero = {0: 1e-4, 1: 1e-4, 2: 1e-4, 3: 0.06, 4: 0.99}
    best, table = choose_groups(sizes, zero, 0.01, 0.99)
    assert groups_text(best) in ("0-2,3,4", "0-3,4")
    assert table[groups_text(best)] == min(table.values())
    assert table[groups_text(best)] < 0.85 * table["0,1,2,3,4"]  # merging zero rates pays
    # the prediction is the audit plus allocate's allocation, stratum by stratum
    n_fine = 0
    for s in sizes:
        N = [s[h] for h in sorted(s)]
        n0 = [min(n, 30) for n in N]
        n_fine += sum(n0) + int(allocate(N, [zero[h] for h in sorted(s)], 0.01, 0.99, 30,
                                         None, n0).sum())
    assert table["0,1,2,3,4"] == n_fine
    spread = {0: 0.001, 1: 0.1, 2: 0.4, 3: 0.7, 4: 0.99}  # rates that differ: stay apart
    best, table = choose_groups(sizes, spread, 0.01, 0.99)
    assert len(best) >= 4 and table[groups_text(best)] < table["0-4"]


def _campaign(cls, truth, groups, rng_seed, conf=0.95, error=0.03):
    """One two-phase stratified campaign over predicted classes ``cls`` (grouped):
    audit 30 per sub-stratum, then the allocation planned from the audit; MOVER estimate."""
    gmap = group_map(groups)
    sub = gmap[cls]
    keys = sorted(set(sub.tolist()))
    N = [int((sub == h).sum()) for h in keys]
    audit = [draw(sub, h, min(30, n), rng_seed, f"g{h}", 0) for h, n in zip(keys, N,
                                                                           strict=True)]
    n0 = [len(j) for _, j in audit]
    k0 = [int(truth[j].sum()) for _, j in audit]
    more = allocate(N, plan_rates(n0, k0, [0.01] * len(N)), error, conf, 30, None, n0)
    cells = []
    for h, n, (kk, _), m, a, b in zip(keys, N, audit, more.tolist(), n0, k0, strict=True):
        _, j = draw(sub, h, m, rng_seed, f"g{h}", 1, kk.tolist())
        cells.append(Cell(n, m, int(truth[j].sum()), a, b))
    return estimate(cells, conf), int(sum(n0) + more.sum())


def test_grouped_sub_strata_cover_with_rare_heavy_events_and_cost_less():
    """Unequal classes; the merged 'low' class hides a rare heavy pocket (2 % critical in
    a tenth of it). The grouped design covers at the nominal 95 % over 300 campaigns with
    fewer faults; an interval that calls a group with no observed critical fault exactly 0
    (a broken interval) misses the pocket."""
    rng = np.random.default_rng(3)
    sizes = [60_000, 20_000, 8_000, 3_000, 2_000]
    cls = np.repeat(np.arange(5), sizes).astype(np.uint8)
    truth = np.zeros(cls.size, bool)
    low = np.flatnonzero(cls == 1)
    truth[rng.choice(low[: len(low) // 10], 40, replace=False)] = True
    for h, rate in ((2, 0.01), (3, 0.2), (4, 0.95)):
        idx = np.flatnonzero(cls == h)
        truth[rng.choice(idx, int(rate * len(idx)), replace=False)] = True
    exact = truth.mean()
    merged, fine = parse_groups("0-2,3,4"), parse_groups("0,1,2,3,4")
    hit = margin = cost_m = cost_f = 0.0
    reps = 300
    for seed in range(reps):
        e, n = _campaign(cls, truth, merged, seed)
        cost_m += n
        margin += e.margin
        hit += e.ci[0] <= exact <= e.ci[1]
        cost_f += _campaign(cls, truth, fine, seed)[1] if seed < 20 else 0
    assert hit / reps >= 0.93
    assert margin / reps <= 0.03 + 1e-3  # and it is not covering by being wide
    assert cost_m / reps < 0.9 * cost_f / 20


def test_grouped_campaign_end_to_end_with_calibration(tmp_path):
    from flipguard.campaign.analysis import classify_store
    from flipguard.campaign.store import CampaignStore
    from flipguard.campaign.substrata import split_key
    from flipguard.cli import app
    from flipguard.faults import Fault
    from flipguard.inject import CRITICAL, parse_criterion
    from flipguard.study.calibration import CALIBRATION_FILE
    from flipguard.study.engines import RunEngineFactory
    from flipguard.study.predictors import predictor_for_run
    from test_runner import make_tiny_run

    run = make_tiny_run(tmp_path)
    base = ["--layers", "encoder.0", "--target-margin", "0.05", "--confidence", "0.95",
            "--sampling", "stratified", "--images", "6"]
    cli = CliRunner()
    res = cli.invoke(app, ["campaign", "plan", str(run), *base, "--probe", "0", "--json"])
    assert res.exit_code == 0, res.output
    fine = json.loads(res.stdout)
    assert any("no calibration" in n for n in fine["notes"])  # auto without evidence: none
    res = cli.invoke(app, ["campaign", "run", str(run), *base, "--class-groups", "0-2,3,4",
                           "--json"])
    assert res.exit_code == 0, res.output
    pred = predictor_for_run(run, 6, CRIT, layers=None)
    with CampaignStore(run / "campaign.sqlite") as store:
        assert store.definition["plan"]["class_groups"] == "0-2,3,4"
        keys = {s.key: s.N for s in store.strata()}
        planned = list(store.planned())
        results = {pf.fault_id for pf, _ in store.results()}
    by_cls = {split_key(s["key"])[1]: s["N"] for s in fine["strata"]}
    assert set(keys) <= {f"weight:encoder.0:crit={h}" for h in (0, 3, 4)}
    assert keys.get("weight:encoder.0:crit=0", 0) == sum(by_cls.get(h, 0) for h in (0, 1, 2))
    raw = pred.class_of([pf.fault for pf in planned])
    for pf, c in zip(planned, raw.tolist(), strict=True):  # drawn within its group only
        assert split_key(pf.stratum)[1] == group_map(parse_groups("0-2,3,4"))[c]
    # the exact CFR of the layer (every one of its 2,048 faults) lies in the interval
    engine = RunEngineFactory(str(run), images=6)()
    crit = parse_criterion(CRIT)
    faults = [Fault("weight", "encoder.0", e, (b,)) for e in range(64) for b in range(32)]
    exact = np.mean([crit.is_critical(o, engine.golden) for o in engine.run(faults)])
    res = cli.invoke(app, ["cfr", str(run), "--by", "layer", "--criterion", CRIT, "--json"])
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout)[0]
    assert row["ci"][0] <= exact <= row["ci"][1]
    # the calibration holds the executed faults' raw classes and outcomes
    calib = json.loads((run / CALIBRATION_FILE).read_text())
    (entry,) = calib["entries"].values()
    (rec,) = entry["campaigns"].values()
    done = [pf for pf in planned if pf.fault_id in results]
    cls = pred.class_of([pf.fault for pf in done])
    with CampaignStore(run / "campaign.sqlite") as store:
        crit_of = {pf.fault_id: c in CRITICAL for pf, c in classify_store(store, CRIT)}
    for h in range(5):
        sel = [pf for pf, c in zip(done, cls.tolist(), strict=True) if c == h]
        assert rec["classes"][h] == [len(sel), sum(crit_of[pf.fault_id] for pf in sel)]
    # resuming with auto keeps the store's groups; a fresh plan is chosen from the calibration
    res = cli.invoke(app, ["campaign", "plan", str(run), *base, "--probe", "0", "--json"])
    assert res.exit_code == 0, res.output
    again = json.loads(res.stdout)
    assert any("as the campaign being resumed" in n for n in again["notes"])
    assert {s["key"] for s in again["strata"]} == set(keys)
    (run / "campaign.sqlite").rename(tmp_path / "old.sqlite")
    res = cli.invoke(app, ["campaign", "plan", str(run), *base, "--probe", "0", "--json"])
    assert res.exit_code == 0, res.output
    auto = json.loads(res.stdout)
    note = next(n for n in auto["notes"] if n.startswith("class groups"))
    assert "calibrated on" in note and f"{len(done):,} faults" in note
    # a corrupt calibration file is one line naming it, and the plan is not written
    (run / CALIBRATION_FILE).write_text("{not json")
    res = cli.invoke(app, ["campaign", "run", str(run), *base])
    assert res.exit_code != 0 and "calibration.json" in res.output
    assert not (run / "campaign.sqlite").exists()


def test_a_stopped_campaign_still_records_its_calibration(tmp_path):
    """Stopped mid-round (Ctrl-C, or SIGTERM through the CLI), a stratified campaign writes
    the calibration of exactly the faults it executed, and the stop propagates."""
    import os
    import signal

    from flipguard.campaign.analysis import classify_store
    from flipguard.campaign.store import CampaignStore
    from flipguard.cli._common import sigterm_as_interrupt
    from flipguard.inject import CRITICAL
    from flipguard.study.calibration import CALIBRATION_FILE
    from flipguard.study.campaigns import CampaignEvents, CampaignOptions, run_study_campaign
    from flipguard.study.predictors import predictor_for_run
    from test_runner import make_tiny_run

    run = make_tiny_run(tmp_path)
    cfg = PlanConfig(layers=("encoder.0",), error=0.05, confidence=0.95,
                     sampling="stratified", criterion=CRIT)
    calls = []

    def stop(done: int, total: int) -> None:  # after the second chunk of the audit
        calls.append(done)
        if len(calls) == 2:
            with sigterm_as_interrupt():  # SIGTERM arrives as an interrupt ...
                os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(KeyboardInterrupt):
        run_study_campaign(run, cfg, CampaignOptions(images=6, chunk=4, probe=0),
                           CampaignEvents(progress=stop))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # ... and the handler is back
    with CampaignStore(run / "campaign.sqlite") as store:
        c = store.counts()
        done = [pf for pf, _ in store.results()]
        crit_of = {pf.fault_id: k in CRITICAL for pf, k in classify_store(store, CRIT)}
    assert 0 < c["done"] < c["planned"]  # stopped part-way
    calib = json.loads((run / CALIBRATION_FILE).read_text())
    (entry,) = calib["entries"].values()
    (rec,) = entry["campaigns"].values()
    cls = predictor_for_run(run, 6, CRIT, layers=None).class_of([pf.fault for pf in done])
    for h in range(5):
        sel = [pf for pf, k in zip(done, cls.tolist(), strict=True) if k == h]
        assert rec["classes"][h] == [len(sel), sum(crit_of[pf.fault_id] for pf in sel)]
    assert sum(n for n, _ in rec["classes"]) == c["done"]
