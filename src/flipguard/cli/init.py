"""`flipguard init RUN --model SPEC --data D --task …`: any PyTorch model as a run directory,
and the global ``--trust-code`` consent to import the model code a received run names."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer

from flipguard.cli._common import console, escape, print_json
from flipguard.cli.options import command
from flipguard.errors import ConfigError
from flipguard.study.initrun import TASKS, InitOptions, init_run
from flipguard.study.rundir import TRUST_ENV

SHOWN = ("task", "n_test", "accuracy", "image_auroc", "pixel_auroc", "aupro", "f1",
         "threshold", "n_parameters")


@command
def init(run: Path = typer.Argument(..., help="New run directory."),
         *,
         model: str = typer.Option(..., "--model", help="Factory: pkg.module:fn or "
                                   "path/file.py:fn (returns a torch.nn.Module)."),
         weights: Path | None = typer.Option(None, "--weights", help="State dict: .pt "
                                             "(weights_only) or .safetensors."),
         param: list[str] = typer.Option([], "--param", help="Factory keyword argument "
                                         "KEY=VALUE (VALUE read as JSON, else a string); "
                                         "repeatable."),
         data: Path = typer.Option(..., "--data", help="MVTec-layout root, or a .pt/.npz/"
                                   ".safetensors file with 'inputs' and 'labels'."),
         task: str = typer.Option("detection", "--task", help=" | ".join(TASKS)),
         category: str | None = typer.Option(None, "--category", help="MVTec category."),
         size: int = typer.Option(128, "--size", min=8, help="Image size (MVTec root)."),
         channels: int | None = typer.Option(None, "--channels", help="1 or 3 (default: "
                                             "as stored)."),
         resize: str = typer.Option("stretch", "--resize", help="stretch | fit"),
         fpr: float = typer.Option(0.05, "--fpr", help="Detection: target false-positive "
                                   "rate of the threshold (normal data only)."),
         score_map: str = typer.Option("l2", "--map", help="Detection: l2 | ssim | msgms"),
         atol: float = typer.Option(0.0, "--atol", help="Tolerance: absolute allowance."),
         rtol: float = typer.Option(0.0, "--rtol", help="Tolerance: relative allowance."),
         json_out: bool = typer.Option(False, "--json", help="Print metrics as JSON.")) -> None:
    """Make RUN from your own model: after it every verb (campaign, cfr, harden, ra, report,
    validate) works on RUN as on a trained CAE run."""
    opts = InitOptions(task=task, weights=None if weights is None else str(weights),
                       params=parse_params(param),
                       category=category, size=size, channels=channels, resize=resize,
                       fpr=fpr, atol=atol, rtol=rtol, score={"map": score_map})
    r = init_run(run, model, data, opts)
    if json_out:
        return print_json(r.metrics)
    shown = {k: r.metrics[k] for k in SHOWN if isinstance(r.metrics.get(k), (int, float, str))}
    console.print(" · ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                             for k, v in shown.items()))
    console.print(f"run written to [bold]{escape(str(r.path))}[/]")


def parse_params(items: list[str]) -> dict[str, Any]:
    """``["width=8", "name=a"]`` -> ``{"width": 8, "name": "a"}``.

    >>> parse_params(["width=8", "act=relu", "bias=true"])
    {'width': 8, 'act': 'relu', 'bias': True}
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ConfigError(f"--param: expected KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def trust_option(trust_code: bool = typer.Option(
        False, "--trust-code", help="Import and run the model code named by the run "
        "directories opened (received runs are refused without it).")) -> None:
    """Global options (before the verb)."""
    if trust_code:
        os.environ[TRUST_ENV] = "1"


def register(app: typer.Typer) -> None:
    """Add ``init`` and the global ``--trust-code`` option to ``app``."""
    app.command("init")(init)
    app.callback()(trust_option)
