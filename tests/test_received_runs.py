"""Run directories and stores that are safe to receive and share: one writer per store,
orphaned temp files cleaned, read-only stores readable, error lines printed verbatim,
reports that never touch files the tool did not write."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from flipguard.campaign import PlanConfig, open_campaign
from flipguard.campaign import store as store_mod
from flipguard.campaign.store import CampaignStore, StoreError, writer_lock
from flipguard.cli import app
from flipguard.cli._common import cli_errors
from flipguard.fileio import atomic_write, remove_orphans
from flipguard.report.build import ReportFiles, render_report
from flipguard.report.sections import ReportContext
from test_store import make_store

runner = CliRunner()


def _holder(path, ready):
    """A separate process that holds the store's writer lock until killed."""
    code = textwrap.dedent(f"""
        import pathlib, time
        from flipguard.campaign.store import writer_lock
        with writer_lock({str(path)!r}):
            pathlib.Path({str(ready)!r}).write_text("held")
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code])
    for _ in range(600):
        if ready.exists():
            return proc
        if proc.poll() is not None:
            break
        import time

        time.sleep(0.05)
    proc.kill()
    raise AssertionError("lock holder did not start")


def test_second_writer_is_refused_and_fresh_cannot_replace_a_live_store(tmp_path):
    store, _, faults = make_store(tmp_path)
    store.add_results([(faults[0].fault_id, {"masked": True})])
    proc = _holder(store.path, tmp_path / "ready")
    try:
        with pytest.raises(StoreError, match=f"pid {proc.pid}") as exc:
            with writer_lock(store.path):
                pass
        assert "\n" not in str(exc.value)
        with pytest.raises(StoreError, match="another flipguard process"):  # --fresh
            CampaignStore.create(store.path, {}, [], [], replace=True)
        with pytest.raises(StoreError, match="another flipguard process"):
            from flipguard.campaign import run_campaign

            run_campaign(store, factory=None, engine=object())
    finally:
        proc.kill()
        proc.wait()
    assert CampaignStore(store.path).counts()["done"] == 1  # nothing was discarded
    with writer_lock(store.path):  # free again once the holder is gone
        pass


def test_fresh_beside_a_live_campaign_run_keeps_its_results(tmp_path):
    from flipguard.study.engines import RunEngineFactory
    from test_runner import make_tiny_run

    run = make_tiny_run(tmp_path)
    cfg = PlanConfig(strata="layer", error=0.3, confidence=0.8, layers=("encoder.0",))
    factory = RunEngineFactory(str(run), images=4)
    store = open_campaign(run, cfg, factory)
    planned = store.counts()["planned"]
    proc = _holder(store.path, tmp_path / "ready")
    try:
        with pytest.raises(StoreError, match="another flipguard process"):
            open_campaign(run, cfg, factory, fresh=True)
    finally:
        proc.kill()
        proc.wait()
    assert CampaignStore(store.path).counts()["planned"] == planned


def test_temp_files_of_killed_processes_are_cleaned(tmp_path):
    target = tmp_path / "metrics.json"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    orphan = tmp_path / f".metrics.json.{dead}.abc123"
    live = tmp_path / f".metrics.json.{os.getpid()}.def456"
    other = tmp_path / ".notes.txt.1.x"
    for p in (orphan, live, other):
        p.write_text("half-written")
    atomic_write(target, "{}\n")
    assert target.read_text() == "{}\n"
    assert not orphan.exists() and live.exists() and other.exists()
    assert remove_orphans(target) == []


def test_finished_store_reads_in_a_read_only_place(tmp_path, monkeypatch):
    store, _, faults = make_store(tmp_path)
    store.add_results([(f.fault_id, {"masked": True}) for f in faults[:3]])
    store.close()
    monkeypatch.setattr(store_mod, "_writable", lambda path: False)
    ro = CampaignStore(store.path)
    assert ro.counts() == {"planned": len(faults), "done": 3}
    assert len(ro.results()) == 3
    with pytest.raises(StoreError, match="cannot write the campaign store") as exc:
        ro.add_results([(faults[4].fault_id, {"masked": True})])
    assert "\n" not in str(exc.value)


def test_error_lines_are_printed_verbatim_and_os_errors_are_one_line(capsys):
    from flipguard.errors import FlipguardError

    def bad_path():
        raise FlipguardError("runs/[v2]/config.json: field 'x': bad")

    def read_only():
        raise PermissionError(13, "Permission denied", "/ro/campaign.sqlite")

    for fn, text in ((bad_path, "runs/[v2]/config.json"), (read_only, "/ro/campaign.sqlite")):
        with pytest.raises(BaseException) as exc:
            cli_errors(fn)()
        assert getattr(exc.value, "exit_code", None) == 2
        err = capsys.readouterr().err
        assert text in err and len(err.strip().splitlines()) == 1


def _ctx(tmp_path, **kw):
    return ReportContext(tmp_path / "run", metrics={"image_auroc": 0.9}, **kw)


def test_report_out_folder_never_loses_the_users_files(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.csv").write_text("a,b\n")
    (mine / "photo.png").write_bytes(b"\x89PNG")
    html = render_report(_ctx(tmp_path), mine)  # a folder: report.html + report/ inside it
    assert html == mine / "report.html" and html.is_file()
    html = render_report(_ctx(tmp_path), mine)  # and again: the user's files survive
    assert (mine / "notes.csv").read_text() == "a,b\n" and (mine / "photo.png").exists()


def test_report_refuses_to_overwrite_foreign_files_and_removes_only_its_own(tmp_path):
    out = tmp_path / "r.html"
    html = render_report(_ctx(tmp_path), out)
    assets = ReportFiles(out).assets
    ours = sorted(p for p in assets.rglob("*") if p.is_file())
    assert ours and html.is_file()
    stale = assets / "old_table.csv"  # ours from an earlier report? no: the user's
    stale.write_text("user data\n")
    render_report(_ctx(tmp_path), out)
    assert stale.read_text() == "user data\n"
    foreign = tmp_path / "x.html"
    (tmp_path / "x").mkdir()
    (tmp_path / "x.md").write_text("my notes\n")
    with pytest.raises(Exception, match="not written by flipguard report"):
        render_report(_ctx(tmp_path), foreign)
    assert (tmp_path / "x.md").read_text() == "my notes\n"
    with pytest.raises(Exception, match="expected an .html file or a folder"):
        render_report(_ctx(tmp_path), tmp_path / "r.txt")


def test_report_cli_out_is_a_folder(tmp_path):
    from test_runner import make_tiny_run

    run = make_tiny_run(tmp_path)
    (tmp_path / "share").mkdir()
    (tmp_path / "share" / "keep.csv").write_text("k\n")
    for _ in range(2):
        res = runner.invoke(app, ["report", str(run), "--out", str(tmp_path / "share")])
        assert res.exit_code == 0, res.output
    assert (tmp_path / "share" / "report.html").is_file()
    assert (tmp_path / "share" / "keep.csv").read_text() == "k\n"
    torch.set_num_threads(1)
