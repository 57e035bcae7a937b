"""`flipguard harden RUN`: selective hardening under a memory budget, proven by paired
re-injection of the campaign's own faults (see docs/hardening.md)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from flipguard.cli._common import console, escape, print_json
from flipguard.cli.options import command, option
from flipguard.study.hardening import RESULT_FILE, HardenOptions, harden_run


@dataclass(frozen=True)
class HardenArgs:
    """What to harden and how (the options of :class:`~flipguard.study.hardening.
    HardenOptions`)."""

    budget: float = option(0.03, "--budget", help="Extra memory allowed, as a fraction of the "
                           "weight memory (0.03 = 3 %).")
    schemes: str = option("tmr,parity,ecc,range,invariant", "--schemes",
                          help="Comma list of tmr, parity, ecc, range, invariant, act "
                               "(act = activation clamping, saved as RUN/hardened).")
    criterion: str = option("accuracy-drop:0.01", "--criterion",
                            help="When a fault is critical (as for `flipguard cfr`).")
    policy: str = option("zero", "--policy", help="Detected words (parity, ECC double "
                         "errors): zero | reload.")
    method: str = option("greedy", "--method", help="greedy | exact (small models).")
    curve: bool = option(True, "--curve/--no-curve",
                         help="Expected improvement over budgets 0-10 %.")
    n_boot: int = option(20_000, "--draws", "--boot", min=100,
                         help="Monte Carlo draws of the sign-flip test (used when its null "
                              "distribution is too large to enumerate).")
    seed: int = option(0, "--seed", help="Seed of the sign-flip Monte Carlo draws.")
    hardware: str | None = option(
        None, "--hardware", help="Exposure model (systolic | systolic:FILE.toml | memory): "
        "also report the improvement over that hardware's whole exposure (faults in PE "
        "registers and partial sums are not removed by memory protections).")

    def options(self) -> HardenOptions:
        return HardenOptions(budget=self.budget, schemes=self.schemes, criterion=self.criterion,
                             policy=self.policy, method=self.method, curve=self.curve,
                             n_boot=self.n_boot, seed=self.seed, hardware=self.hardware)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.3f} %"


def _ci(lo: float | None, hi: float | None) -> str:
    """``[lo, hi]`` in %, escaped (``[n/a, ...]`` would read as rich markup)."""
    return escape(f"[{_pct(lo)}, {_pct(hi)}]")


def _p(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def _table(res: dict[str, Any]) -> Table:
    table = Table(title=f"Protections (budget {_pct(res['budget'])} of "
                        f"{res['weight_bits']:,} weight bits)")
    for col in ("protection", "cost (bits)", "expected gain", "cumulative overhead"):
        table.add_column(col, justify="left" if col == "protection" else "right")
    for r in res["table"]:
        table.add_row(escape(r["protection"]), f"{r['cost_bits']:,}",
                      f"{r['expected_gain']:.4g}", _pct(r["cumulative_overhead"]))
    clamps = res.get("activation_clamps")
    if clamps:
        table.add_row(f"act clamps on {len(clamps['layers'])} layers", f"{clamps['cost_bits']:,}",
                      "measured", _pct(res["overhead"]))
    return table


def _coverage_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="What each protection covers (fault locations) and costs")
    for col in ("scheme", "covers", "not covered", "effect", "memory bits", "words",
                "read-path cost per load"):
        table.add_column(col, justify="right" if col in ("memory bits", "words") else "left")
    for c in rows:
        words = c.get("protected_words")
        table.add_row(c["scheme"], ", ".join(c["locations"]), ", ".join(c["not_covered"]),
                      escape(c["effect"]), f"{c['memory_bits']:,}",
                      "-" if words is None else f"{words:,}", escape(c["per_load"]))
    return table


def _print_exposure(e: dict[str, Any]) -> None:
    locs = "; ".join(f"{t}: " + ", ".join(f"{k} {_pct(v)}" for k, v in d.items())
                     for t, d in e["locations"].items())
    w = e["whole_exposure"]
    rng = w["relative_improvement_range"]
    console.print(f"exposure {escape(str(e['hardware']))}: {locs}; covered by the protections "
                  f"in use {_pct(e['covered_share'])}")
    console.print(f"over the measured exposure ({_pct(e['measured_share'])}): CFR "
                  f"{_pct(e['cfr_before'])} -> {_pct(e['cfr_after'])}, improvement "
                  f"[bold]{_pct(e['relative_improvement'])}[/] (if every fault were in "
                  f"storage: {_pct(e['relative_improvement_if_all_storage'])}); whole "
                  f"exposure {_pct(w['relative_improvement_if_same_cfr'])} if the unmeasured "
                  f"share has the same CFR, range {_ci(rng[0], rng[1])}")


def _print(res: dict[str, Any]) -> None:
    console.print(_table(res))
    b, a, ci = res["cfr_before"], res["cfr_after"], res["ci"]
    console.print(f"CFR before {_pct(b['cfr'])} {_ci(*b['ci'])}  "
                  f"after {_pct(a['cfr'])} {_ci(*a['ci'])}  "
                  f"({res['n_faults']:,} identical faults, {res['simulated']:,} re-simulated)")
    level = 100 * float(res.get("ci_level") or 0.95)
    console.print(f"relative improvement [bold]{_pct(res['relative_improvement'])}[/] "
                  f"({level:g} % MOVER-R interval {_ci(ci[0], ci[1])}, weighted "
                  f"test of no change p = {_p(res['p_value'])}, exact stratified sign-flip "
                  f"p = {_p(res['p_sign_flip'])}); overhead [bold]{_pct(res['overhead'])}[/]")
    console.print(f"strata with no critical fault before: {_pct(res['zero_critical_share'])} "
                  f"of the population (bounded, not assumed 0); never sampled: "
                  f"{_pct(res['unsampled_share'])}")
    if res.get("coverage"):
        console.print(_coverage_table(res["coverage"]))
    if res.get("exposure"):
        _print_exposure(res["exposure"])
    ff = res["fault_free"]
    console.print("fault-free metrics: " + ("[bold yellow]changed[/] " + escape(str(ff))
                                            if ff["changed"] else "unchanged"))
    console.print(f"written {escape(str(Path(res['run']) / RESULT_FILE))}", highlight=False)


@command
def harden(run: Path = typer.Argument(..., help="Run directory with a finished campaign."),
           *, args: HardenArgs,
           json_out: bool = typer.Option(False, "--json", help="Print the result as JSON.")
           ) -> None:
    """Choose protections within a memory budget, prove them on the same faults, say what
    they cover.

    Each protection's fault locations (storage / datapath / registers) and read-path cost
    are listed; with --hardware the improvement over that hardware's whole exposure."""
    opts = args.options()
    opts.validate()  # one line before the spinner starts
    with console.status("planning and re-injecting the campaign's faults"):
        res = harden_run(run, opts).to_dict()
    if json_out:
        return print_json(res)
    _print(res)


def register(app: typer.Typer) -> None:
    """Add the ``harden`` command to ``app``."""
    app.command("harden")(harden)
