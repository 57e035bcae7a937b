"""Search spaces: declarative categorical parameters, sampling through an Optuna trial,
enumeration, canonical keys, and loading a user space from ``pkg.module:name``.

A space is a :class:`SearchSpace` subclass (or instance) that lists its :class:`Param` s (a
parameter may be active only when earlier ones have some values) and builds a network from
an *architecture* — the dict of the active parameters' values. The task decides how the
network is trained and judged (``"detection"``: a reconstruction model on MVTec-layout
data; ``"classification"``: a classifier on a ``.pt`` file of inputs and labels).

>>> class Tiny(SearchSpace):
...     name, task = "tiny", "classification"
...     params = (Param("width", (4, 8)), Param("deep", (False, True)),
...               Param("width2", (4, 8), when=lambda a: a["deep"]))
...     def build(self, arch, input_shape, seed=0):
...         import torch
...         return torch.nn.Flatten()
>>> for arch in list(Tiny().grid())[:3]:
...     print(arch)
{'width': 4, 'deep': False}
{'width': 4, 'deep': True, 'width2': 4}
{'width': 4, 'deep': True, 'width2': 8}
>>> Tiny().size()
6
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from flipguard.errors import ConfigError
from flipguard.nas.activations import profile_bounds

__all__ = ["Param", "SearchSpace", "arch_key", "load_space", "TASKS"]

TASKS = ("detection", "classification")


@dataclass(frozen=True)
class Param:
    """A categorical parameter; ``when(arch_so_far)`` says whether it is active (None:
    always). Choices are JSON scalars (int, float, str, bool)."""

    name: str
    choices: tuple[Any, ...]
    when: Callable[[dict[str, Any]], bool] | None = None

    def active(self, arch: dict[str, Any]) -> bool:
        return self.when is None or bool(self.when(arch))


def arch_key(arch: dict[str, Any], *extra: Any) -> str:
    """Stable 16-hex key of an architecture (and any extra settings).

    >>> arch_key({"b": 1, "a": 2}) == arch_key({"a": 2, "b": 1})
    True
    """
    text = json.dumps([arch, *extra], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class SearchSpace:
    """Base class of a search space. Subclasses set ``name``, ``task`` and ``params`` and
    implement :meth:`build`; :meth:`finalise` (after training), :meth:`baseline` (a
    reference network on the same axes) and :meth:`train` (classification) are optional."""

    name: str = "space"
    task: str = "detection"
    params: tuple[Param, ...] = ()

    # ------------------------------------------------------------------ sampling
    def sample(self, trial: Any) -> dict[str, Any]:
        """The architecture chosen by an Optuna ``trial`` (``suggest_categorical`` for every
        active parameter, in order)."""
        arch: dict[str, Any] = {}
        for p in self.params:
            if p.active(arch):
                arch[p.name] = trial.suggest_categorical(p.name, list(p.choices))
        return arch

    def validate(self, arch: dict[str, Any]) -> dict[str, Any]:
        """``arch`` restricted to the active parameters, each checked against its choices
        (one-line :class:`ConfigError` otherwise)."""
        out: dict[str, Any] = {}
        for p in self.params:
            if not p.active(out):
                continue
            if p.name not in arch:
                raise ConfigError(f"architecture: missing parameter {p.name!r} of space "
                                  f"{self.name!r}")
            if arch[p.name] not in p.choices:
                raise ConfigError(f"architecture.{p.name}: expected one of "
                                  f"{list(p.choices)}, got {arch[p.name]!r}")
            out[p.name] = arch[p.name]
        return out

    def grid(self) -> Iterator[dict[str, Any]]:
        """Every architecture of the space (depth-first, choices in their order)."""
        def walk(i: int, arch: dict[str, Any]) -> Iterator[dict[str, Any]]:
            if i == len(self.params):
                yield dict(arch)
                return
            p = self.params[i]
            if not p.active(arch):
                yield from walk(i + 1, arch)
                return
            for c in p.choices:
                arch[p.name] = c
                yield from walk(i + 1, arch)
                del arch[p.name]

        yield from walk(0, {})

    def size(self) -> int:
        """Number of architectures (counted by enumeration)."""
        return sum(1 for _ in self.grid())

    def describe(self) -> list[dict[str, Any]]:
        """The parameters as JSON rows (name, choices, conditional)."""
        return [{"name": p.name, "choices": list(p.choices), "conditional": p.when is not None}
                for p in self.params]

    # ------------------------------------------------------------------ networks
    def build(self, arch: dict[str, Any], input_shape: Sequence[int],
              seed: int = 0) -> nn.Module:  # pragma: no cover - abstract
        """The network of ``arch`` for inputs of shape ``input_shape`` (C, H, W, ...),
        initialised from ``seed`` without touching the global RNG."""
        raise NotImplementedError

    def finalise(self, model: nn.Module, train_inputs: Tensor) -> None:
        """After training: set profiled activation bounds from the training inputs."""

        profile_bounds(model, train_inputs)

    def baseline(self, input_shape: Sequence[int], seed: int = 0) -> nn.Module | None:
        """A reference network placed on the same axes as the front (None: none)."""
        return None

    def baseline_name(self) -> str:
        return "baseline"


def load_space(spec: str | SearchSpace) -> SearchSpace:
    """A space from ``"cae"`` / ``"digits"`` (built in) or ``"pkg.module:name"`` (a
    :class:`SearchSpace` instance, subclass or zero-argument factory).

    >>> load_space("cae").name
    'cae'
    """
    if isinstance(spec, SearchSpace):
        return spec
    builtin = {"cae": "flipguard.nas.cae_space:CAESpace",
               "digits": "flipguard.nas.digits:DigitsSpace"}
    text = builtin.get(str(spec), str(spec))
    mod_name, sep, attr = text.partition(":")
    if not sep or not mod_name or not attr:
        raise ConfigError(f"--space: expected 'cae', 'digits' or 'pkg.module:name', got {spec!r}")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ConfigError(f"--space: cannot import {mod_name!r} ({exc})") from None
    obj = getattr(mod, attr, None)
    if obj is None:
        raise ConfigError(f"--space: {mod_name!r} has no attribute {attr!r}")
    if isinstance(obj, type) and issubclass(obj, SearchSpace):
        obj = obj()
    elif not isinstance(obj, SearchSpace) and callable(obj):
        obj = obj()
    if not isinstance(obj, SearchSpace):
        raise ConfigError(f"--space: {text!r} is not a flipguard.nas.SearchSpace")
    if obj.task not in TASKS:
        raise ConfigError(f"--space: {text!r} has task {obj.task!r}; expected one of "
                          f"{', '.join(TASKS)}")
    if not obj.params:
        raise ConfigError(f"--space: {text!r} declares no parameters")
    return obj
