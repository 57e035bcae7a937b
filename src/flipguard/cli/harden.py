"""`flipguard harden RUN`: selective hardening under a memory budget, proven by paired
re-injection of the campaign's own faults (see docs/hardening.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from flipguard.cli._common import cli_errors, console, print_json


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.3f} %"


def _table(res: dict[str, Any]) -> Table:
    table = Table(title=f"Protections (budget {_pct(res['budget'])} of "
                        f"{res['weight_bits']:,} weight bits)")
    for col in ("protection", "cost (bits)", "expected gain", "cumulative overhead"):
        table.add_column(col, justify="left" if col == "protection" else "right")
    for r in res["table"]:
        table.add_row(r["protection"], f"{r['cost_bits']:,}", f"{r['expected_gain']:.4g}",
                      _pct(r["cumulative_overhead"]))
    clamps = res.get("activation_clamps")
    if clamps:
        table.add_row(f"act clamps on {len(clamps['layers'])} layers", f"{clamps['cost_bits']:,}",
                      "measured", _pct(res["overhead"]))
    return table


def harden(
    run: Path = typer.Argument(..., help="Run directory with a finished campaign."),
    budget: float = typer.Option(0.03, "--budget", help="Extra memory allowed, as a fraction "
                                 "of the weight memory (0.03 = 3 %)."),
    schemes: str = typer.Option("tmr,parity,ecc,range,invariant", "--schemes",
                                help="Comma list of tmr, parity, ecc, range, invariant, act "
                                     "(act = activation clamping, saved as RUN/hardened)."),
    criterion: str = typer.Option("accuracy-drop:0.01", "--criterion",
                                  help="When a fault is critical (as for `flipguard cfr`)."),
    policy: str = typer.Option("zero", "--policy", help="Detected words (parity, ECC double "
                               "errors): zero | reload."),
    method: str = typer.Option("greedy", "--method", help="greedy | exact (small models)."),
    curve: bool = typer.Option(True, "--curve/--no-curve",
                               help="Expected improvement over budgets 0-10 %."),
    boot: int = typer.Option(2000, "--boot", min=100, help="Bootstrap resamples."),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Choose protections within a memory budget and prove them on the same faults."""
    from flipguard.harden.paired import RESULT_FILE, harden_run

    with console.status("planning and re-injecting the campaign's faults"):
        res = harden_run(run, budget=budget, schemes=schemes, criterion=criterion,
                         policy=policy, method=method, curve=curve, n_boot=boot, seed=seed)
    if json_out:
        print_json(res)
        return
    console.print(_table(res))
    b, a = res["cfr_before"], res["cfr_after"]
    ci = res["ci"]
    console.print(f"CFR before {_pct(b['cfr'])} [{_pct(b['ci'][0])}, {_pct(b['ci'][1])}]  "
                  f"after {_pct(a['cfr'])} [{_pct(a['ci'][0])}, {_pct(a['ci'][1])}]  "
                  f"({res['n_faults']:,} identical faults, {res['simulated']:,} re-simulated)")
    console.print(f"relative improvement [bold]{_pct(res['relative_improvement'])}[/] "
                  f"(95 % paired bootstrap [{_pct(ci[0])}, {_pct(ci[1])}], McNemar p = "
                  f"{res['mcnemar_p']:.3g}); overhead [bold]{_pct(res['overhead'])}[/]")
    ff = res["fault_free"]
    console.print("fault-free metrics: " + ("[bold yellow]changed[/] " + str(ff)
                                            if ff["changed"] else "unchanged"))
    console.print(f"written {Path(res['run']) / RESULT_FILE}")


def register(app: typer.Typer) -> None:
    """Add the ``harden`` command to ``app``."""
    app.command("harden")(cli_errors(harden))
