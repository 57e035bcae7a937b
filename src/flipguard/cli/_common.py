"""Helpers shared by CLI modules: one-line errors, JSON output, consoles."""

from __future__ import annotations

import functools
import json
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from flipguard.errors import FlipguardError
from flipguard.fileio import json_clean

console = Console(stderr=True)
__all__ = ["cli_errors", "console", "escape", "fail", "make_progress", "print_json",
           "sigterm_as_interrupt"]
F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str) -> None:
    """Print one error line to stderr and exit with status 2."""
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def cli_errors(func: F) -> F:
    """Decorator: turn FlipguardError (and friends) into one clear line and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except FlipguardError as exc:
            fail(str(exc))
        except FileNotFoundError as exc:
            fail(f"{exc.filename}: file not found")
        except OSError as exc:  # read-only place, full disk, a file where a folder should be
            where = exc.filename if exc.filename is not None else "I/O"
            fail(f"{where}: {exc.strerror or type(exc).__name__}")

    return wrapper  # type: ignore[return-value]


def print_json(obj: Any) -> None:
    """Write ``obj`` as JSON to stdout (NaN becomes null)."""
    sys.stdout.write(json.dumps(json_clean(obj), indent=2) + "\n")



def make_progress() -> Progress:
    """A rich progress bar with rate/ETA on stderr (tasks take an ``info`` field)."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                    TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises :class:`KeyboardInterrupt` (main thread only), so a
    stopped command runs its clean-ups as after Ctrl-C; the previous handler comes back.

    >>> with sigterm_as_interrupt():
    ...     signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    True
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
