"""Run a model from any layer: an ``torch.fx`` program cut at layer calls, and a pipeline that
moves (fault, image) rows through it in fixed-shape chunks.

A *cut* ``p`` is the point just before node ``p`` of the traced graph; the values *live* at
the cut (defined before ``p``, used at or after ``p``) are all that is needed to run the
rest. :class:`Program` executes nodes ``start..stop`` from such values; :class:`Pipeline`
queues rows per cut and always runs exactly ``batch_size`` rows (padding the last chunk with
copies of its first row), because oneDNN/cuDNN may pick kernels by batch size and only
equal shapes guarantee bit-identical per-sample results.

>>> import torch
>>> prog = trace(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
>>> prog.calls["0"], [n.name for n in prog.live(prog.calls["1"])]
(1, ['_0'])
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, fx, nn

from flipguard.layers import LayerTracer

__all__ = ["Program", "trace", "Rows", "Pipeline", "same_rows", "pad_rows"]

_INT_OF = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_INPLACE_FNS = {getattr(operator, n) for n in dir(operator)
                if n.startswith("i") and n[1:] in dir(operator) and n != "index"}
_VIEWS = {"view", "reshape", "flatten", "transpose", "permute", "squeeze", "unsqueeze",
          "expand", "narrow", "select", "unflatten", "view_as", "reshape_as", "t",
          "__getitem__", "getitem", "chunk", "split", "unbind", "contiguous", "to", "float",
          "type_as", "detach", "movedim", "swapaxes", "as_strided", "diagonal", "real"}


class Program:
    """A traced model as a list of nodes that can run between cuts.

    ``calls[name]`` is the node position of module ``name`` (modules called more than once
    are left out: they cannot be restarted at one call).
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.nodes: list[fx.Node] = list(gm.graph.nodes)
        self.pos = {n: i for i, n in enumerate(self.nodes)}
        phs = [n for n in self.nodes if n.op == "placeholder"]
        if not phs:
            raise ValueError("the traced graph has no input")
        self.input = phs[0]
        self.end = len(self.nodes) - 1
        if self.nodes[self.end].op != "output":
            raise ValueError("the traced graph does not end in an output node")
        self.consts: dict[fx.Node, Any] = {}
        for n in self.nodes:
            if n.op == "get_attr":
                self.consts[n] = _fetch(gm, str(n.target))
            elif n.op == "placeholder" and n is not self.input:
                if not n.args:
                    raise ValueError(f"forward argument {n.name!r} has no default")
                self.consts[n] = n.args[0]
        counts: dict[str, list[int]] = {}
        for i, n in enumerate(self.nodes):
            if n.op == "call_module":
                counts.setdefault(str(n.target), []).append(i)
        self.calls = {k: v[0] for k, v in counts.items() if len(v) == 1}
        last: dict[fx.Node, int] = {}
        for i, n in enumerate(self.nodes):
            last.setdefault(n, i)  # unused values die where they are made
            for a in n.all_input_nodes:
                last[a] = i
        self._dies: list[list[fx.Node]] = [[] for _ in self.nodes]
        for a, i in last.items():
            self._dies[i].append(a)
        self._mods = {n: gm.get_submodule(str(n.target)) for n in self.nodes
                      if n.op == "call_module"}
        self.mutated = self._mutated()
        self._live: dict[int, list[fx.Node]] = {}

    def _mutated(self) -> set[fx.Node]:
        """Nodes whose value some later node changes in place (followed back through
        view-like ops): their cached values must be copied before use."""
        out: set[fx.Node] = set()
        for n in self.nodes:
            target = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
            if target is None:
                continue
            name = getattr(n.target, "__name__", str(n.target))
            inplace = (n.kwargs.get("inplace") is True
                       or (n.op == "call_function" and n.target in _INPLACE_FNS)
                       or (n.op == "call_method" and name.endswith("_")
                           and not name.startswith("_"))
                       or (n.op == "call_module" and getattr(self._mods[n], "inplace", False)))
            stack = [target] if inplace else []
            while stack:
                m = stack.pop()
                if m in out:
                    continue
                out.add(m)
                mname = getattr(m.target, "__name__", str(m.target))
                if m.op in ("call_method", "call_function") and mname in _VIEWS and m.args \
                        and isinstance(m.args[0], fx.Node):
                    stack.append(m.args[0])
        return out

    @property
    def output(self) -> fx.Node:
        """The node whose value is the model output (single tensor outputs only)."""
        arg = self.nodes[self.end].args[0]
        if not isinstance(arg, fx.Node):
            raise ValueError("the model output is not a single tensor")
        return arg

    def live(self, p: int) -> list[fx.Node]:
        """Nodes (no constants) defined before position ``p`` and used at or after it."""
        if p not in self._live:
            self._live[p] = [n for n in self.nodes[:p] if n not in self.consts
                             and any(self.pos[u] >= p for u in n.users)]
        return self._live[p]

    def _get(self, env: dict[fx.Node, Any], n: fx.Node) -> Any:
        return env[n] if n in env else self.consts[n]

    def call(self, node: fx.Node, env: dict[fx.Node, Any]) -> Any:
        """Value of ``node`` from the values of its inputs in ``env``."""
        args = fx.node.map_arg(node.args, lambda n: self._get(env, n))
        kwargs = fx.node.map_arg(node.kwargs, lambda n: self._get(env, n))
        if node.op == "call_module":
            return self._mods[node](*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)  # type: ignore[operator]
        if node.op == "call_method":
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        raise ValueError(f"cannot execute node {node.name} ({node.op})")

    def run(self, env: dict[fx.Node, Any], start: int, stop: int,
            record: set[fx.Node] | None = None,
            sink: Callable[[fx.Node, Any], None] | None = None) -> dict[fx.Node, Any]:
        """Execute nodes ``start <= p < stop`` on ``env`` (the values live at cut ``start``;
        updated in place and returned: the values live at ``stop``). Values of nodes in
        ``record`` are passed to ``sink`` as they are produced (or on entry)."""
        if record and sink:
            for n in list(env):
                if n in record:
                    sink(n, env[n])
        for p in range(start, stop):
            n = self.nodes[p]
            if n.op not in ("placeholder", "get_attr", "output"):
                env[n] = self.call(n, env)
                if record and sink and n in record:
                    sink(n, env[n])
            for d in self._dies[p]:
                env.pop(d, None)
        return env


def _fetch(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def trace(model: nn.Module) -> Program:
    """Trace ``model`` with torch.fx (raises when it is not traceable)."""
    tracer = LayerTracer()
    graph = tracer.trace(model)
    return Program(fx.GraphModule(tracer.root, graph))


def same_rows(a: Tensor, b: Tensor) -> Tensor:
    """Bool (rows,): row ``i`` of ``a`` is bit-identical to row ``i`` of ``b`` (NaN-safe)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return torch.zeros(a.shape[0], dtype=torch.bool, device=a.device)
    if a.dtype.is_floating_point:
        it = _INT_OF[a.element_size()]
        a, b = a.contiguous().view(it), b.contiguous().view(it)
    return (a.reshape(a.shape[0], -1) == b.reshape(b.shape[0], -1)).all(dim=1)


def pad_rows(t: Tensor, n: int) -> Tensor:
    """``t`` with rows appended (copies of row 0) up to ``n`` rows."""
    r = t.shape[0]
    if r >= n:
        return t
    return torch.cat([t, t[:1].expand(n - r, *t.shape[1:])])


@dataclass
class Rows:
    """A batch of (fault slot, image) rows with their live values (rows first)."""

    values: dict[Any, Tensor]
    slot: np.ndarray
    image: np.ndarray

    def __len__(self) -> int:
        return int(self.slot.shape[0])

    def split(self, n: int) -> tuple[Rows, Rows]:
        head = Rows({k: v[:n] for k, v in self.values.items()}, self.slot[:n], self.image[:n])
        tail = Rows({k: v[n:] for k, v in self.values.items()}, self.slot[n:], self.image[n:])
        return head, tail

    def select(self, keep: Tensor) -> Rows:
        k = keep.cpu().numpy()
        idx = keep.nonzero().squeeze(1)
        return Rows({n: v.index_select(0, idx) for n, v in self.values.items()},
                    self.slot[k], self.image[k])

    @staticmethod
    def cat(parts: list[Rows]) -> Rows:
        if len(parts) == 1:
            return parts[0]
        keys = parts[0].values.keys()
        return Rows({k: torch.cat([p.values[k] for p in parts]) for k in keys},
                    np.concatenate([p.slot for p in parts]),
                    np.concatenate([p.image for p in parts]))


class Pipeline:
    """Queues of rows per cut, run in chunks of exactly ``batch_size`` rows.

    ``golden(node, images)`` returns cached golden values; rows bit-identical to golden at a
    ``stop`` cut are dropped (their remaining computation is golden). Comparing is only an
    optimisation, so a stop whose comparisons rarely drop rows (< 1 % after a warm-up, < 5 %
    at a stop with a cut certificate, whose check costs more;
    ``stats[stop] = [rows compared, rows dropped, chunks skipped, rows certified]``, shared between
    pipelines) is only re-probed now and then; outputs are always compared. At the end, rows whose
    output differs from golden are scored in chunks and reported through ``report(slots,
    images, facts, nonfinite_rows, outputs)``. ``inputs(images)`` gives the input rows for scoring;
    ``facts(inputs, outputs, images)`` the per-image facts (``images``: their dataset rows).
    """

    def __init__(self, program: Program | None, stops: list[int], batch_size: int,
                 golden: Callable[[Any, np.ndarray], Tensor],
                 inputs: Callable[[np.ndarray], Tensor],
                 facts: Callable[[Tensor, Tensor, np.ndarray], Tensor],
                 report: Callable[[np.ndarray, np.ndarray, Tensor, Tensor, Tensor], None],
                 stats: dict[int, list[int]] | None = None,
                 cut_radius: Callable[[int], np.ndarray | None] | None = None,
                 certified: Callable[[np.ndarray, np.ndarray], None] | None = None) -> None:
        self.prog, self.bs = program, batch_size
        self.cut_radius, self.certified = cut_radius, certified
        self.stops = sorted(stops)
        self.golden, self.inputs, self.facts, self.report = golden, inputs, facts, report
        self.queues: dict[int, list[Rows]] = {}
        self.stats = stats if stats is not None else {}
        self.end = program.end if program is not None else 0
        self.out_key: Any = program.output if program is not None else "out"

    def _next_stop(self, p: int) -> int:
        for s in self.stops:
            if s > p:
                return s
        return self.end

    def push(self, p: int, rows: Rows) -> None:
        """Queue ``rows`` (live values of cut ``p``; ``p == end``: the model outputs)."""
        if not len(rows):
            return
        q = self.queues.setdefault(p, [])
        q.append(rows)
        n = sum(len(r) for r in q)
        while n >= self.bs:
            head, tail = Rows.cat(q).split(self.bs)
            q[:] = [tail] if len(tail) else []
            n -= self.bs
            self._process(p, head)

    def flush(self) -> None:
        """Run every queued row to the end (partial chunks padded)."""
        while True:
            ready = [p for p, q in self.queues.items() if q]
            if not ready:
                return
            p = min(ready)
            rows = Rows.cat(self.queues[p])
            self.queues[p] = []
            while len(rows):
                head, rows = rows.split(self.bs)
                self._process(p, head)

    def _process(self, p: int, rows: Rows) -> None:
        r = len(rows)
        if p == self.end:
            out = rows.values[self.out_key]
            x = pad_rows(self.inputs(rows.image), self.bs)
            facts = self.facts(x, pad_rows(out, self.bs), rows.image)[:r]
            bad = ~torch.isfinite(out.reshape(r, -1)).all(dim=1) if out.is_floating_point() \
                else torch.zeros(r, dtype=torch.bool, device=out.device)
            self.report(rows.slot, rows.image, facts, bad, out)
            return
        assert self.prog is not None
        stop = self._next_stop(p)
        env: dict[Any, Any] = {k: pad_rows(v, self.bs) for k, v in rows.values.items()}
        env = self.prog.run(env, p, stop)
        if stop == self.end:
            env = {self.out_key: env[self.out_key]}
        vals = {k: v[:r] for k, v in env.items()}
        st = self.stats.setdefault(stop, [0, 0, 0, 0])
        rho = self.cut_radius(stop) if self.cut_radius is not None else None
        # A stop with a cut certificate pays for its (costlier) check at a higher drop rate.
        rate = 100 if rho is None else 20
        if stop != self.end and st[0] >= 4 * self.bs and rate * st[1] < st[0]:
            st[2] += 1
            if st[2] % 32:
                self.push(stop, Rows(vals, rows.slot, rows.image))
                return
        keep = torch.zeros(r, dtype=torch.bool, device=next(iter(vals.values())).device)
        for k, v in vals.items():
            keep |= ~same_rows(v, self.golden(k, rows.image))
        if rho is not None and len(vals) == 1 and bool(keep.any()) and \
                next(iter(vals.values())).is_floating_point():
            ((k, v),) = vals.items()
            # |fl(v - g)| >= |v - g| (1 - u): the float32 difference, enlarged, bounds it.
            d = (v - self.golden(k, rows.image)).abs().reshape(r, -1).amax(1).double()
            d = d * (1.0 + 2.0 * float(torch.finfo(v.dtype).eps))
            ok = keep & (d < torch.as_tensor(rho[rows.image], device=d.device))  # NaN: False
            if bool(ok.any()):
                sel = ok.cpu().numpy()
                assert self.certified is not None
                self.certified(rows.slot[sel], rows.image[sel])
                st[3] += int(sel.sum())
                keep &= ~ok
        n_keep = int(keep.sum())
        st[0] += r
        st[1] += r - n_keep
        if n_keep == r:
            self.push(stop, Rows(vals, rows.slot, rows.image))
        elif n_keep:
            self.push(stop, Rows(vals, rows.slot, rows.image).select(keep))
