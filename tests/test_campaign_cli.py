"""`flipguard campaign plan|run|status|export` and `flipguard cfr`: JSON shapes and errors."""

from __future__ import annotations

import csv
import json
import shutil

import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from flipguard.campaign.planner import PlanConfig, make_plan
from flipguard.campaign.stats import leveugle_n
from flipguard.cli import app

runner = CliRunner()
PLAN_ARGS = ["--strata", "layer", "--error", "0.25", "--confidence", "0.9", "--layers",
             "encoder.0,encoder.8,decoder.16"]


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from test_runner import make_tiny_run

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cli")
    run = make_tiny_run(root)
    res = invoke("campaign", "run", run, *PLAN_ARGS, "--images", "6", "--json")
    assert res.exit_code == 0, res.output
    return run, json.loads(res.stdout)


def test_plan_json_shape_and_values(tiny):
    run, _ = tiny
    res = invoke("campaign", "plan", run, "--strata", "layer,bit", "--error", "0.05",
                 "--confidence", "0.95", "--layers", "encoder.0,decoder.16", "--probe", "2",
                 "--json")
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    assert {"population", "total", "strata", "estimate_s"} <= set(plan)
    assert len(plan["strata"]) == 2 * 32 and plan["estimate_s"] > 0
    for s in plan["strata"]:
        assert {"layer", "bit", "N", "n"} <= set(s) and isinstance(s["bit"], int)
        assert s["n"] == leveugle_n(s["N"], 0.05, 0.95)
    assert plan["total"] == sum(s["n"] for s in plan["strata"])
    assert plan["population"] == sum(s["N"] for s in plan["strata"])
    layer = json.loads(invoke("campaign", "plan", run, *PLAN_ARGS, "--probe", "0",
                              "--json").stdout)
    assert [s["bit"] for s in layer["strata"]] == [None] * 3 and layer["estimate_s"] is None
    human = invoke("campaign", "plan", run, *PLAN_ARGS, "--probe", "0")
    assert human.exit_code == 0 and "population" in human.output


def test_plan_for_any_importable_model(tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(
        "import torch\n"
        "def small():\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(),\n"
        "                               torch.nn.Linear(4, 2))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    res = invoke("campaign", "plan", "--model", "mymodels:small", "--input-shape", "3,3,3",
                 "--fault-model", "stuck-at", "--error", "0.05", "--json")
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    assert [s["N"] for s in plan["strata"]] == [108 * 32 * 2, 8 * 32 * 2]
    assert plan["estimate_s"] is not None


def test_run_status_cfr_export(tiny, tmp_path):
    run, summary = tiny
    net = torch.load(run / "model.pt", weights_only=True)
    assert summary["done"] == summary["planned"] and summary["ran"] == summary["planned"]
    status = json.loads(invoke("campaign", "status", run, "--json").stdout)
    assert status["planned"] == status["done"] == summary["planned"] and status["pending"] == 0
    rerun = invoke("campaign", "run", run, *PLAN_ARGS, "--images", "6", "--json")
    assert rerun.exit_code == 0 and json.loads(rerun.stdout)["ran"] == 0  # resumes: nothing left
    res = invoke("cfr", run, "--by", "layer", "--criterion", "any-flip", "--json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [r["layer"] for r in rows] == ["encoder.0", "encoder.8", "decoder.16"]
    for r in rows:
        assert {"n", "critical", "cfr", "ci", "N", "margin"} <= set(r)
        assert r["N"] == net[f"{r['layer']}.weight"].numel() * 32
        assert r["ci"][0] <= r["cfr"] <= r["ci"][1] and r["critical"] <= r["n"]
    both = json.loads(invoke("cfr", run, "--by", "layer,bit", "--criterion",
                             "accuracy-drop:0.01", "--method", "clopper-pearson",
                             "--json").stdout)
    assert all({"layer", "bit"} <= set(r) for r in both)
    assert sum(r["n"] for r in both) == summary["planned"]
    net_row = json.loads(invoke("cfr", run, "--by", "network", "--json").stdout)
    assert len(net_row) == 1 and net_row[0]["n"] == summary["planned"]
    assert invoke("cfr", run, "--by", "field").exit_code == 0  # rich table
    out = tmp_path / "f.csv"
    assert invoke("campaign", "export", run, "--format", "csv", "--out", out).exit_code == 0
    with open(out, newline="") as fh:
        assert len(list(csv.DictReader(fh))) == summary["planned"]
    assert invoke("campaign", "export", run, "--format", "parquet").exit_code == 0
    assert pq.read_table(run / "faults.parquet").num_rows == summary["planned"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [(["--error", "0"], "error"), (["--error", "1.5"], "error"),
     (["--confidence", "1"], "confidence"), (["--p", "2"], "p:"), (["--p", "maybe"], "p:"),
     (["--layers", "nope"], "unknown layer 'nope'"), (["--strata", "layer,colour"], "strata"),
     (["--strata", "missing.json"], "missing.json")],
)
def test_invalid_options_exit_with_one_line(tiny, args, needle):
    run, _ = tiny
    res = invoke("campaign", "plan", run, "--probe", "0", *args)
    assert res.exit_code == 2
    err = res.stderr.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_other_plan_or_model_is_refused(tiny, tmp_path):
    from test_runner import make_tiny_run

    run, _ = tiny
    res = invoke("campaign", "run", run, "--strata", "layer", "--error", "0.3", "--images", "6",
                 "--limit", "0")
    assert res.exit_code == 2 and "different plan" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    other = make_tiny_run(tmp_path, seed=1)
    shutil.copy(run / "campaign.sqlite", other / "campaign.sqlite")
    res = invoke("campaign", "run", other, *PLAN_ARGS, "--images", "6")
    assert res.exit_code == 2 and "another model" in res.stderr
    fresh = invoke("campaign", "run", other, *PLAN_ARGS, "--images", "6", "--fresh", "--limit",
                   "5", "--json")
    assert fresh.exit_code == 0, fresh.output
    assert json.loads(fresh.stdout)["done"] == 5
    assert invoke("cfr", tmp_path / "nowhere").exit_code == 2
    res = invoke("cfr", run, "--by", "colour")
    assert res.exit_code == 2 and "by:" in res.stderr


def test_plan_matches_python_api(tiny):
    run, _ = tiny
    from flipguard.study.rundir import load_run

    res = invoke("campaign", "plan", run, "--strata", "network", "--error", "0.02", "--p",
                 "data-aware", "--probe", "0", "--json")
    plan = json.loads(res.stdout)
    ref = make_plan(load_run(run).model, PlanConfig(strata="network", error=0.02,
                                                    p="data-aware"))
    assert plan["total"] == ref.total and [s["n"] for s in plan["strata"]] == [
        s.n for s in ref.strata]


def test_refine_via_cli(tmp_path):
    from test_runner import make_tiny_run

    run = make_tiny_run(tmp_path, seed=2)
    opts = ["--strata", "layer", "--error", "0.3", "--confidence", "0.9", "--layers",
            "encoder.0,decoder.16", "--images", "4", "--p", "data-aware"]
    planned = json.loads(invoke("campaign", "plan", run, *opts, "--probe", "0", "--json").stdout)
    res = invoke("campaign", "run", run, *opts, "--refine", "--criterion", "any-flip", "--json")
    assert res.exit_code == 0, res.output
    status = json.loads(invoke("campaign", "status", run, "--json").stdout)
    assert status["rounds"] >= 1 and status["done"] == status["planned"]
    assert status["planned"] > planned["total"]  # the data-aware prior was topped up
    assert sum(s["done"] for s in status["by_stratum"]) == status["done"]
    bad = invoke("campaign", "run", run, *opts, "--refine", "--criterion", "colour")
    assert bad.exit_code == 2 and "criterion" in bad.stderr


def test_plan_t_table_and_stuck_at_population(tmp_path, monkeypatch):
    """`--t table` plans with the two-decimal t (hand formula at 2.58, nearest), records it in
    the plan; the human output says what the stuck-at population counts (no-op half included
    by default) and `--stuck-at effective` halves N."""
    import math

    (tmp_path / "convmodels.py").write_text(
        "import torch\n"
        "def small():\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(),\n"
        "                               torch.nn.Linear(8, 2))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    base = ["campaign", "plan", "--model", "convmodels:small", "--fault-model", "stuck-at",
            "--error", "0.01", "--confidence", "0.99", "--rounding", "nearest"]
    table = json.loads(invoke(*base, "--t", "table", "--json").stdout)
    assert table["t"] == 2.58 and table["config"]["t"] == "table"
    for s in table["strata"]:
        raw = s["N"] / (1 + 1e-4 * (s["N"] - 1) / (2.58 ** 2 * 0.25))
        assert s["n"] == math.floor(raw + 0.5)
    exact = json.loads(invoke(*base, "--json").stdout)
    assert "t" not in exact["config"] and exact["t"] == pytest.approx(2.5758293)
    assert [s["n"] for s in exact["strata"]] == [leveugle_n(s["N"], 0.01, 0.99, 0.5, "nearest")
                                                 for s in exact["strata"]]
    eff = json.loads(invoke(*base, "--stuck-at", "effective", "--json").stdout)
    assert [s["N"] for s in eff["strata"]] == [s["N"] // 2 for s in exact["strata"]]
    assert all(s["effective"] for s in eff["strata"])
    def text(*args: str) -> str:  # rich wraps at the terminal width
        res = invoke(*args)
        assert res.exit_code == 0, res.output
        return " ".join(res.output.split())

    human = text(*base, "--t", "table")
    assert "t=2.58 (table)" in human and "including the no-op half" in human
    assert "only the stuck-at faults that change the" in text(*base, "--stuck-at", "effective")
    flips = text("campaign", "plan", "--model", "convmodels:small")
    assert "one flip each" in flips and "t=2.576 (exact)" in flips


@pytest.mark.parametrize(("args", "needle"), [
    (["--t", "student"], "t:"), (["--stuck-at", "half"], "stuck-at:"),
    (["--stuck-at", "effective"], "needs --fault-model stuck-at")])
def test_invalid_conventions_exit_with_one_line(tiny, args, needle):
    run, _ = tiny
    res = invoke("campaign", "plan", run, "--probe", "0", *args)
    assert res.exit_code == 2
    err = res.stderr.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_resume_with_another_t_is_refused(tiny):
    run, _ = tiny
    for extra in (["--t", "table"], ["--fault-model", "stuck-at"]):
        res = invoke("campaign", "run", run, *PLAN_ARGS, *extra, "--images", "6", "--limit", "0")
        assert res.exit_code == 2 and "different plan" in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1


def test_effective_stuck_at_campaign_runs_no_noop(tmp_path):
    """An effective stuck-at campaign executes only faults that change the stored bit (no
    outcome is a no-op, each kind opposes the stored bit); the default one records no-ops."""
    from test_runner import make_tiny_run

    run = make_tiny_run(tmp_path, seed=3)
    opts = ["--strata", "layer", "--error", "0.3", "--confidence", "0.9", "--layers",
            "encoder.0,decoder.16", "--images", "4", "--fault-model", "stuck-at"]
    res = invoke("campaign", "run", run, *opts, "--stuck-at", "effective", "--json")
    assert res.exit_code == 0, res.output
    out = tmp_path / "eff.csv"
    assert invoke("campaign", "export", run, "--out", out).exit_code == 0
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    state = torch.load(run / "model.pt", weights_only=True)
    assert rows and all(r["noop"] == "False" for r in rows)
    for r in rows:
        word = state[f"{r['layer']}.weight"].flatten()[int(r["index"])].view(torch.int32).item()
        bit = (word >> int(r["bits"])) & 1
        assert r["kind"] == ("stuck-at-0" if bit else "stuck-at-1")
    res = invoke("campaign", "run", run, *opts, "--fresh", "--json")
    assert res.exit_code == 0, res.output
    assert invoke("campaign", "export", run, "--out", out).exit_code == 0
    with open(out, newline="") as fh:
        assert any(r["noop"] == "True" for r in csv.DictReader(fh))


def test_missing_ray_is_one_line_before_any_store_is_made(tmp_path, monkeypatch):
    from test_runner import make_tiny_run

    run = make_tiny_run(tmp_path)
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # import ray -> ImportError
    res = invoke("campaign", "run", run, *PLAN_ARGS, "--images", "2", "--ray", "local")
    assert res.exit_code != 0
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert lines[-1].endswith("pip install 'flipguard[ray]')"), res.output
    assert not (run / "campaign.sqlite").exists()
