"""Open a real report in headless Chromium (Debian's ``chromium``) and check the screenshot.

Skips cleanly when Chromium is not installed (``apt-get install -y chromium`` enables it).
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from flipguard.study.reports import build_report
from test_report import CRIT, make_run

CHROMIUM = shutil.which("chromium")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_report_renders_in_headless_chromium(tmp_path):
    run_dir = make_run(tmp_path, campaign_limit=60)
    html = build_report(run_dir, CRIT, examples=2)
    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
           "--window-size=1280,2000", html.resolve().as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1280, 2000)
        rgb = np.asarray(im.convert("RGB"), dtype=np.int64)
    assert rgb.std() > 20  # not a blank page
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 200  # text, tables, colours
    # the inline CSS applied: the header band is the report's dark blue (#1f3a5f)
    assert np.abs(rgb[10, 10] - [0x1F, 0x3A, 0x5F]).max() <= 3
    # the partial-campaign warning box (#fdf0e6 background) is visible near the top
    warn = np.all(np.abs(rgb[:1200] - [0xFD, 0xF0, 0xE6]) <= 2, axis=-1)
    assert warn.sum() > 20_000
