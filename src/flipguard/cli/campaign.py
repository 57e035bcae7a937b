"""`flipguard campaign plan|run|status|export` and `flipguard cfr`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from flipguard.campaign.stats import DEFAULT_METHOD
from flipguard.cli._common import cli_errors, console, print_json
from flipguard.errors import ConfigError
from flipguard.layers import evenly_spaced
from flipguard.study.engines import RunEngineFactory

app = typer.Typer(help="Statistical fault-injection campaigns (plan, run, status, export).",
                  no_args_is_help=True)

STRATA_HELP = "network | layer | layer,bit | layer,field | layer,kernel, or a JSON strata file"


def _split(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    return parts or None


def _config(strata: str, error: float, confidence: float, p: str, fault_model: str,
            rounding: str, layers: str | None, targets: str, seed: int, fmt: str,
            sampling: str = "uniform", criterion: str = "accuracy-drop:0.01",
            target_margin: float | None = None, t: str = "exact", stuck_at: str = "all"):
    from flipguard.campaign.planner import PlanConfig

    user = None
    if strata.endswith(".json") or Path(strata).is_file():
        path = Path(strata)
        try:
            user = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: expected a readable JSON list of strata ({exc})") \
                from None
        if not isinstance(user, list) or not all(isinstance(d, dict) for d in user):
            raise ConfigError(f"{path}: expected a JSON list of strata objects")
    return PlanConfig(strata="layer" if user is not None else strata,
                      error=error if target_margin is None else target_margin,
                      confidence=confidence, p=p, fault_model=fault_model, rounding=rounding,
                      layers=_split(layers), targets=_split(targets) or ("weight",), seed=seed,
                      fmt=fmt, user_strata=None if user is None else tuple(user),
                      sampling=sampling, criterion=criterion, t=t, stuck_at=stuck_at)


def _plan_table(plan_dict: dict[str, Any], title: str) -> Table:
    table = Table(title=title)
    for col in ("stratum", "N", "n", "p"):
        table.add_column(col, justify="left" if col == "stratum" else "right")
    for s in plan_dict["strata"][:60]:
        table.add_row(s["key"], f"{s['N']:,}", f"{s['n']:,}", f"{s['p']:.3g}")
    if len(plan_dict["strata"]) > 60:
        table.add_row(f"... {len(plan_dict['strata']) - 60} more strata", "", "", "")
    table.add_row("[bold]total", f"[bold]{plan_dict['population']:,}",
                  f"[bold]{plan_dict['total']:,}", "")
    return table


def _fmt_s(seconds: float | None) -> str:
    if seconds is None or seconds != seconds:
        return "unknown"
    return time.strftime("%H:%M:%S", time.gmtime(seconds)) + (
        f" (+{int(seconds // 86400)} d)" if seconds >= 86400 else "")


# Options shared by plan and run -------------------------------------------------------------
O_STRATA = typer.Option("layer", "--strata", help=STRATA_HELP)
O_ERROR = typer.Option(0.01, "--error", help="Error margin e in (0, 1).")
O_CONF = typer.Option(0.99, "--confidence", help="Confidence level in (0, 1).")
O_P = typer.Option("0.5", "--p", help="Prior p in (0, 1) or 'data-aware'.")
O_FM = typer.Option("bitflip", "--fault-model", help="bitflip | stuck-at")
O_ROUND = typer.Option("ceil", "--rounding", help="ceil (conservative) | nearest")
O_LAYERS = typer.Option(None, "--layers", help="Comma list of layers (default: all).")
O_TARGETS = typer.Option("weight", "--targets", help="weight and/or bias, e.g. weight,bias")
O_SEED = typer.Option(0, "--seed", help="Sampling seed (same seed => same faults).")
O_FMT = typer.Option("fp32", "--format", help="Number format: fp32 | fp16 | bf16 | int8.")
O_IMAGES = typer.Option(None, "--images", help="Evaluate this many test images (default all).")
O_SAMPLING = typer.Option("uniform", "--sampling", help="uniform | stratified (criticality "
                          "sub-strata, see docs/criticality.md)")
O_TMARGIN = typer.Option(None, "--target-margin", help="Target CFR margin e (sets --error).")
O_CRIT = typer.Option("accuracy-drop:0.01", "--criterion",
                      help="Criterion for --refine and the stratified predictor.")
O_T = typer.Option("exact", "--t", help="t of the sample-size formula: exact (normal quantile) "
                   "| table (two decimals as in published tables: 1.96 at 95 %, 2.58 at 99 %)")
O_STUCK = typer.Option("all", "--stuck-at", help="Stuck-at population: all (default; includes "
                       "the no-op half, bit already at the stuck value) | effective (only "
                       "faults that change the stored bit)")


def plan(
    run: Path | None = typer.Argument(None, help="Run directory (or use --model)."),
    strata: str = O_STRATA, error: float = O_ERROR, confidence: float = O_CONF, p: str = O_P,
    fault_model: str = O_FM, rounding: str = O_ROUND, layers: str | None = O_LAYERS,
    targets: str = O_TARGETS, seed: int = O_SEED, fmt: str = O_FMT,
    images: int | None = O_IMAGES,
    model: str | None = typer.Option(None, "--model", help="Plan for 'pkg.module:factory'."),
    input_shape: str | None = typer.Option(None, "--input-shape",
                                           help="C,H,W of one input (with --model)."),
    probe: int = typer.Option(3, "--probe", min=0, help="Faults timed for the estimate."),
    sampling: str = O_SAMPLING, target_margin: float | None = O_TMARGIN,
    criterion: str = O_CRIT, t: str = O_T, stuck_at: str = O_STUCK,
    json_out: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Show the planned strata, populations, sample sizes and a time estimate."""
    from flipguard.campaign.conventions import population_note
    from flipguard.campaign.planner import make_plan
    from flipguard.campaign.runner import execute_chunk
    from flipguard.study.engines import RunEngineFactory

    cfg = _config(strata, error, confidence, p, fault_model, rounding, layers, targets, seed, fmt,
                  sampling, criterion, target_margin, t, stuck_at)
    per_fault = None
    if model is not None:
        import torch

        from flipguard.models import load_model

        net = load_model(model)
        net.eval()
        pl = make_plan(net, cfg)
        if input_shape:
            try:
                shape = tuple(int(v) for v in input_shape.split(","))
            except ValueError:
                raise ConfigError(f"--input-shape: expected C,H,W integers, got "
                                  f"{input_shape!r}") from None
            with torch.no_grad():
                t0 = time.perf_counter()
                net(torch.zeros((1, *shape)))
                per_fault = time.perf_counter() - t0  # one forward pass per fault and image
    elif run is not None:
        factory = RunEngineFactory(str(run), images=images, fmt=fmt)
        predictor = None
        if cfg.sampling == "stratified":
            from flipguard.criticality.campaign import predictor_for_factory

            predictor = predictor_for_factory(factory, cfg)
        pl = make_plan(factory.model(), cfg, predictor)
        faults = pl.faults()
        sample = [faults[int(i)] for i in evenly_spaced(len(faults), probe)] if probe else []
        if sample and probe:
            engine = factory()
            t0 = time.perf_counter()
            execute_chunk(engine, sample)
            per_fault = (time.perf_counter() - t0) / len(sample)
    else:
        raise ConfigError("RUN: expected a run directory or --model pkg.module:factory")
    out = pl.to_dict()
    total = out.get("predicted_total", pl.total)
    out["estimate_s"] = None if per_fault is None else per_fault * total
    if json_out:
        print_json(out)
        return
    console.print(_plan_table(out, f"Campaign plan ({cfg.strata}, e={cfg.error:g}, "
                                   f"confidence={cfg.confidence:g}, t={cfg.t_value:.4g} "
                                   f"({cfg.t}), p={cfg.p}, rounding={cfg.rounding})"))
    console.print(population_note(cfg.fault_model, cfg.stuck_at), highlight=False)
    if cfg.stuck_at == "effective":
        split = [sum(s.population_of(kind=k) for s in pl.strata) for k in cfg.kinds]
        console.print(f"effective population: stuck-at-0 {split[0]:,} (stored 1s), "
                      f"stuck-at-1 {split[1]:,} (stored 0s)", highlight=False)
    if "predicted_total" in out:
        console.print(f"simulations for e={cfg.error:g}: uniform [bold]{out['uniform_total']:,}"
                      f"[/], stratified [bold]{total:,}[/] predicted (audit {pl.total:,} now, "
                      f"the allocation after it; x{out['uniform_total'] / max(total, 1):.1f})")
    console.print(f"population [bold]{pl.population:,}[/], planned [bold]{pl.total:,}[/] "
                  f"faults, estimated time [bold]{_fmt_s(out['estimate_s'])}[/] (one process)")


def run_cmd(
    run: Path = typer.Argument(..., help="Run directory."),
    strata: str = O_STRATA, error: float = O_ERROR, confidence: float = O_CONF, p: str = O_P,
    fault_model: str = O_FM, rounding: str = O_ROUND, layers: str | None = O_LAYERS,
    targets: str = O_TARGETS, seed: int = O_SEED, fmt: str = O_FMT,
    images: int | None = O_IMAGES,
    workers: int = typer.Option(1, "--workers", min=1, help="Local worker processes."),
    ray: str | None = typer.Option(None, "--ray", help="auto | local | cluster ADDRESS"),
    limit: int | None = typer.Option(None, "--limit", min=0, help="Run at most K faults."),
    fresh: bool = typer.Option(False, "--fresh", help="Discard an existing campaign store."),
    refine: bool = typer.Option(False, "--refine", help="Top strata up to the margin using "
                                "the observed p (iterative refinement; always on for "
                                "--sampling stratified)."),
    criterion: str = O_CRIT, sampling: str = O_SAMPLING,
    target_margin: float | None = O_TMARGIN, t: str = O_T, stuck_at: str = O_STUCK,
    chunk: int = typer.Option(32, "--chunk", min=1, help="Faults per engine batch."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Run (or resume) the campaign of RUN; results go to RUN/campaign.sqlite."""
    from flipguard.campaign import runner as rn
    from flipguard.cli._core import make_progress

    cfg = _config(strata, error, confidence, p, fault_model, rounding, layers, targets, seed, fmt,
                  sampling, criterion, target_margin, t, stuck_at)
    if refine:
        from flipguard.inject import parse_criterion

        parse_criterion(criterion)
    factory = RunEngineFactory(str(run), images=images, fmt=fmt)
    with rn.open_campaign(run, cfg, factory, fresh=fresh) as store:
        engine = factory()
        rn.ensure_golden(store, engine)
        counts = store.counts()
        console.print(f"campaign: population [bold]{store.definition['population']:,}[/], "
                      f"planned [bold]{counts['planned']:,}[/], done {counts['done']:,}")
        if cfg.fault_model == "stuck-at":
            from flipguard.campaign.conventions import population_note

            console.print(population_note(cfg.fault_model, cfg.stuck_at), highlight=False)
        left, probed = limit, 0
        k = min(4, left if left is not None else 4)
        per = rn.probe_rate(store, engine, k) if k else None
        if per is not None:
            c = store.counts()
            probed = c["done"] - counts["done"]
            left = None if left is None else left - probed
            pending = c["planned"] - c["done"] if left is None else min(
                c["planned"] - c["done"], left)
            console.print(f"timing probe: {1 / per:.1f} faults/s per process; estimated "
                          f"time [bold]{_fmt_s(per * pending / workers)}[/] for "
                          f"{pending:,} faults")
        summary: dict[str, Any] = {"ran": probed}
        rounds = 0
        while True:
            with make_progress() as bar:
                task = bar.add_task("faults", total=counts["planned"], info="")

                def show(done: int, total: int, bar=bar, task=task) -> None:
                    speed = bar.tasks[task].speed
                    bar.update(task, completed=done, total=total,
                               info=f"{speed:.1f} faults/s" if speed else "")

                res = rn.run_campaign(store, factory, engine=engine, workers=workers, ray=ray,
                                      limit=left, chunk=chunk, progress=show)
            summary = {**res, "ran": summary["ran"] + res["ran"]}
            if left is not None:
                left -= res["ran"]
            stratified = cfg.sampling == "stratified"  # audit, allocation, top-ups
            if not (refine or stratified) or store.pending(limit=1) or (
                    left is not None and left <= 0):
                break
            added = rn.refine(store, factory.model(), criterion)
            rounds += 1
            console.print(f"refinement round {rounds}: {added:,} faults added")
            if not added:
                break
        summary.update(store.counts())
    if json_out:
        print_json(summary)
    else:
        console.print(f"ran [bold]{summary['ran']:,}[/] faults; {summary['done']:,}/"
                      f"{summary['planned']:,} done")


def status(
    run: Path = typer.Argument(..., help="Run directory (or campaign.sqlite)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Planned and executed faults of a campaign."""
    from flipguard.campaign.store import CampaignStore, store_path

    with CampaignStore(store_path(run)) as store:
        counts = store.counts()
        strata = store.strata()
        done_by = store.done_by_stratum()
        d = store.definition
        out = {**counts, "pending": counts["planned"] - counts["done"],
               "population": d.get("population"), "strata": len(strata),
               "plan": d.get("plan"), "rounds": store.get_meta("rounds", 0),
               "by_stratum": [{"key": s.key, "N": s.N, "n": s.n, "done": done_by.get(s.key, 0)}
                              for s in strata]}
    if json_out:
        print_json(out)
        return
    table = Table(title=f"Campaign {store.path}")
    for col in ("stratum", "N", "planned", "done"):
        table.add_column(col, justify="left" if col == "stratum" else "right")
    for s in out["by_stratum"][:60]:
        table.add_row(s["key"], f"{s['N']:,}", f"{s['n']:,}", f"{s['done']:,}")
    table.add_row("[bold]total", f"{out['population'] or 0:,}", f"[bold]{out['planned']:,}",
                  f"[bold]{out['done']:,}")
    console.print(table)


def export_cmd(
    run: Path = typer.Argument(..., help="Run directory (or campaign.sqlite)."),
    fmt: str = typer.Option("csv", "--format", help="csv | parquet"),
    out: Path | None = typer.Option(None, "--out", help="Output file (default RUN/faults.FMT)."),
) -> None:
    """Export the executed faults and their raw outcomes (written atomically)."""
    from flipguard.campaign.store import CampaignStore, export, store_path

    path = store_path(run)
    target = out if out is not None else path.parent / f"faults.{fmt}"
    with CampaignStore(path) as store:
        written = export(store, target, fmt)
    console.print(f"exported to [bold]{written}[/]")


def cfr(
    run: Path = typer.Argument(..., help="Run directory (or campaign.sqlite)."),
    by: str = typer.Option("layer", "--by", help="layer|bit|kernel|field|target|kind, "
                           "comma-combinable, or network"),
    criterion: str = typer.Option("accuracy-drop:0.01", "--criterion",
                                  help="accuracy-drop:δ | any-flip | auroc-drop:δ"),
    method: str = typer.Option(DEFAULT_METHOD, "--method", help="clopper-pearson (exact) | wilson"),
    confidence: float | None = typer.Option(None, "--confidence",
                                            help="Interval level (default: planned)."),
    json_out: bool = typer.Option(False, "--json", help="Print rows as JSON."),
) -> None:
    """Critical-fault rate with confidence intervals per layer/bit/kernel/field."""
    from flipguard.campaign.analysis import cfr_table, parse_by

    keys = parse_by(by)
    rows = cfr_table(run, by=keys, criterion=criterion, method=method, confidence=confidence)
    if json_out:
        print_json(rows)
        return
    table = Table(title=f"CFR under {criterion} ({method})")
    unc = any(r.get("uncovered", 0.0) > 0 for r in rows)
    for k in keys or ("group",):
        table.add_column(k)
    for col in ("n", "critical", "CFR", "CI", "margin", "N", "sampling") + (
            ("uncovered",) if unc else ()):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(*[str(r.get(k, "network")) for k in keys or ("group",)], f"{r['n']:,}",
                      f"{r['critical']:,}", f"{100 * r['cfr']:.3f} %",
                      f"[{100 * r['ci'][0]:.3f}, {100 * r['ci'][1]:.3f}] %",
                      f"±{100 * r['margin']:.3f} %", f"{r['N']:,}", r.get("sampling", ""),
                      *([f"{100 * r['uncovered']:.2f} %"] if unc else []))
    if unc:
        table.caption = ("uncovered: population share with no executed fault; "
                         "the CI allows any rate there")
    console.print(table)


def register(main: typer.Typer) -> None:
    """Add the ``campaign`` sub-app and the ``cfr`` command to ``main``."""
    app.command("plan")(cli_errors(plan))
    app.command("run")(cli_errors(run_cmd))
    app.command("status")(cli_errors(status))
    app.command("export")(cli_errors(export_cmd))
    main.add_typer(app, name="campaign")
    main.command("cfr")(cli_errors(cfr))
