"""Typed option groups for typer verbs.

An option group is a frozen dataclass whose fields carry their typer option
(:func:`option`). A verb annotates a parameter with the group type and :func:`command`
expands the group's fields into ordinary typer options, then hands the verb one instance —
so verbs share option definitions and stay a few lines long.

>>> import typer
>>> from dataclasses import dataclass
>>> from typer.testing import CliRunner
>>> @dataclass(frozen=True)
... class Size:
...     width: int = option(3, "--width", min=1, help="Width.")
>>> app = typer.Typer()
>>> @app.command()
... @command
... def area(size: Size, height: int = typer.Option(2, "--height")) -> None:
...     print(size.width * height)
>>> CliRunner().invoke(app, ["--width", "5"]).output
'10\\n'
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import MISSING, field, fields, is_dataclass
from typing import Any

import typer

from flipguard.cli._common import cli_errors

__all__ = ["command", "option"]

_KEY = "typer"


def option(default: Any, *flags: str, **kwargs: Any) -> Any:
    """A dataclass field exposed as ``typer.Option(default, *flags, **kwargs)``."""
    return field(default=default, metadata={_KEY: typer.Option(default, *flags, **kwargs)})


def _is_group(t: Any) -> bool:
    return is_dataclass(t) and isinstance(t, type) and any(_KEY in f.metadata for f in fields(t))


def command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Expand option-group parameters of ``fn`` into typer options; errors become one line
    (:func:`~flipguard.cli._common.cli_errors`)."""
    hints = typing.get_type_hints(fn)
    params: list[inspect.Parameter] = []
    groups: dict[str, type] = {}
    for name, p in inspect.signature(fn).parameters.items():
        t = hints.get(name, p.annotation)
        if _is_group(t):
            groups[name] = t
            ghints = typing.get_type_hints(t)
            for f in fields(t):
                default = f.metadata.get(_KEY, f.default if f.default is not MISSING else None)
                params.append(inspect.Parameter(f"{name}__{f.name}",
                                                inspect.Parameter.KEYWORD_ONLY,
                                                default=default, annotation=ghints[f.name]))
        else:
            params.append(p.replace(annotation=t, kind=inspect.Parameter.KEYWORD_ONLY))

    @functools.wraps(fn)
    def wrapper(**kwargs: Any) -> Any:
        for name, cls in groups.items():
            kwargs[name] = cls(**{f.name: kwargs.pop(f"{name}__{f.name}") for f in fields(cls)})
        return fn(**kwargs)

    wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}  # resolved types
    del wrapper.__wrapped__  # typer must see the expanded signature, not fn's
    return cli_errors(wrapper)
