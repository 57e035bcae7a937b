"""`flipguard nas` end to end on tiny data: resume after SIGKILL with nothing lost, the same
trials with poisoned test labels, objective subsets, the CLI and its outputs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

pytest.importorskip("optuna")

from flipguard.cli.nas import register  # noqa: E402
from flipguard.data import make_synthetic
from flipguard.errors import ConfigError

RUNNER = textwrap.dedent('''
    """Tiny search used by tests/test_nas_search.py (run in a subprocess too)."""
    import os
    import sys
    import time

    from flipguard.nas import CAESpace, Fidelity, NASConfig, run_nas


    class SlowSpace(CAESpace):
        """A small CAE space whose networks take a while to build (a trial lasts > 0.5 s,
        so a kill lands inside one)."""

        def build(self, arch, input_shape, seed=0):
            time.sleep(float(os.environ.get("NAS_TEST_SLEEP", "0")))
            return super().build(arch, input_shape, seed)


    space = CAESpace(depths=(1, 2), widths=(4, 8), kernels=(3, 4), latents=(4,),
                     activations=("leaky", "ranger", "learned"))
    slow = SlowSpace(depths=(1, 2), widths=(4, 8), kernels=(3, 4), latents=(4,),
                     activations=("leaky", "ranger", "learned"))


    def config(data, out, space="tiny_nas_runner:space", trials=3, uniform=True,
               objectives=("quality", "ra", "memory"), retrain=False):
        cfg = NASConfig(data=str(data), out=str(out), trials=trials, size=16, space=space,
                        compare_uniform=uniform, objectives=objectives, startup_trials=2,
                        front_max=1, retrain=retrain, screen=Fidelity(1, 0.05, 16, 16),
                        full=Fidelity(1, 0.05, 16, 16))
        cfg.settings.ra_images = 8
        return cfg


    if __name__ == "__main__":
        run_nas(config(sys.argv[1], sys.argv[2], space="tiny_nas_runner:slow", uniform=False))
''')


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("nas")
    (root / "tiny_nas_runner.py").write_text(RUNNER)
    sys.path.insert(0, str(root))
    data = make_synthetic(root / "data", n_train=40, n_test=12, size=16)
    yield root, data
    sys.path.remove(str(root))
    sys.modules.pop("tiny_nas_runner", None)


def _trials(out: Path, study: str) -> list[tuple]:
    """(state, params, values) of every trial in number order, read with plain sqlite."""
    con = sqlite3.connect(out / "nas.sqlite")
    try:
        sid = con.execute("SELECT study_id FROM studies WHERE study_name = ?",
                          (study,)).fetchone()[0]
        rows = con.execute("SELECT trial_id, state FROM trials WHERE study_id = ? ORDER BY "
                           "number", (sid,)).fetchall()
        out_rows = []
        for tid, state in rows:
            params = dict(con.execute("SELECT param_name, param_value FROM trial_params WHERE "
                                      "trial_id = ?", (tid,)).fetchall())
            vals = [v for (v,) in con.execute("SELECT value FROM trial_values WHERE trial_id = "
                                              "? ORDER BY objective", (tid,)).fetchall()]
            out_rows.append((state, params, vals))
        return out_rows
    finally:
        con.close()


def _complete(out: Path, study: str) -> list[tuple]:
    return [(p, v) for s, p, v in _trials(out, study) if s == "COMPLETE"]


def test_resume_after_sigkill_loses_nothing_and_matches_an_uninterrupted_run(tiny):
    from tiny_nas_runner import config  # type: ignore[import-not-found]

    import flipguard.nas.search as search
    from flipguard.nas import run_nas

    root, data = tiny
    out = root / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), *sys.path]),
           "OMP_NUM_THREADS": "1", "NAS_TEST_SLEEP": "0.8"}
    proc = subprocess.Popen([sys.executable, str(root / "tiny_nas_runner.py"), str(data),
                             str(out)], env=env, cwd=root, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    killed_in_trial = False
    t0 = time.time()
    try:
        while time.time() - t0 < 120 and proc.poll() is None:
            if (out / "nas.sqlite").is_file():
                try:
                    states = [s for s, _, _ in _trials(out, "nas-systolic")]
                except (sqlite3.OperationalError, TypeError):
                    states = []
                if states.count("COMPLETE") >= 1 and states[-1:] == ["RUNNING"]:
                    time.sleep(0.2)
                    os.kill(proc.pid, signal.SIGKILL)
                    killed_in_trial = True
                    break
            time.sleep(0.02)
    finally:
        if proc.poll() is None and not killed_in_trial:
            proc.kill()
        proc.wait(timeout=60)
    assert killed_in_trial, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
    before = _trials(out, "nas-systolic")
    assert before[-1][0] == "RUNNING"  # the killed trial is left RUNNING
    done_before = _complete(out, "nas-systolic")

    cfg = config(data, out, space="tiny_nas_runner:slow", uniform=False)
    doc = run_nas(cfg)  # the same command again
    after = _trials(out, "nas-systolic")
    assert after[len(before) - 1][0] == "FAIL"  # the killed trial, marked failed ...
    assert after[len(before)][1] == before[-1][1]  # ... and re-run first with its parameters
    assert doc["studies"]["nas-systolic"]["recovered"] == 1
    resumed = _complete(out, "nas-systolic")
    assert resumed[:len(done_before)] == done_before and len(resumed) == cfg.trials
    # an uninterrupted run of the same search gives the same trials
    ref = run_nas(config(data, root / "uninterrupted", space="tiny_nas_runner:slow",
                         uniform=False))
    assert _complete(root / "uninterrupted", "nas-systolic") == resumed
    assert ref["studies"]["nas-systolic"]["recovered"] == 0
    with pytest.raises(ConfigError, match="other settings"):
        run_nas(config(data, out, space="tiny_nas_runner:space", uniform=False))
    assert search.STORAGE_FILE == "nas.sqlite"


def _poison(src: Path, dst: Path) -> None:
    """A copy of ``src`` whose test labels are permuted: normal test images become
    "defects" and defects "good" (masks dropped)."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "ground_truth")
    test = dst / "test"
    (test / "good").rename(test / "was_good")
    (test / "good").mkdir()
    for kind in [p for p in test.iterdir() if p.name not in ("good", "was_good")]:
        for f in kind.iterdir():
            f.rename(test / "good" / f"{kind.name}_{f.name}")
        kind.rmdir()
    (test / "was_good").rename(test / "scratch")


@pytest.mark.filterwarnings("ignore:.*no ground_truth")
def test_objectives_never_read_test_labels_and_subsets_work(tiny):
    from tiny_nas_runner import config  # type: ignore[import-not-found]

    from flipguard.data import load_mvtec
    from flipguard.nas import run_nas

    root, data = tiny
    bad = root / "poisoned"
    _poison(data, bad)
    a, b = load_mvtec(data, size=16), load_mvtec(bad, size=16)
    def labelled(ds):
        return {tuple(x.flatten().tolist()): int(y) for x, y in zip(ds.test, ds.test_labels,
                                                                    strict=True)}

    la, lb = labelled(a), labelled(b)
    assert la.keys() == lb.keys() and all(la[k] != lb[k] for k in la)  # every label flipped
    objectives = ("quality", "ra")
    docs = [run_nas(config(d, root / name, objectives=objectives))
            for d, name in ((data, "clean"), (bad, "poison"))]
    for study in ("nas-systolic", "nas-uniform"):
        clean, poison = _complete(root / "clean", study), _complete(root / "poison", study)
        assert len(clean) == 3 and clean == poison
        assert all(len(v) == 2 for _, v in clean)  # the subset of objectives
    def timeless(rows):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert timeless(docs[0]["screened"]) == timeless(docs[1]["screened"])
    assert docs[0]["rankings"] == docs[1]["rankings"]
    assert docs[0]["config"]["objectives"] == list(objectives)


app = typer.Typer()


@app.callback()
def _main() -> None:
    """flipguard (test app with the nas verb only)."""


register(app)


def test_cli_runs_a_search_and_writes_the_front(tiny):
    root, data = tiny
    out = root / "cli"
    args = ["nas", "--data", str(data), "--out", str(out), "--trials", "2", "--size", "16",
            "--space", "tiny_nas_runner:space", "--screen-epochs", "1", "--screen-samples",
            "16", "--full-epochs", "1", "--ra-max-samples", "16", "--ra-images", "8",
            "--front-max", "1", "--startup-trials", "2", "--json"]
    res = CliRunner().invoke(app, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["schema"] == "flipguard.nas/1"
    assert set(doc["studies"]) == {"nas-systolic", "nas-uniform"}
    assert doc["baseline"]["name"] == "default CAE" and doc["baseline"]["test"] is not None
    assert 1 <= len(doc["final"]) <= 2 and all(it["test"] for it in doc["final"])
    for it in doc["final"] + [doc["baseline"]]:
        for hw in ("systolic", "uniform"):
            r = it["ra"][hw]
            assert r["ci"][0] <= r["ra"] <= r["ci"][1] and r["confidence"] == 0.95
    assert {"screen", "full"} <= set(doc["rankings"])
    for f in ("nas.json", "front.md", "front.csv", "front.png", "report.html"):
        assert (out / f).stat().st_size > 0
    assert "Architecture search" in (out / "report.html").read_text()
    again = CliRunner().invoke(app, args, catch_exceptions=False)  # resume: all cached
    assert again.exit_code == 0 and json.loads(again.stdout)["final"] == doc["final"]
    bad = CliRunner().invoke(app, ["nas", "--data", str(data), "--out", str(root / "x"),
                                   "--objectives", "quality,speed"])
    assert bad.exit_code == 2 and "--objectives" in bad.output
    assert len(bad.output.strip().splitlines()) == 1


def test_nsga2_with_two_worker_processes(tiny):
    from tiny_nas_runner import config  # type: ignore[import-not-found]

    from flipguard.nas import run_nas

    root, data = tiny
    cfg = config(data, root / "nsga2", trials=4, uniform=False)
    cfg.sampler, cfg.workers, cfg.population = "nsga2", 2, 2
    doc = run_nas(cfg)
    rows = _trials(root / "nsga2", "nas-systolic")
    assert [s for s, _, _ in rows].count("COMPLETE") >= 4
    assert doc["studies"]["nas-systolic"]["COMPLETE"] >= 4 and doc["config"]["sampler"] == "nsga2"
    assert len(doc["screened"]) >= 1 and all(len(v) == 3 for s, _, v in rows if s == "COMPLETE")
