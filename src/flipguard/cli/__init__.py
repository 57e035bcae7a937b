"""`flipguard <verb>`: the command-line interface (typer + rich).

Each verb group lives in its own module exposing ``register(app)``; ``app`` is the entry point.
"""

from __future__ import annotations

import typer

from flipguard.cli import _core, campaign, harden, init, nas, ra, report, study, validate

app = typer.Typer(
    name="flipguard",
    help="Reliability of neural networks under hardware bit flips.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for _module in (_core, init, campaign, harden, nas, ra, report, study, validate):
    _module.register(app)

__all__ = ["app"]
