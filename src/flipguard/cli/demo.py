"""The end-to-end demo behind `flipguard demo` (and `make demo`).

It exercises every landed capability on the built-in synthetic dataset in a few minutes on 2
CPU cores, through the same CLI verbs a user types: synth → train → evaluate → campaign plan
and run → cfr per layer and per bit → the same campaign with certified outcomes, then
stratified with the certified faults counted instead of sampled → harden →
resiliency accuracy → report → SFI validated against exhaustive injection of the first layer
→ a user's own model as a run (``init``) → a two-object study with cross-object figures → a
small architecture search."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any

from rich.console import Console

console = Console(stderr=True)



def _copy_run(src: Path, dst: Path) -> Path:
    """A copy of run ``src``'s model, config and metrics (no campaign) at ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("model.pt", "config.json", "metrics.json"):
        shutil.copy2(src / name, dst / name)
    return dst

def _cli(*args: Any) -> None:
    """Run one `flipguard` verb in-process, exactly as typed on the command line."""
    from flipguard.cli import app

    argv = [str(a) for a in args]
    console.print(f"[dim]$ flipguard {' '.join(argv)}[/]")
    app(argv, standalone_mode=False)


def run_demo(
    out: str | Path,
    *,
    size: int = 64,
    epochs: int = 30,
    seed: int = 0,
    error: float = 0.1,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Run the demo into ``out``; returns a summary of where results are."""
    out = Path(out)
    data_dir, run_dir = out / "data", out / "run"
    steps = ["synth", "train", "evaluate", "campaign", "cfr", "certify", "harden", "ra",
             "report", "validate", "init", "study", "nas"]
    has_ra = importlib.util.find_spec("flipguard.cli.ra") is not None
    if not has_ra:
        steps.remove("ra")
    total = len(steps)

    def step(name: str, title: str) -> None:
        console.rule(f"[bold]{steps.index(name) + 1}/{total} {title}")

    step("synth", "synthetic surface-defect dataset")
    _cli("synth", data_dir, "--n-train", 80, "--n-test", 60, "--size", size, "--seed", seed,
         "--overwrite")
    step("train", "train the CAE detector (threshold from normal validation images)")
    _cli("train", "--data", data_dir, "--out", run_dir, "--size", size, "--width", 0.5,
         "--latent", 32, "--epochs", epochs, "--batch-size", 16, "--lr", 1e-3, "--smooth", 1.0,
         "--schedule", "cosine", "--ema", 0.9, "--memory", 16, "--seed", seed)
    step("evaluate", "evaluate the detector")
    _cli("evaluate", run_dir)
    step("campaign", "statistical fault-injection campaign (layer-wise, Leveugle sample sizes)")
    opts = ["--strata", "layer", "--error", error, "--confidence", confidence, "--seed", seed]
    _cli("campaign", "plan", run_dir, *opts)
    _cli("campaign", "run", run_dir, *opts)
    step("cfr", "critical failure rate per layer and per bit")
    _cli("cfr", run_dir, "--by", "layer")
    _cli("cfr", run_dir, "--by", "bit")
    step("certify", "the same campaign with certification: faults' images whose decision is "
         "proven unchanged are not simulated; the same CFR")
    cert_dir = _copy_run(run_dir, out / "run-certified")
    _cli("campaign", "run", cert_dir, *opts, "--certify")
    _cli("cfr", cert_dir, "--by", "network")
    console.print("[dim]criticality-stratified, the certified faults counted exactly and "
                  "only the uncertified remainder sampled:[/dim]")
    rem_dir = _copy_run(run_dir, out / "run-remainder")
    rem = [*opts, "--sampling", "stratified", "--exclude-certified", "--layers",
           "decoder.12,decoder.14,decoder.16"]
    _cli("campaign", "plan", rem_dir, *rem, "--probe", 0)
    _cli("campaign", "run", rem_dir, *rem)
    _cli("cfr", rem_dir, "--by", "layer")
    console.print("[dim]the next stratified plan learns from this campaign's calibration "
                  "(RUN/criticality/calibration.json): class groups and class priors chosen "
                  "before drawing, the certificates reused:[/dim]")
    next_dir = _copy_run(run_dir, out / "run-calibrated")
    for sub in ("criticality", "certificates"):
        if (rem_dir / sub).is_dir():
            shutil.copytree(rem_dir / sub, next_dir / sub, dirs_exist_ok=True)
    _cli("campaign", "plan", next_dir, *rem, "--probe", 0)
    step("harden", "selective hardening under a 3 % memory budget, paired re-injection")
    _cli("harden", run_dir, "--budget", 0.03)
    if has_ra:
        step("ra", "resiliency accuracy under a systolic-array exposure model")
        _cli("ra", run_dir, "--hardware", "systolic", "--estimator", "is",
             "--target-margin", 0.02, "--max-samples", 400, "--seed", seed)
    step("report", "self-contained HTML report")
    _cli("report", run_dir)
    step("validate", "statistical fault injection against exhaustive injection (first layer)")
    _cli("validate", run_dir, "--layer", "encoder.0", "--images", 16, "--bits",
         "20,21,22,23,24,25,26,27,28,29,30,31", "--margins", "0.02,0.05", "--replications",
         500, "--workers", 2)
    step("init", "your own model as a run: a user's autoencoder file, then a campaign on it")
    user = out / "user_model.py"
    user.write_text(USER_MODEL)
    user_run = out / "user-run"
    _cli("init", user_run, "--model", f"{user}:autoencoder", "--data", data_dir, "--size", size,
         "--task", "tolerance", "--atol", 0.05)
    _cli("campaign", "run", user_run, *opts, "--images", 16)
    _cli("cfr", user_run, "--by", "layer", "--criterion", "any-flip")
    step("study", "two objects at once: train (threshold from 3-fold out-of-fold scores of "
         "every normal image) → campaign → CFR → harden → report each, then figures across "
         "objects")
    objects = out / "objects"
    for i, name in enumerate(("tiles", "plates")):
        _cli("synth", objects / name, "--n-train", 40, "--n-test", 20, "--size", 32, "--seed",
             seed + 1 + i, "--overwrite")
    _cli("study", objects, "--out", out / "study", "--size", 32, "--width", 0.25, "--epochs",
         5, "--cv-folds", 3, "--strata", "layer", "--error", 0.3, "--confidence", 0.9,
         "--images", 10, "--budget", 0.05)
    step("nas", "resilience-aware architecture search (a few trials, tiny budget)")
    _cli("nas", "--data", data_dir, "--out", out / "nas", "--trials", 4, "--size", 32,
         "--screen-epochs", 2, "--screen-samples", 64, "--full-epochs", 3, "--ra-max-samples",
         128, "--ra-images", 16, "--front-max", 2, "--startup-trials", 2, "--no-uniform")
    return {
        "dataset": str(data_dir),
        "run": str(run_dir),
        "campaign store": str(run_dir / "campaign.sqlite"),
        "certified campaign": str(cert_dir / "campaign.sqlite"),
        "report": str(run_dir / "report.html"),
        "validation": str(run_dir / "validate" / "encoder.0.png"),
        "your model": str(user_run),
        "study": str(out / "study" / "study.html"),
        "architecture search": str(out / "nas"),
    }


USER_MODEL = '''"""A user's own model file (written by the demo): flipguard imports it because the
user named it on the command line, and signs the run so later verbs open it."""
import torch
from torch import nn


def autoencoder(channels: int = 1, width: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(channels, width, 4, 2, 1), nn.ReLU(),
        nn.Conv2d(width, width, 4, 2, 1), nn.ReLU(),
        nn.ConvTranspose2d(width, width, 4, 2, 1), nn.ReLU(),
        nn.ConvTranspose2d(width, channels, 4, 2, 1), nn.Sigmoid())
'''
