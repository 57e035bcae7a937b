"""`flipguard campaign plan|run|status|export` and `flipguard cfr`."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from flipguard.campaign import PlanConfig, parse_by
from flipguard.campaign.conventions import population_note
from flipguard.campaign.stats import DEFAULT_METHOD
from flipguard.cli._common import (
    console,
    escape,
    make_progress,
    print_json,
    sigterm_as_interrupt,
)
from flipguard.cli.options import command, option
from flipguard.errors import ConfigError
from flipguard.study import campaigns as sc
from flipguard.study.calibration import class_groups_option, class_priors_option

app = typer.Typer(help="Statistical fault-injection campaigns (plan, run, status, export).",
                  no_args_is_help=True)
RUN_ARG = typer.Argument(..., help="Run directory (or campaign.sqlite).")
JSON = typer.Option(False, "--json", help="Print JSON.")


def _split(text: str | None) -> tuple[str, ...] | None:
    parts = tuple(p.strip() for p in (text or "").split(",") if p.strip())
    return parts or None


@dataclass(frozen=True)
class PlanOptions:
    """What to inject and how precisely (see docs/campaigns.md)."""

    strata: str = option("layer", "--strata", help="network | layer | layer,bit | "
                         "layer,field | layer,kernel, or a JSON strata file")
    error: float = option(0.01, "--error", help="Error margin e in (0, 1).")
    confidence: float = option(0.99, "--confidence", help="Confidence level in (0, 1).")
    p: str = option("0.5", "--p", help="Prior p in (0, 1) or 'data-aware'.")
    fault_model: str = option("bitflip", "--fault-model", help="bitflip | stuck-at")
    rounding: str = option("ceil", "--rounding", help="ceil (conservative) | nearest")
    layers: str | None = option(None, "--layers", help="Comma list of layers (default: all).")
    targets: str = option("weight", "--targets", help="weight and/or bias, e.g. weight,bias")
    seed: int = option(0, "--seed", help="Sampling seed (same seed => same faults).")
    fmt: str = option("fp32", "--format", help="Number format: fp32 | fp16 | bf16 | int8.")
    sampling: str = option("uniform", "--sampling", help="uniform | stratified (criticality "
                           "sub-strata, see docs/criticality.md)")
    target_margin: float | None = option(None, "--target-margin",
                                         help="Target CFR margin e (sets --error).")
    criterion: str = option("accuracy-drop:0.01", "--criterion",
                            help="Criterion for --refine and the stratified predictor.")
    t: str = option("exact", "--t", help="t of the sample-size formula: exact (normal "
                    "quantile) | table (two decimals as in published tables: 1.96 at 95 %, "
                    "2.58 at 99 %)")
    exclude_certified: bool = option(False, "--exclude-certified", help="With --sampling "
                                     "stratified: faults proven to change no decision are "
                                     "counted exactly and never simulated; only the "
                                     "uncertified remainder is sampled.")
    class_groups: str = option("auto", "--class-groups", help="With --sampling stratified: "
                               "predicted classes sampled as one sub-stratum: auto (as the "
                               "run's calibration from earlier campaigns says pays; none "
                               "without one) | none | ranges, e.g. 0-2,3,4")
    class_priors: str = option("calibrated", "--class-priors", help="With --sampling "
                               "stratified: prior critical rate per predicted class: "
                               "calibrated (from the run's earlier campaigns; fixed without "
                               "any) | fixed | five rates, e.g. 0.001,0.01,0.1,0.5,0.95")
    stuck_at: str = option("all", "--stuck-at", help="Stuck-at population: all (default; "
                           "includes the no-op half, bit already at the stuck value) | "
                           "effective (only faults that change the stored bit)")

    def config(self) -> PlanConfig:
        user = None
        if self.strata.endswith(".json") or Path(self.strata).is_file():
            path = Path(self.strata)
            try:
                user = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{path}: expected a readable JSON list of strata "
                                  f"({exc})") from None
            if not isinstance(user, list) or not all(isinstance(d, dict) for d in user):
                raise ConfigError(f"{path}: expected a JSON list of strata objects")
        return PlanConfig(
            strata="layer" if user is not None else self.strata,
            error=self.error if self.target_margin is None else self.target_margin,
            confidence=self.confidence, p=self.p, fault_model=self.fault_model,
            rounding=self.rounding, layers=_split(self.layers),
            targets=_split(self.targets) or ("weight",), seed=self.seed, fmt=self.fmt,
            user_strata=None if user is None else tuple(user), sampling=self.sampling,
            criterion=self.criterion, t=self.t, stuck_at=self.stuck_at,
            exclude_certified=self.exclude_certified,
            class_groups=class_groups_option(self.class_groups)[0]
            if self.sampling == "stratified" else None,
            class_priors=class_priors_option(self.class_priors)[0]
            if self.sampling == "stratified" else None)

    @property
    def auto_groups(self) -> bool:
        """``--class-groups auto``: resolved against the run's calibration."""
        return self.sampling == "stratified" and class_groups_option(self.class_groups)[1]

    @property
    def auto_priors(self) -> bool:
        """``--class-priors calibrated``: resolved against the run's calibration."""
        return self.sampling == "stratified" and class_priors_option(self.class_priors)[1]


@dataclass(frozen=True)
class RunOptions:
    """How to run it."""

    images: int | None = option(None, "--images", min=1,
                                help="Evaluate this many test images (default all).")
    workers: int = option(1, "--workers", min=1, help="Local worker processes.")
    ray: str | None = option(None, "--ray", help="auto | local | cluster ADDRESS")
    limit: int | None = option(None, "--limit", min=0, help="Run at most K faults.")
    fresh: bool = option(False, "--fresh", help="Discard an existing campaign store.")
    refine: bool = option(False, "--refine", help="Top strata up to the margin using the "
                          "observed p (iterative refinement; always on for --sampling "
                          "stratified).")
    chunk: int = option(32, "--chunk", min=1, help="Faults per engine batch.")
    certify: bool = option(False, "--certify", help="Do not simulate weight/bias faults "
                           "proven to change no decision (sound bounds; decision criteria "
                           "only).")

    def options(self) -> sc.CampaignOptions:
        return sc.CampaignOptions(self.images, self.workers, self.ray, self.limit, self.fresh,
                                  self.refine, self.chunk, certify=self.certify)


def _fmt_s(seconds: float | None) -> str:
    if seconds is None or seconds != seconds:
        return "unknown"
    return time.strftime("%H:%M:%S", time.gmtime(seconds)) + (
        f" (+{int(seconds // 86400)} d)" if seconds >= 86400 else "")


def _plan_table(d: dict[str, Any], title: str) -> Table:
    table = Table(title=title)
    for col in ("stratum", "N", "n", "p"):
        table.add_column(col, justify="left" if col == "stratum" else "right")
    for s in d["strata"][:60]:
        table.add_row(escape(s["key"]), f"{s['N']:,}", f"{s['n']:,}", f"{s['p']:.3g}")
    if len(d["strata"]) > 60:
        table.add_row(f"... {len(d['strata']) - 60} more strata", "", "", "")
    table.add_row("[bold]total", f"[bold]{d['population']:,}", f"[bold]{d['total']:,}", "")
    return table


@app.command("plan")
@command
def plan(run: Path | None = typer.Argument(None, help="Run directory (or use --model)."),
         *, opts: PlanOptions,
         images: int | None = typer.Option(None, "--images", min=1,
                                           help="Evaluate this many test images."),
         model: str | None = typer.Option(None, "--model", help="Plan for 'pkg.module:factory'."),
         input_shape: str | None = typer.Option(None, "--input-shape",
                                                help="C,H,W of one input (with --model)."),
         probe: int = typer.Option(3, "--probe", min=0, help="Faults timed for the estimate."),
         json_out: bool = JSON) -> None:
    """Show the planned strata, populations, sample sizes and a time estimate."""
    cfg = opts.config()
    if model is not None:
        try:
            shape = tuple(int(v) for v in input_shape.split(",")) if input_shape else None
        except ValueError:
            raise ConfigError(f"--input-shape: expected C,H,W integers, got {input_shape!r}"
                              ) from None
        summary = sc.plan_model(model, cfg, shape)
    elif run is not None:
        summary = sc.plan_campaign(run, cfg, images, probe, opts.auto_groups, opts.auto_priors)
    else:
        raise ConfigError("RUN: expected a run directory or --model pkg.module:factory")
    if json_out:
        return print_json(summary.to_dict())
    d = summary.plan
    console.print(_plan_table(d, f"Campaign plan ({cfg.strata}, e={cfg.error:g}, "
                                 f"confidence={cfg.confidence:g}, t={cfg.t_value:.4g} "
                                 f"({cfg.t}), p={cfg.p}, rounding={cfg.rounding})"))
    for note in summary.notes:
        console.print(escape(note), highlight=False)
    total = d.get("predicted_total", d["total"])
    if "predicted_total" in d:
        console.print(f"simulations for e={cfg.error:g}: uniform [bold]{d['uniform_total']:,}"
                      f"[/], stratified [bold]{total:,}[/] predicted (audit {d['total']:,} now, "
                      f"the allocation after it; x{d['uniform_total'] / max(total, 1):.1f})")
    if d.get("certified_total"):
        console.print(f"certified, counted exactly and never simulated: "
                      f"[bold]{d['certified_total']:,}[/] faults "
                      f"({100 * d['certified_total'] / max(d['population'], 1):.2f} % of the "
                      f"population)")
    console.print(f"population [bold]{d['population']:,}[/], planned [bold]{d['total']:,}[/] "
                  f"faults, estimated time [bold]{_fmt_s(summary.estimate_s)}[/] (one process)")


@app.command("run")
@command
def run_cmd(run: Path = typer.Argument(..., help="Run directory."),
            *, plan: PlanOptions, how: RunOptions, json_out: bool = JSON) -> None:
    """Run (or resume) the campaign of RUN; results go to RUN/campaign.sqlite."""
    cfg, opts = plan.config(), replace(how.options(), auto_groups=plan.auto_groups,
                                       auto_priors=plan.auto_priors)
    bar = make_progress()  # shown once the store is open: errors before it stay one line
    task = bar.add_task("faults", total=None, info="")

    def opened(store: Any, c: dict[str, int]) -> None:
        console.print(f"campaign: population [bold]{store.definition['population']:,}[/], "
                      f"planned [bold]{c['planned']:,}[/], done {c['done']:,}")
        if cfg.fault_model == "stuck-at":
            console.print(escape(population_note(cfg.fault_model, cfg.stuck_at)))
        bar.start()

    def probed(per: float, pending: int) -> None:
        console.print(f"timing probe: {1 / per:.1f} faults/s per process; estimated time "
                      f"[bold]{_fmt_s(per * pending / opts.workers)}[/] for {pending:,} faults")

    def progress(done: int, total: int) -> None:
        speed = bar.tasks[task].speed
        bar.update(task, completed=done, total=total,
                   info=f"{speed:.1f} faults/s" if speed else "")

    def round_(r: int, added: int) -> None:
        console.print(f"refinement round {r}: {added:,} faults added")

    try:
        with sigterm_as_interrupt():  # a stopped campaign still records its calibration
            summary = sc.run_study_campaign(
                run, cfg, opts, sc.CampaignEvents(opened, probed, progress, round_))
    finally:
        bar.stop()
    if json_out:
        return print_json(summary.to_dict())
    console.print(f"ran [bold]{summary.ran:,}[/] faults; {summary.done:,}/{summary.planned:,} "
                  f"done")
    if summary.certified_pairs is not None:
        console.print(f"certified: {100 * summary.certified_pairs:.1f} % of the (fault, image) "
                      f"pairs (decision proven, not simulated)")
    for note in summary.notes:
        console.print(escape(note), highlight=False)


@app.command("status")
@command
def status(run: Path = RUN_ARG, json_out: bool = JSON) -> None:
    """Planned and executed faults of a campaign."""
    s = sc.campaign_status(run)
    if json_out:
        return print_json(s.to_dict())
    table = Table(title=f"Campaign {escape(s.path)}")
    for col in ("stratum", "N", "planned", "done"):
        table.add_column(col, justify="left" if col == "stratum" else "right")
    for r in s.by_stratum[:60]:
        table.add_row(escape(r["key"]), f"{r['N']:,}", f"{r['n']:,}", f"{r['done']:,}")
    table.add_row("[bold]total", f"{s.population or 0:,}", f"[bold]{s.planned:,}",
                  f"[bold]{s.done:,}")
    console.print(table)


@app.command("export")
@command
def export_cmd(run: Path = RUN_ARG,
               fmt: str = typer.Option("csv", "--format", help="csv | parquet"),
               out: Path | None = typer.Option(None, "--out",
                                               help="Output file (default RUN/faults.FMT).")
               ) -> None:
    """Export the executed faults and their raw outcomes (written atomically)."""
    console.print(f"exported to [bold]{escape(str(sc.export_faults(run, fmt, out)))}[/]")


@command
def cfr(run: Path = RUN_ARG,
        by: str = typer.Option("layer", "--by", help="layer|bit|kernel|field|target|kind, "
                               "comma-combinable, or network"),
        criterion: str = typer.Option("accuracy-drop:0.01", "--criterion",
                                      help="accuracy-drop:δ | any-flip | auroc-drop:δ"),
        method: str = typer.Option(DEFAULT_METHOD, "--method",
                                   help="clopper-pearson (exact) | wilson"),
        confidence: float | None = typer.Option(None, "--confidence",
                                                help="Interval level (default: planned)."),
        json_out: bool = JSON) -> None:
    """Critical-fault rate with confidence intervals per layer/bit/kernel/field."""
    keys = parse_by(by)
    rows = sc.cfr_rows_of(run, keys, criterion, method, confidence)
    if json_out:
        return print_json(rows)
    console.print(cfr_table_view(rows, keys, f"CFR under {criterion} ({method})"))


def cfr_table_view(rows: list[dict[str, Any]], keys: tuple[str, ...], title: str) -> Table:
    """A rich table of CFR rows (an ``uncovered`` column only when some row has one)."""
    table = Table(title=title)
    unc = any(r.get("uncovered", 0.0) > 0 for r in rows)
    for k in keys or ("group",):
        table.add_column(k)
    for col in ("n", "critical", "CFR", "CI", "margin", "N", "sampling") + (
            ("uncovered",) if unc else ()):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(*[escape(str(r.get(k, "network"))) for k in keys or ("group",)],
                      f"{r['n']:,}", f"{r['critical']:,}", f"{100 * r['cfr']:.3f} %",
                      f"[{100 * r['ci'][0]:.3f}, {100 * r['ci'][1]:.3f}] %",
                      f"±{100 * r['margin']:.3f} %", f"{r['N']:,}", r.get("sampling", ""),
                      *([f"{100 * r['uncovered']:.2f} %"] if unc else []))
    if unc:
        table.caption = ("uncovered: population share with no executed fault; "
                         "the CI allows any rate there")
    return table


def register(main: typer.Typer) -> None:
    """Add the ``campaign`` sub-app and the ``cfr`` command to ``main``."""
    main.add_typer(app, name="campaign")
    main.command("cfr")(cfr)
