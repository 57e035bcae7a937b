"""`flipguard ra`: Resiliency Accuracy under a hardware exposure model.

Works on a run directory (the detector, image-level accuracy at the deployed threshold) or on
a bring-your-own classifier (``--model pkg.mod:factory --weights W --data FILE.pt``, top-1
accuracy). Samples go to ``ra.sqlite`` and the result to ``ra.json`` in the run directory
(or ``--out``); see :mod:`flipguard.study.resiliency` and docs/resiliency-accuracy.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from flipguard.cli._common import console, escape, make_progress, print_json
from flipguard.cli.options import command, option
from flipguard.ra import Estimate, RAConfig
from flipguard.study.resiliency import RASource, estimate_run


def _split(text: str | None) -> tuple[str, ...]:
    return tuple(t.strip() for t in (text or "").split(",") if t.strip())


@dataclass(frozen=True)
class RASettings:
    """How to estimate: exposure model, estimator, stopping rule and interval, sites."""

    hardware: str = option("uniform", "--hardware",
                           help="uniform | memory | systolic | systolic:FILE.toml")
    estimator: str = option("mc", "--estimator", help="mc | is")
    target_margin: float = option(0.01, "--target-margin",
                                  help="Stop when the CI half-width is this small.")
    confidence: float = option(0.95, "--confidence", help="CI confidence level.")
    interval: str = option(
        "betting-cs", "--interval", help="betting-cs (confidence sequence, valid under the "
        "stopping rule) | eb-cs (empirical Bernstein) | clt (normal approximation: not "
        "valid under sequential stopping, for comparison).")
    max_samples: int = option(5000, "--max-samples", help="Sample budget.")
    min_samples: int = option(100, "--min-samples", help="Samples before stopping.")
    batch: int = option(64, "--batch", help="Samples per stopping check.")
    seed: int = option(0, "--seed", help="Sampling seed (same seed => same sites).")
    targets: str = option("weight,activation", "--targets",
                          help="Comma list of weight, bias, activation.")
    fmt: str = option("fp32", "--format", help="fp32 | fp16 | bf16 | int8.")
    layers: str | None = option(None, "--layers", help="Comma list of layers.")
    proposal: str = option(
        "adaptive", "--proposal", help="IS proposal: adaptive (criticality-predictor start, "
        "cell masses re-fitted every batch, no pilot) | criticality | bitfield | pilot | "
        "gradient.")
    alpha: float = option(0.2, "--alpha", help="Smallest defensive share of P in q "
                          "(P/q <= 1/alpha; adaptive picks a share >= alpha).")
    pilot: int = option(2, "--pilot", help="Pilot faults per stratum (--proposal pilot).")

    def config(self) -> RAConfig:
        cfg = RAConfig(hardware=self.hardware, estimator=self.estimator,
                       proposal=self.proposal, alpha=self.alpha, pilot=self.pilot,
                       target_margin=self.target_margin, confidence=self.confidence,
                       max_samples=self.max_samples, min_samples=self.min_samples,
                       batch=self.batch, seed=self.seed, targets=_split(self.targets),
                       fmt=self.fmt, layers=_split(self.layers) or None,
                       interval=self.interval)
        cfg.validate()
        return cfg


@dataclass(frozen=True)
class SourceArgs:
    """Whose RA (with RUN or --model) and where the files go."""

    model: str | None = option(None, "--model", help="Classifier 'pkg.module:factory'.")
    weights: Path | None = option(None, "--weights", help="State dict for --model.")
    data: Path | None = option(None, "--data", help=".pt with 'inputs' and 'labels'.")
    images: int | None = option(None, "--images", help="Evaluate this many inputs.")
    out: Path | None = option(None, "--out", help="Output dir (default: RUN or --data's).")
    data_dir: Path | None = option(None, "--data-dir", help="Override the run's data.")

    def source(self, run: Path | None) -> RASource:
        src = RASource(run, self.model, self.weights, self.data, self.images, self.data_dir,
                       self.out)
        src.check()
        return src


def _table(res: dict[str, Any]) -> Table:
    t = Table(title=escape(f"Resiliency Accuracy ({res['hardware']}, {res['estimator']})"))
    t.add_column("quantity")
    t.add_column("value", justify="right")
    lo, hi = res["ci"]
    rows = [("RA", f"{res['ra']:.4f}"), (f"{res['confidence']:.0%} CI", f"[{lo:.4f}, {hi:.4f}]"),
            ("golden accuracy", f"{res['golden_accuracy']:.4f}"),
            ("accuracy drop", f"{res['accuracy_drop']:.4f}"), ("samples", str(res["samples"])),
            ("new injections", str(res["injections"])),
            ("MC-equivalent samples (ESS)", f"{res['ess']:.1f}"),
            ("interval", str(res.get("interval"))), ("stopped", str(res["stopped"]))]
    rows += [(f"P({k})", f"{v:.3f}") for k, v in res["exposure_share"].items()]
    for k, v in rows:
        t.add_row(escape(k), escape(v))
    return t


@command
def ra(run: Path | None = typer.Argument(None, help="Run directory (or --model/--weights/--data)."),
       *, settings: RASettings, where: SourceArgs,
       reweight_from: str | None = typer.Option(
           None, "--reweight-from", help="Re-weight stored samples of this hardware instead "
           "of injecting."),
       fresh: bool = typer.Option(False, "--fresh", help="Discard the existing ra.sqlite."),
       json_out: bool = typer.Option(False, "--json", help="Print the result as JSON.")) -> None:
    """Resiliency Accuracy: accuracy given that a transient fault hit a site drawn from a
    hardware exposure model, with a confidence interval."""
    cfg, source = settings.config(), where.source(run)
    bar = make_progress()  # started with the first estimate: errors before it stay one line
    task = bar.add_task("RA samples", total=cfg.max_samples, info="")

    def show(est: Estimate) -> None:
        bar.start()
        bar.update(task, completed=est.samples, info=f"RA={est.ra:.4f} ± {est.half_width:.4f}")

    try:
        res = estimate_run(source, cfg, reweight_from=reweight_from, fresh=fresh,
                           progress=None if json_out else show)
    finally:
        bar.stop()
    if json_out:
        return print_json(res.to_dict())
    console.print(_table(res.result))
    console.print(f"saved {escape(str(res.path))}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the ``ra`` command to ``app``."""
    app.command("ra")(ra)
