"""The reliability report: files, valid images, tables equal to the analysis API, partial and
missing campaigns, self-containment, escaping, section registry and CLI."""

from __future__ import annotations

import base64
import csv
import json
import math
import re
import shutil
import xml.etree.ElementTree as ET
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from flipguard.campaign import runner as rn
from flipguard.campaign.analysis import cfr_table
from flipguard.campaign.planner import PlanConfig
from flipguard.campaign.stats import t_value
from flipguard.campaign.store import CampaignStore, store_path
from flipguard.cli.report import register
from flipguard.criticality.predictor import CLASS_LABELS, CLASS_PRIORS
from flipguard.data import make_synthetic
from flipguard.models import CAEConfig, build_cae
from flipguard.report import (
    SECTIONS,
    CampaignData,
    Figure,
    Note,
    Paragraph,
    ReportContext,
    Section,
    make_sections,
    render_report,
    section,
)
from flipguard.report.figures_detector import roc_points
from flipguard.report.summary import summary_lines
from flipguard.study import rundir as fgrun
from flipguard.study.detector import evaluate_run
from flipguard.study.engines import RunEngineFactory
from flipguard.study.hardening import harden_run
from flipguard.study.predictors import calibration_table
from flipguard.study.reports import build_report, calibration_data

CRIT = "accuracy-drop:0.01"
ODD_DIR = "data <&> \"x\""  # user string that must be escaped in the HTML
PLAN = PlanConfig(strata="layer", error=0.2, confidence=0.9)


class Page(HTMLParser):
    """Tables (by data-name: header keys + rows of (data-value, text)), tags and text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: dict[str, dict] = {}
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self._cell: list | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "table":
            self._t = self.tables.setdefault(a["data-name"], {"keys": [], "rows": []})
        elif tag == "th":
            self._t["keys"].append(a["data-key"])
        elif tag == "tr":
            self._t["rows"].append([])
        elif tag == "td":
            self._cell = [a["data-value"], ""]

    def handle_endtag(self, tag):
        if tag == "td":
            self._t["rows"][-1].append(tuple(self._cell))
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell[1] += data

    def rows(self, name: str) -> list[dict[str, tuple[str, str]]]:
        t = self.tables[name]
        return [dict(zip(t["keys"], r, strict=True)) for r in t["rows"] if r]


def make_run(root: Path, campaign_limit: int | None | str = None) -> Path:
    """Tiny CAE + tiny synthetic MVTec-layout dataset + (optionally) a real campaign."""
    torch.set_num_threads(1)  # module fixtures run before conftest's autouse fixture
    data = make_synthetic(root / ODD_DIR, n_train=4, n_test=6, size=16, seed=0)
    cfg = CAEConfig(input_size=16, width=0.125, latent_dim=4)
    rc = fgrun.RunConfig(data=fgrun.DataSection(path=str(data), size=16, channels=1),
                         model=fgrun.ModelSection(kind="cae", params=cfg.model_dump()),
                         score={"map": "l2", "smooth_sigma": 0.0, "reduce": "max"},
                         threshold=fgrun.ThresholdSection(value=0.05))
    run_dir = fgrun.save_run(root / "run", rc, build_cae(cfg))
    fgrun.save_metrics(run_dir, evaluate_run(fgrun.load_run(run_dir)))
    if campaign_limit != "none":
        factory = RunEngineFactory(str(run_dir))
        with rn.open_campaign(run_dir, PLAN, factory) as store:
            rn.run_campaign(store, factory, limit=campaign_limit)
    return run_dir


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    run_dir = make_run(tmp_path_factory.mktemp("full"))
    harden_run(run_dir, budget=0.03, n_boot=200)  # writes RUN/hardening.json
    html = build_report(run_dir, CRIT, examples=4)
    return run_dir, html, Page(html.read_text())


FIGURES = {"cfr_layer", "cfr_bit", "cfr_bit_per_layer", "cfr_kernel_encoder-0",
           "cfr_kernel_decoder-16", "cfr_layer_bit_heatmap", "detector_roc",
           "detector_scores", "detector_examples", "hardening_curve", "criticality_calibration"}


def test_every_figure_is_written_valid_and_embedded(full):
    run_dir, html, page = full
    assert html == run_dir / "report.html" and (run_dir / "report.md").is_file()
    figdir = run_dir / "report" / "figures"
    assert {p.stem for p in figdir.glob("*.png")} == FIGURES
    assert {p.stem for p in figdir.glob("*.svg")} == FIGURES
    embedded = [a["src"] for t, a in page.tags if t == "img"]
    assert len(embedded) == len(FIGURES)
    for name in FIGURES:
        png = (figdir / f"{name}.png").read_bytes()
        with Image.open(figdir / f"{name}.png") as im:  # full decode validates it
            assert im.format == "PNG" and im.width > 200 and im.height > 150
            assert np.asarray(im.convert("L")).std() > 5  # not blank
        assert ET.parse(figdir / f"{name}.svg").getroot().tag.endswith("svg")
        assert f"data:image/png;base64,{base64.b64encode(png).decode()}" in embedded
    md = (run_dir / "report.md").read_text()
    assert ODD_DIR not in md and 'data &lt;&amp;&gt; "x"' in md  # Markdown passes raw HTML
    for link in re.findall(r"\]\((report/figures/[^)]+)\)", md):
        assert (run_dir / link).is_file()
    assert len(re.findall(r"\]\(report/figures/", md)) == len(FIGURES)


def _check_rows(page_rows, api_rows, keys):
    assert len(page_rows) == len(api_rows) > 0
    for got, want in zip(page_rows, api_rows, strict=True):
        for k in keys:
            assert got[k][0] == str(want[k])
        for k in ("n", "critical", "N"):
            assert (int(got[k][0]), got[k][1]) == (want[k], f"{want[k]:,}")
        for k, v in (("cfr", want["cfr"]), ("margin", want["margin"]),
                     ("ci_low", want["ci"][0]), ("ci_high", want["ci"][1])):
            assert float(got[k][0]) == v  # exact value in data-value
            assert float(got[k][1]) == pytest.approx(100 * v, rel=1e-3, abs=1e-9)  # shown


def _margin_sentence(run_dir: Path, so_far: str = "") -> str:
    net = cfr_table(run_dir, by=(), criterion=CRIT)[0]
    shown = "0" if net["margin"] == 0 else f"{100 * net['margin']:.4g}"
    return f"Network CFR margin achieved{so_far}: ±{shown} % at 90 % confidence"


def test_html_tables_equal_the_analysis_api(full):
    run_dir, _, page = full
    layer = cfr_table(run_dir, by=("layer",), criterion=CRIT)
    convs = (torch.nn.Conv2d, torch.nn.ConvTranspose2d)
    assert [r["layer"] for r in layer] == [
        n for n, m in fgrun.load_run(run_dir).model.named_modules() if isinstance(m, convs)]
    _check_rows(page.rows("cfr_layer"), layer, ["layer"])
    assert [r["type"][0] for r in page.rows("cfr_layer")][:1] == ["Conv2d"]
    _check_rows(page.rows("cfr_bit"), cfr_table(run_dir, by=("bit",), criterion=CRIT), ["bit"])
    _check_rows(page.rows("cfr_field"), cfr_table(run_dir, by=("field",), criterion=CRIT),
                ["field"])
    lk = cfr_table(run_dir, by=("layer", "kernel"), criterion=CRIT)
    for name, slug in (("encoder.0", "encoder-0"), ("decoder.16", "decoder-16")):
        _check_rows(page.rows(f"cfr_kernel_{slug}"),
                    sorted((r for r in lk if r["layer"] == name), key=lambda r: r["kernel"]),
                    ["layer", "kernel"])
    lb = cfr_table(run_dir, by=("layer", "bit"), criterion=CRIT)
    got = {(r["layer"][0], int(r["bit"][0])): float(r["cfr"][0])
           for r in page.rows("cfr_layer_bit")}
    assert got == {(r["layer"], r["bit"]): r["cfr"] for r in lb}
    # CSV behind the figure holds the same numbers
    with open(run_dir / "report" / "cfr_layer.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["cfr"]) for r in rows] == [r["cfr"] for r in layer]
    assert [float(r["ci_high"]) for r in rows] == [r["ci"][1] for r in layer]
    # plan vs executed per stratum, from the store itself
    with CampaignStore(store_path(run_dir)) as store:
        planned = {s.key: s.n for s in store.strata()}
        done = Counter(pf.stratum for pf, _ in store.results())
    strata = page.rows("campaign_strata")
    assert {r["key"][0]: int(r["planned"][0]) for r in strata} == planned
    assert {r["key"][0]: int(r["done"][0]) for r in strata} == done
    # the summary names the layer with the highest CFR
    text = " ".join(page.text)
    assert f"most vulnerable layer is {max(layer, key=lambda r: r['cfr'])['layer']} (" in text
    assert "(complete)" in text and "Partial campaign" not in text
    assert _margin_sentence(run_dir) in text


def test_detector_and_hardening_numbers(full):
    run_dir, _, page = full
    h = json.loads((run_dir / "hardening.json").read_text())
    measured = page.rows("hardening_measured")
    assert [(int(r["n"][0]), int(r["critical"][0]), float(r["cfr"][0])) for r in measured] == [
        (h[k]["n"], h[k]["critical"], h[k]["cfr"]) for k in ("cfr_before", "cfr_after")]
    assert any(t.startswith("Hardening: with ") and "measured CFR" in t for t in page.text)
    metrics = fgrun.load_run(run_dir).metrics
    shown = {r["metric"][1]: r["value"][0] for r in page.rows("detector_metrics")}
    assert float(shown["image_auroc"]) == metrics["image_auroc"]
    assert float(shown["threshold"]) == 0.05
    scores = page.rows("detector_scores")
    labels = [int(r["label"][0]) for r in scores]
    assert len(scores) == 6 and sum(labels) == 3
    s = np.array([float(r["score"][0]) for r in scores])
    assert roc_points(labels, s)[2] == pytest.approx(metrics["image_auroc"])
    assert [r["anomalous"][1] for r in scores] == ["yes" if v > 0.05 else "no" for v in s]


def test_calibration_section_matches_the_executed_faults(full):
    run_dir, _, page = full
    rows = page.rows("criticality_calibration")
    with CampaignStore(store_path(run_dir)) as store:
        done = store.counts()["done"]
    assert done > 0 and [r["label"][1] for r in rows] == list(CLASS_LABELS)
    assert [float(r["predicted"][0]) for r in rows] == list(CLASS_PRIORS)
    n = [int(r["n"][0]) for r in rows]
    k = [int(r["critical"][0]) for r in rows]
    assert sum(n) == done  # every executed fault has exactly one predicted class
    assert sum(k) == cfr_table(run_dir, by=(), criterion=CRIT)[0]["critical"]
    for r, ni, ki in zip(rows, n, k, strict=True):
        if ni:
            assert float(r["observed"][0]) == ki / ni
            assert float(r["ci_low"][0]) <= ki / ni <= float(r["ci_high"][0])
        else:
            assert r["observed"] == ("", "—")
    # the same numbers as the API at the plan's confidence, with the predictor it cached
    api = calibration_table(run_dir, CRIT, PLAN.confidence)
    assert [(int(r["n"][0]), float(r["ci_low"][0]), float(r["ci_high"][0])) for r in rows] == [
        (a["n"], a["ci"][0], a["ci"][1]) for a in api]
    assert list((run_dir / "criticality").glob("*.pt"))
    ids = [a["id"] for t, a in page.tags if t == "section"]
    assert ids.index("cfr-per-layer-and-bit") < ids.index("predicted-vs-observed-criticality") \
        < ids.index("hardening")
    assert any(a.get("id") == "fig-criticality_calibration" for t, a in page.tags
               if t == "figure")


def test_calibration_fails_soft_when_the_predictor_cannot_be_built(full, monkeypatch):
    run_dir, _, _ = full
    camp = CampaignData(CRIT, "wilson", 0.9, "fp32", PLAN.to_dict(), 1, 1, 1, [],
                        {"network": [{"n": 1}]})

    def broken(*args, **kwargs):
        raise RuntimeError("no gradients here\nsecond line")

    monkeypatch.setattr("flipguard.study.predictors.predictor_for_run", broken)
    data = calibration_data(run_dir, camp)
    assert data["error"] == "RuntimeError: no gradients here" and "rows" not in data
    ctx = ReportContext(run_dir, extras={"calibration": data})
    sec = next(s for s in make_sections(ctx) if s.title == "Predicted vs observed criticality")
    assert [type(b) for b in sec.blocks] == [Note] and "no gradients here" in sec.blocks[0].text
    assert calibration_data(run_dir, None) is None  # no campaign
    camp.tables = {}  # no classified results
    assert calibration_data(run_dir, camp) is None


def test_roc_points_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.normal(y, 1.0), 1)  # many ties
    fpr, tpr, auc = roc_points(y, s)
    assert auc == pytest.approx(roc_auc_score(y, s))
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1 and np.all(np.diff(fpr) >= 0)
    assert roc_points(y, np.where(y == 1, np.nan, s))[2] == 1.0


def test_html_is_self_contained_and_escaped(full):
    run_dir, html, page = full
    assert not [t for t, _ in page.tags if t in ("link", "script", "iframe", "object", "embed")]
    for _, a in page.tags:
        if "src" in a:
            assert a["src"].startswith("data:image/png;base64,")
        if "href" in a:
            assert a["href"].startswith("#")
            assert any(a2.get("id") == a["href"][1:] for _, a2 in page.tags)
    text = html.read_text()
    assert not re.search(r"(https?:|file:|url\()", text, re.I)
    assert ODD_DIR not in text and "data &lt;&amp;&gt; &quot;x&quot;" in text
    config = {r["key"][0]: r["value"][1] for r in page.rows("config")}
    assert config["data.path"].endswith(ODD_DIR)  # parsed back: the exact user string


def test_partial_campaign_is_flagged_with_current_margins(tmp_path):
    run_dir = make_run(tmp_path, campaign_limit=40)
    page = Page(build_report(run_dir, CRIT, examples=2).read_text())
    with CampaignStore(store_path(run_dir)) as store:
        counts = store.counts()
    assert counts["done"] == 40 < counts["planned"]
    warnings = [a for t, a in page.tags if t == "div" and a.get("class") == "note warning"]
    assert len(warnings) == 2  # summary + campaign section
    text = " ".join(page.text)
    assert f"only 40 of {counts['planned']:,} planned faults" in text
    plan = {r["item"][1]: r["value"][1] for r in page.rows("campaign_plan")}
    assert plan["executed faults"] == "40" and plan["planned faults"] == f"{counts['planned']:,}"
    strata = page.rows("campaign_strata")
    assert sum(int(r["done"][0]) for r in strata) == 40
    assert _margin_sentence(run_dir, " so far") in text
    for r in strata:  # margins achieved so far: t sqrt(p (1 - p) / n * fpc) per stratum
        n, k, N = int(r["done"][0]), int(r["critical"][0]), int(r["N"][0])
        if n == 0:
            assert r["margin"][0] == "" and r["met"][1] == "—"
        else:
            p = k / n
            want = t_value(0.9) * math.sqrt(p * (1 - p) / n * (N - n) / (N - 1))
            assert float(r["margin"][0]) == pytest.approx(want, abs=1e-12)
    assert (run_dir / "report" / "figures" / "cfr_layer.png").is_file()


def test_run_without_campaign_renders_detector_only(tmp_path):
    run_dir = make_run(tmp_path, campaign_limit="none")
    page = Page(build_report(run_dir, CRIT, examples=2).read_text())
    titles = [a["id"] for t, a in page.tags if t == "section"]
    assert titles == ["summary", "run-configuration", "detector", "fault-injection-campaign"]
    assert "No fault-injection campaign has been run" in " ".join(page.text)
    figs = {p.stem for p in (run_dir / "report" / "figures").glob("*.png")}
    assert figs == {"detector_roc", "detector_scores", "detector_examples"}
    assert not list((run_dir / "report").glob("cfr_*.csv"))
    # planned but not started: the campaign section says so, no CFR figure yet
    rn.open_campaign(run_dir, PLAN, RunEngineFactory(str(run_dir))).close()
    page = Page(build_report(run_dir, CRIT, examples=0).read_text())
    text = " ".join(page.text)
    assert "no fault has been executed yet" in text and "Campaign incomplete: 0 of" in text
    assert {p.stem for p in (run_dir / "report" / "figures").glob("*.png")} == {
        "detector_roc", "detector_scores"}  # stale example figure removed


def _hand_context(tmp_path: Path, kernel_layers=None) -> ReportContext:
    def row(**kw):
        n, k, N = kw.pop("n"), kw.pop("k"), kw.pop("N")
        p = k / n
        return {**kw, "n": n, "critical": k, "cfr": p, "ci": [p / 2, min(1, p * 2)],
                "N": N, "margin": p / 3}

    layers = {"conv1": "Conv2d", "fc": "Linear"}
    tables = {
        "network": [row(n=100, k=10, N=10_000)],
        "layer": [row(layer="fc", n=50, k=2, N=4000), row(layer="conv1", n=50, k=8, N=6000)],
        "bit": [row(bit=b, n=10, k=int(b == 30) * 9 + 1, N=300) for b in range(32)],
        "layer_kernel": [row(layer=lay, kernel=k, n=10, k=k, N=100)
                         for lay in layers for k in range(3)],
    }
    camp = CampaignData(CRIT, "wilson", 0.95, "fp32", {"error": 0.05, "strata": "layer"},
                        10_000, 100, 100, [], tables)
    curve = [{"budget": b, "overhead": b / 2, "expected_cfr_before": 0.1,
              "expected_cfr_after": 0.1 - b} for b in (0.0, 0.01, 0.03)]
    hardening = {"budget": 0.03, "overhead": 0.025, "expected_cfr_before": 0.1,
                 "expected_cfr_after": 0.02, "curve": curve,
                 "table": [{"protection": "tmr <b>", "bits": [30], "cost_bits": 64}]}
    resiliency = {"ra": 0.9, "ci": [0.88, 0.92], "confidence": 0.95, "hardware": "memory",
                  "exposure_by_layer": {"conv1": 0.7, "fc": 0.3},
                  "curve": [{"ber": 1e-7, "accuracy": 0.9}, {"ber": 1e-6, "accuracy": 0.75}]}
    return ReportContext(tmp_path / "run", layer_types=layers, campaign=camp,
                         kernel_layers=kernel_layers,
                         extras={"hardening": hardening, "resiliency": resiliency})


def test_hand_made_rows_registry_and_stale_assets(tmp_path):
    @section("Custom results", order=95)
    def custom(ctx):
        return Section("Custom results", [Paragraph("x < y")]) if ctx.extras.get("c") else None

    try:
        ctx = _hand_context(tmp_path)
        out = render_report(ctx, tmp_path / "out" / "rep.html")
        page = Page(out.read_text())
        ids = [a["id"] for t, a in page.tags if t == "section"]
        assert "custom-results" not in ids  # absent data -> no section
        assert ids[-2:] == ["hardening", "resiliency-and-accuracy"] and "detector" not in ids
        curve = page.rows("hardening_curve")
        after = [float(r["expected_cfr_after"][0]) for r in curve]
        assert after == [0.1 - b for b in (0.0, 0.01, 0.03)]
        assert [r["budget"][1] for r in curve] == ["0", "1", "3"]  # shown in %
        assert [r["accuracy"][1] for r in page.rows("resiliency_curve")] == ["90", "75"]
        assert [r["share"][1] for r in page.rows("resiliency_exposure_by_layer")] == ["70", "30"]
        figs = {p.stem for p in (tmp_path / "out" / "rep" / "figures").glob("*.png")}
        assert {"hardening_curve", "resiliency_curve", "cfr_layer", "cfr_bit"} <= figs
        text = " ".join(page.text)
        assert "most vulnerable layer is conv1 (Conv2d)" in text
        assert "Resiliency accuracy 90 % (95 % interval 88–92 %); exposure model memory." in text
        assert "CFR is expected to fall from 10 % to 2 % (planner estimate)" in text
        assert "Bit 30 (exponent) accounts for" in text
        share = 1.0 * 300 / (1.0 * 300 + 31 * 0.1 * 300)  # cfr_b * N_b / sum
        assert f"{100 * share:.1f} %" in text
        assert [r["layer"][0] for r in page.rows("cfr_layer")] == ["conv1", "fc"]  # net order
        assert page.rows("hardening_table")[0]["protection"][1] == "tmr <b>"
        assert "tmr &lt;b&gt;" in out.read_text()
        assert (tmp_path / "out" / "rep" / "figures" / "cfr_kernel_conv1.svg").is_file()
        ctx.kernel_layers, ctx.extras = ("fc",), {"c": 1}  # re-render to the same place
        render_report(ctx, out)
        assert "custom-results" in [a["id"] for t, a in Page(out.read_text()).tags
                                    if t == "section"]
        assets = tmp_path / "out" / "rep"
        assert not (assets / "figures" / "cfr_kernel_conv1.png").exists()
        assert not (assets / "cfr_kernel_conv1.csv").exists()
        assert (assets / "cfr_kernel_fc.csv").is_file()
        assert not list(assets.glob("hardening*.csv"))
        assert not list(assets.glob("figures/*_curve.*"))
        for r in ctx.campaign.tables["layer"]:
            r["cfr"] = 0.0  # nothing critical: no "most vulnerable layer" claim
        assert ("No critical fault has been observed in any layer so far (upper interval "
                "bounds up to 32 %).") in summary_lines(ctx)
    finally:
        SECTIONS.pop("Custom results", None)


CAL_ROWS = [  # one class never executed, one without a critical fault, one miscalibrated
    {"class": 0, "label": "harmless", "predicted": 0.002, "n": 400, "critical": 0,
     "observed": 0.0, "ci": [0.0, 0.0095]},
    {"class": 1, "label": "low", "predicted": 0.02, "n": 120, "critical": 5,
     "observed": 5 / 120, "ci": [0.018, 0.094]},
    {"class": 2, "label": "borderline", "predicted": 0.2, "n": 40, "critical": 9,
     "observed": 9 / 40, "ci": [0.123, 0.374]},
    {"class": 3, "label": "critical", "predicted": 0.6, "n": 30, "critical": 29,
     "observed": 29 / 30, "ci": [0.833, 0.994]},
    {"class": 4, "label": "extreme", "predicted": 0.95, "n": 0, "critical": 0,
     "observed": None, "ci": [0.0, 1.0]},
]


def test_calibration_section_from_hand_made_rows(tmp_path):
    cal = {"criterion": CRIT, "confidence": 0.95, "source": "predictor", "rows": CAL_ROWS}
    ctx = ReportContext(tmp_path / "run", extras={"calibration": cal})
    out = render_report(ctx, tmp_path / "rep.html")
    page = Page(out.read_text())
    assert "predicted-vs-observed-criticality" in [a["id"] for t, a in page.tags
                                                   if t == "section"]
    got = page.rows("criticality_calibration")
    assert [r["label"][1] for r in got] == [r["label"] for r in CAL_ROWS]
    for g, want in zip(got, CAL_ROWS, strict=True):
        assert (int(g["class"][0]), int(g["n"][0]), int(g["critical"][0])) == (
            want["class"], want["n"], want["critical"])
        assert float(g["predicted"][0]) == want["predicted"]
        assert (float(g["ci_low"][0]), float(g["ci_high"][0])) == tuple(want["ci"])
        if want["observed"] is None:
            assert g["observed"] == ("", "—")
        else:
            assert float(g["observed"][0]) == want["observed"]
            assert float(g["observed"][1]) == pytest.approx(100 * want["observed"], rel=1e-3)
    assert [r["predicted"][1] for r in got] == ["0.2", "2", "20", "60", "95"]  # in %
    text = " ".join(page.text)
    assert "Prior outside the observed interval: critical 96.67 % (83.3–99.4 %) vs 60 %" in text
    assert "95 % Wilson intervals" in text
    png = tmp_path / "rep" / "figures" / "criticality_calibration.png"
    embedded = [a["src"] for t, a in page.tags if t == "img"]
    assert embedded == [f"data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}"]
    with Image.open(png) as im:
        assert im.width > 200 and np.asarray(im.convert("L")).std() > 5
    with open(tmp_path / "rep" / "criticality_calibration.csv") as fh:
        assert [int(r["n"]) for r in csv.DictReader(fh)] == [r["n"] for r in CAL_ROWS]
    # no class executed yet: table only, no figure
    cal["rows"] = [{**r, "n": 0, "critical": 0, "observed": None} for r in CAL_ROWS]
    sec = next(s for s in make_sections(ctx) if s.title == "Predicted vs observed criticality")
    assert not [b for b in sec.blocks if isinstance(b, Figure)]
    assert "No executed fault has a predicted class yet." in [
        b.text for b in sec.blocks if isinstance(b, Paragraph)]


def test_calibration_section_absent_without_data(tmp_path):
    titles = [s.title for s in make_sections(ReportContext(tmp_path / "run"))]
    assert "Predicted vs observed criticality" not in titles and "Summary" in titles
    page = Page(render_report(_hand_context(tmp_path), tmp_path / "r.html").read_text())
    assert "predicted-vs-observed-criticality" not in [a["id"] for t, a in page.tags
                                                       if t == "section"]
    assert "criticality_calibration" not in page.tables
    assert not (tmp_path / "r" / "figures" / "criticality_calibration.png").exists()


def test_cli_report_and_one_line_errors(tmp_path):
    run_dir = make_run(tmp_path, campaign_limit="none")
    register(app := typer.Typer())
    app.command("noop")(lambda: None)
    runner = CliRunner()
    out = tmp_path / "elsewhere" / "r.html"
    res = runner.invoke(app, ["report", str(run_dir), "--out", str(out), "--examples", "0",
                              "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["html"] == str(out) and out.is_file() and info["complete"] is None
    assert out.with_suffix(".md").is_file() and (out.parent / "r/detector_metrics.csv").is_file()
    assert not (run_dir / "report.html").exists()
    for args, needle in (([str(run_dir), "--criterion", "bogus"], "criterion"),
                         ([str(run_dir), "--method", "nope"], "method"),
                         ([str(tmp_path / "missing")], "missing")):
        res = runner.invoke(app, ["report", *args])
        assert res.exit_code == 2 and needle in res.output
        assert len(res.output.strip().splitlines()) == 1
    shutil.rmtree(tmp_path / ODD_DIR)  # dataset gone: still renders, with a note
    res = runner.invoke(app, ["report", str(run_dir), "--examples", "0"])
    assert res.exit_code == 0, res.output
    text = " ".join(Page((run_dir / "report.html").read_text()).text)
    assert "Detector figures omitted" in text
