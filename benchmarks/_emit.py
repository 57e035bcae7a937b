"""Shared ending of the benchmark scripts: save the summary, print it as JSON or as text."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def command(script: str, argv: list[str] | None, prefix: str = "") -> str:
    """The command line that produced a benchmark's output (``argv`` or ``sys.argv``)."""
    args = sys.argv[1:] if argv is None else argv
    return f"{prefix}python benchmarks/{script} " + shlex.join(args)


def emit(summary: dict, save: str | None, as_json: bool, text: Callable[[], str],
         default: Callable[[Any], Any] = str) -> dict:
    """Write ``summary`` to ``save`` (JSON) if given; print it as JSON or ``text()``."""
    if save:
        Path(save).write_text(json.dumps(summary, indent=2, default=default) + "\n")
    print(json.dumps(summary, indent=2, default=default) if as_json else text())
    return summary
