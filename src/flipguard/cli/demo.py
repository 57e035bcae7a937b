"""The end-to-end demo behind `flipguard demo` (and `make demo`).

It exercises every landed capability on the built-in synthetic dataset in a few minutes on
2 CPU cores, through the same CLI verbs a user types: synth → train → evaluate → campaign plan
and run → cfr per layer and per bit → harden → resiliency accuracy → report.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from rich.console import Console

console = Console(stderr=True)


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
    steps = ["synth", "train", "evaluate", "campaign", "cfr", "harden", "ra", "report"]
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
         "--seed", seed)
    step("evaluate", "evaluate the detector")
    _cli("evaluate", run_dir)
    step("campaign", "statistical fault-injection campaign (layer-wise, Leveugle sample sizes)")
    opts = ["--strata", "layer", "--error", error, "--confidence", confidence, "--seed", seed]
    _cli("campaign", "plan", run_dir, *opts)
    _cli("campaign", "run", run_dir, *opts)
    step("cfr", "critical failure rate per layer and per bit")
    _cli("cfr", run_dir, "--by", "layer")
    _cli("cfr", run_dir, "--by", "bit")
    step("harden", "selective hardening under a 3 % memory budget, paired re-injection")
    _cli("harden", run_dir, "--budget", 0.03)
    if has_ra:
        step("ra", "resiliency accuracy under a systolic-array exposure model")
        _cli("ra", run_dir, "--hardware", "systolic", "--estimator", "is",
             "--target-margin", 0.02, "--max-samples", 400, "--seed", seed)
    step("report", "self-contained HTML report")
    _cli("report", run_dir)
    return {
        "dataset": str(data_dir),
        "run": str(run_dir),
        "campaign store": str(run_dir / "campaign.sqlite"),
        "report": str(run_dir / "report.html"),
    }
