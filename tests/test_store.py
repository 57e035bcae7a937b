"""Campaign store: atomic creation, WAL, idempotent writes, fingerprints, exports."""

from __future__ import annotations

import csv
import sqlite3

import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from flipguard.campaign.planner import PlanConfig, make_plan
from flipguard.campaign.store import CampaignStore, StoreError, export, store_path


def make_store(tmp_path, **defn):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2))
    cfg = PlanConfig(strata="layer", error=0.2, confidence=0.9, seed=1)
    plan = make_plan(net, cfg)
    faults = plan.faults()
    definition = {"plan": cfg.to_dict(), "plan_digest": cfg.digest(),
                  "model_fingerprint": "m1", "data_fingerprint": "d1", **defn}
    store = CampaignStore.create(tmp_path / "run" / "campaign.sqlite", definition,
                                 plan.strata, faults)
    return store, plan, faults


def test_create_plan_and_pragmas(tmp_path):
    store, plan, faults = make_store(tmp_path)
    assert store.counts() == {"planned": len(faults), "done": 0}
    assert store.planned() == faults
    assert [s.key for s in store.strata()] == [s.key for s in plan.strata]
    assert [s.n for s in store.strata()] == [s.n for s in plan.strata]
    assert store.con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.con.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert store.definition["model_fingerprint"] == "m1"
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(StoreError, match="already exists"):
        CampaignStore.create(store.path, {}, [], [])
    assert store_path(tmp_path / "run") == store.path


def test_results_idempotent_and_pending(tmp_path):
    store, _, faults = make_store(tmp_path)
    rows = [(f.fault_id, {"flips": f.fault_id % 3, "score": [0.5, 1.0]}) for f in faults[:10]]
    assert store.add_results(rows) == 10
    assert store.add_results(rows[:5] + [(rows[0][0], {"flips": 99})]) == 0  # never twice
    assert store.counts()["done"] == 10
    assert [f.fault_id for f in store.pending()] == [f.fault_id for f in faults[10:]]
    assert store.pending(limit=3) == faults[10:13]
    got = store.results()
    assert [(pf, d) for pf, d in got] == [(f, dict(r)) for f, (_, r) in zip(faults, rows,
                                                                            strict=False)]
    store.close()
    again = CampaignStore(store.path)  # reopen: everything persisted
    assert again.counts() == {"planned": len(faults), "done": 10}
    assert again.results()[0][1] == {"flips": 0, "score": [0.5, 1.0]}


def test_failed_transaction_writes_nothing(tmp_path):
    store, _, faults = make_store(tmp_path)
    with pytest.raises(sqlite3.IntegrityError):  # an unplanned id aborts the whole batch
        store.add_results([(faults[0].fault_id, {"a": 1}), (10**6, {"b": 2})])
    assert store.counts()["done"] == 0
    assert store.add_results([(faults[0].fault_id, {"a": 1})]) == 1


def test_fingerprint_and_plan_mismatch(tmp_path):
    store, _, _ = make_store(tmp_path)
    store.check(model="m1", data="d1", plan=store.definition["plan_digest"])
    with pytest.raises(StoreError, match="another model") as exc:
        store.check(model="m2")
    assert "\n" not in str(exc.value) and "campaign.sqlite" in str(exc.value)
    with pytest.raises(StoreError, match="another dataset"):
        store.check(data="d2")
    with pytest.raises(StoreError, match="different plan"):
        store.check(plan="x")


def test_missing_and_corrupt(tmp_path):
    with pytest.raises(StoreError, match="no campaign store"):
        CampaignStore(tmp_path / "campaign.sqlite")
    bad = tmp_path / "bad" / "campaign.sqlite"
    bad.parent.mkdir()
    bad.write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreError, match="not a readable campaign store"):
        CampaignStore(bad)


def test_add_planned_and_meta(tmp_path):
    store, plan, faults = make_store(tmp_path)
    assert store.next_fault_id() == len(faults)
    assert store.add_planned(faults[:3]) == 0
    store.set_meta("golden", {"accuracy": 0.75})
    assert CampaignStore(store.path).get_meta("golden") == {"accuracy": 0.75}
    ks = store.done_ks()
    assert sorted(ks) == sorted(s.key for s in plan.strata)
    assert sum(len(v) for v in ks.values()) == len(faults)


def test_export_csv_and_parquet(tmp_path):
    store, _, faults = make_store(tmp_path)
    store.add_results([(f.fault_id, {"flips": i, "nan": False}) for i, f in enumerate(faults[:6])])
    out = export(store, tmp_path / "x.csv", "csv")
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6
    for row, f in zip(rows, faults, strict=False):
        assert int(row["fault_id"]) == f.fault_id and row["layer"] == f.fault.layer
        assert int(row["index"]) == f.fault.index and int(row["bit"]) == f.fault.bits[0]
        assert row["kind"] == f.fault.kind and int(row["kernel"]) == f.kernel
    assert [int(r["flips"]) for r in rows] == list(range(6))
    table = pq.read_table(export(store, tmp_path / "x.parquet", "parquet")).to_pylist()
    assert [r["fault_id"] for r in table] == [f.fault_id for f in faults[:6]]
    assert table[2]["field"] == store.rows()[2]["field"]
    with pytest.raises(StoreError, match="format"):
        export(store, tmp_path / "x.xls", "xls")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_concurrent_reader_sees_committed_rows(tmp_path):
    store, _, faults = make_store(tmp_path)
    store.add_results([(faults[0].fault_id, {"a": 1})])
    con = sqlite3.connect(str(store.path))
    assert con.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 1


def test_pending_pages_cover_pending_in_windows(tmp_path):
    store, _, faults = make_store(tmp_path)
    done = [f.fault_id for f in faults[::3]]
    store.add_results([(i, {"x": 1}) for i in done])
    pages = list(store.pending_pages(page=16))
    flat = [pf for page in pages for pf in page]
    assert flat == store.pending()
    assert all(len({pf.fault_id // 16 for pf in page}) == 1 for page in pages)
    limited = [pf for page in store.pending_pages(page=16, limit=7) for pf in page]
    assert limited == store.pending()[:7]
    assert store.pending_ids() == [pf.fault_id for pf in store.pending()]
    some = [faults[5].fault_id, faults[1].fault_id, faults[5].fault_id]
    assert store.faults_by_id(some) == [faults[1], faults[5]]
