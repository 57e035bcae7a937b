"""`flipguard ra`: Resiliency Accuracy under a hardware exposure model.

Works on a run directory (the detector, image-level accuracy at the deployed threshold) or on
a bring-your-own classifier (``--model pkg.mod:factory --weights W --data FILE.pt``, top-1
accuracy). Samples go to ``ra.sqlite`` and the result to ``ra.json`` in the run directory
(or ``--out``). Schema: docs/resiliency-accuracy.md.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.table import Table

from flipguard.cli._common import cli_errors, console, print_json
from flipguard.errors import ConfigError

RESULT_FILE = "ra.json"
SCHEMA = "flipguard.ra/1"


def _fingerprint(*arrays: Any) -> str:
    import torch

    h = hashlib.sha256()
    for a in arrays:
        t = torch.as_tensor(np.ascontiguousarray(a)) if not isinstance(a, torch.Tensor) else a
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _subset(n: int, images: int | None) -> np.ndarray:
    if images is None:
        return np.arange(n)
    if images < 1:
        raise ConfigError(f"--images: expected a positive count, got {images}")
    return np.unique(np.linspace(0, n - 1, min(images, n)).round().astype(np.int64))


def engine_for_run(run_dir: Path, images: int | None, fmt: str, data_dir: Path | None):
    """``(engine, fingerprints, source)`` of a run directory's detector on its test images."""
    import torch

    from flipguard.inject import DetectionTask, Engine
    from flipguard.run import load_run

    run = load_run(run_dir)
    ds = run.load_data(data_dir)
    idx = _subset(len(ds.test), images)
    inputs, labels = ds.test[torch.as_tensor(idx)], np.asarray(ds.test_labels)[idx]
    task = json.dumps({"threshold": run.threshold, "score": run.config.score, "fmt": fmt},
                      sort_keys=True)
    fps = {"model": run.model_fingerprint(), "data": _fingerprint(inputs, labels),
           "task": hashlib.sha256(task.encode()).hexdigest()}
    engine = Engine(run.model, inputs, DetectionTask(run.scorer.scores, run.threshold, labels),
                    fmt=fmt)
    return engine, fps, {"run": str(run_dir)}


def engine_for_model(model: str, weights: Path | None, data: Path | None, images: int | None,
                     fmt: str):
    """``(engine, fingerprints, source)`` of a classifier factory on a ``.pt`` data file."""
    import torch

    from flipguard.inject import ClassificationTask, Engine
    from flipguard.models import load_model
    from flipguard.run import state_fingerprint

    if data is None:
        raise ConfigError("--data: required with --model (a .pt file with 'inputs' and "
                          "'labels' tensors)")
    net = load_model(model, str(weights) if weights is not None else None).eval()
    try:
        blob = torch.load(data, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"{data}: data file not found") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one line
        raise ConfigError(f"{data}: cannot load ({type(exc).__name__})") from None
    if not isinstance(blob, dict):
        raise ConfigError(f"{data}: expected a dict with 'inputs' and 'labels' tensors")
    for key in ("inputs", "labels"):
        if not isinstance(blob.get(key), torch.Tensor):
            raise ConfigError(f"{data}: field '{key}': expected a tensor")
    inputs, labels = blob["inputs"].float(), blob["labels"]
    if labels.dim() != 1 or labels.shape[0] != inputs.shape[0] or labels.is_floating_point():
        raise ConfigError(f"{data}: field 'labels': expected {inputs.shape[0]} integer labels "
                          f"(one per input), got shape {tuple(labels.shape)}")
    idx = torch.as_tensor(_subset(inputs.shape[0], images))
    inputs, labels = inputs[idx], labels[idx]
    fps = {"model": state_fingerprint(net.state_dict()), "data": _fingerprint(inputs, labels),
           "task": f"classification:{fmt}"}
    engine = Engine(net, inputs, ClassificationTask(labels.long()), fmt=fmt)
    return engine, fps, {"model": model, "weights": str(weights) if weights else None,
                         "data": str(data)}


def _reweighted(engine: Any, cfg: Any, store: Any, base_hw: str) -> dict[str, Any]:
    from flipguard.ra import build_exposure, max_ratio, result_dict, reweight

    want = {"targets": list(cfg.targets), "format": cfg.fmt,
            "layers": None if cfg.layers is None else list(cfg.layers)}
    found = [s for s in store.streams() if s["info"].get("hardware") == base_hw and s["samples"]
             and all(s["info"].get(k) == v for k, v in want.items())]
    if not found:
        raise ConfigError(f"--reweight-from: no stored samples for hardware {base_hw!r} with "
                          f"these targets/format in {store.path}")
    src = max(found, key=lambda s: s["samples"])
    x = engine.inputs[:1]
    p_base = build_exposure(engine.model, x, base_hw, cfg.targets, cfg.fmt, cfg.layers)
    p_new = build_exposure(engine.model, x, cfg.hardware, cfg.targets, cfg.fmt, cfg.layers)
    if not p_base.covers(p_new):
        raise ConfigError(f"--reweight-from: samples drawn under {base_hw!r} do not cover every "
                          f"site that {cfg.hardware!r} can hit; estimate it directly")
    sites, q, _, acc = store.samples(src["stream"])
    golden = float(engine.golden.accuracy)
    # every proposal of the stream satisfies q >= alpha * P_base (MC: q = P_base), so
    # P_new / q <= sup(P_new / P_base) / alpha: the term bound of a valid interval
    share = src["info"].get("alpha") if src["info"]["estimator"] == "is" else 1.0
    bound = max_ratio(p_new, p_base) / float(share or 1.0)
    est = reweight(sites, q, acc, p_new, golden, cfg.confidence, src["info"]["estimator"],
                   bound, cfg.interval)
    info = {**src["info"], "hardware": cfg.hardware, "hardware_config": p_new.info["config"]}
    return result_dict(est, cfg, p_new, info, src["stream"], 0, engine,
                       {"reweighted_from": {"hardware": base_hw, "stream": src["stream"]}})


def _save(out_dir: Path, result: dict[str, Any]) -> Path:
    from flipguard.fileio import json_clean
    from flipguard.run import atomic_write_text

    path = out_dir / RESULT_FILE
    by_hw: dict[str, Any] = {}
    if path.is_file():  # keep the other models' results of the same model/data/task
        try:
            old = json.loads(path.read_text())
            if old.get("fingerprints") == result.get("fingerprints"):
                by_hw = dict(old.get("by_hardware") or {})
        except (OSError, json.JSONDecodeError, AttributeError):
            by_hw = {}
    keep = ("ra", "ci", "accuracy_drop", "golden_accuracy", "samples", "ess", "estimator",
            "interval", "confidence", "stream", "exposure_share")
    by_hw[result["hardware"]] = {k: result.get(k) for k in keep}
    doc = {"schema": SCHEMA, **result, "by_hardware": by_hw}
    atomic_write_text(path, json.dumps(json_clean(doc), indent=2) + "\n")
    return path


def _table(res: dict[str, Any]) -> Table:
    t = Table(title=f"Resiliency Accuracy ({res['hardware']}, {res['estimator']})")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    lo, hi = res["ci"]
    rows = [("RA", f"{res['ra']:.4f}"), (f"{res['confidence']:.0%} CI", f"[{lo:.4f}, {hi:.4f}]"),
            ("golden accuracy", f"{res['golden_accuracy']:.4f}"),
            ("accuracy drop", f"{res['accuracy_drop']:.4f}"), ("samples", str(res["samples"])),
            ("new injections", str(res["injections"])),
            ("MC-equivalent samples (ESS)", f"{res['ess']:.1f}"),
            ("interval", str(res.get("interval"))), ("stopped", res["stopped"])]
    rows += [(f"P({k})", f"{v:.3f}") for k, v in res["exposure_share"].items()]
    for k, v in rows:
        t.add_row(k, v)
    return t


def ra(
    run: Path | None = typer.Argument(None, help="Run directory (or --model/--weights/--data)."),
    hardware: str = typer.Option("uniform", "--hardware",
                                 help="uniform | memory | systolic | systolic:FILE.toml"),
    estimator: str = typer.Option("mc", "--estimator", help="mc | is"),
    target_margin: float = typer.Option(0.01, "--target-margin",
                                        help="Stop when the CI half-width is this small."),
    confidence: float = typer.Option(0.95, "--confidence", help="CI confidence level."),
    interval: str = typer.Option(
        "betting-cs", "--interval", help="betting-cs (confidence sequence, valid under the "
        "stopping rule) | eb-cs (empirical Bernstein) | clt (normal approximation: not "
        "valid under sequential stopping, for comparison)."),
    max_samples: int = typer.Option(5000, "--max-samples", help="Sample budget."),
    min_samples: int = typer.Option(100, "--min-samples", help="Samples before stopping."),
    batch: int = typer.Option(64, "--batch", help="Samples per stopping check."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed (same seed => same sites)."),
    targets: str = typer.Option("weight,activation", "--targets",
                                help="Comma list of weight, bias, activation."),
    fmt: str = typer.Option("fp32", "--format", help="fp32 | fp16 | bf16 | int8."),
    layers: str | None = typer.Option(None, "--layers", help="Comma list of layers."),
    proposal: str = typer.Option(
        "adaptive", "--proposal", help="IS proposal: adaptive (criticality-predictor start, "
        "cell masses re-fitted every batch, no pilot) | criticality | bitfield | pilot | "
        "gradient."),
    alpha: float = typer.Option(0.2, "--alpha", help="Smallest defensive share of P in q "
                                "(P/q <= 1/alpha; adaptive picks a share >= alpha)."),
    pilot: int = typer.Option(2, "--pilot", help="Pilot faults per stratum (--proposal pilot)."),
    images: int | None = typer.Option(None, "--images", help="Evaluate this many inputs."),
    reweight_from: str | None = typer.Option(
        None, "--reweight-from", help="Re-weight stored samples of this hardware instead of "
        "injecting."),
    fresh: bool = typer.Option(False, "--fresh", help="Discard the existing ra.sqlite."),
    model: str | None = typer.Option(None, "--model", help="Classifier 'pkg.module:factory'."),
    weights: Path | None = typer.Option(None, "--weights", help="State dict for --model."),
    data: Path | None = typer.Option(None, "--data", help=".pt with 'inputs' and 'labels'."),
    out: Path | None = typer.Option(None, "--out", help="Output dir (default: RUN or --data's)."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Override the run's data."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Resiliency Accuracy: accuracy given that a transient fault hit a site drawn from a
    hardware exposure model, with a confidence interval."""
    from flipguard.ra import RAConfig, RAStore, resiliency_accuracy

    if run is None and model is None:
        raise ConfigError("RUN: expected a run directory or --model pkg.module:factory")
    if run is not None and model is not None:
        raise ConfigError("RUN: give a run directory or --model pkg.module:factory, not both")
    tl = tuple(t.strip() for t in targets.split(",") if t.strip())
    cfg = RAConfig(hardware=hardware, estimator=estimator, proposal=proposal, alpha=alpha,
                   pilot=pilot, target_margin=target_margin, confidence=confidence,
                   max_samples=max_samples, min_samples=min_samples, batch=batch, seed=seed,
                   targets=tl, fmt=fmt,
                   layers=tuple(s.strip() for s in layers.split(",")) if layers else None,
                   interval=interval)
    cfg.validate()
    if run is not None:
        engine, fps, source = engine_for_run(run, images, fmt, data_dir)
        out_dir = out or run
    else:
        assert model is not None
        engine, fps, source = engine_for_model(model, weights, data, images, fmt)
        out_dir = out or (data.parent if data is not None else Path("."))
    store = RAStore(Path(out_dir) / "ra.sqlite", fps, fresh=fresh)
    try:
        if reweight_from is not None:
            result = _reweighted(engine, cfg, store, reweight_from)
        elif json_out:
            result = resiliency_accuracy(engine, cfg, store)
        else:
            from flipguard.cli._core import make_progress

            with make_progress() as bar:
                task = bar.add_task("RA samples", total=max_samples, info="")

                def show(est: Any) -> None:
                    bar.update(task, completed=est.samples,
                               info=f"RA={est.ra:.4f} ± {est.half_width:.4f}")

                result = resiliency_accuracy(engine, cfg, store, progress=show)
    finally:
        store.close()
    result["source"], result["fingerprints"] = source, fps
    path = _save(Path(out_dir), result)
    if json_out:
        print_json({"schema": SCHEMA, **result})
        return
    console.print(_table(result))
    console.print(f"saved {path}")


def register(app: typer.Typer) -> None:
    """Add the ``ra`` command to ``app``."""
    app.command("ra")(cli_errors(ra))
