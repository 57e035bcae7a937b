"""Fast, exact evaluation of many faults over a dataset.

One golden run caches, for every parametrised layer of an ``torch.fx``-traceable model, the
values live at the cut before it (memory while they fit ``cache_budget_bytes``, else a
memmap). A fault then runs from its layer only: the faulty layer output is computed from the
cached cut (for Conv/ConvTranspose/Linear weight and bias faults only the affected block of
output channels, when a probe shows that block is bit-identical to the full layer), rows
(images) whose values are bit-identical to golden are dropped at every cached cut, and the
rows of up to ``fault_batch`` faults are stacked into fixed-shape chunks for the rest of the
network. Every forward runs on exactly ``batch_size`` rows, so outputs are bit-identical to
``model(x_chunk)`` evaluated naively with the fault injected in place. Models that cannot be
traced (or whose trace disagrees with ``forward``) fall back to full forwards with in-place
injection.

>>> eng = Engine(model, images, DetectionTask(scorer.scores, thr, labels))  # doctest: +SKIP
>>> outcomes = eng.run(faults)                                               # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from flipguard.errors import ConfigError
from flipguard.faults import Fault, NumberFormat, fault_to_dict, get_format
from flipguard.inject.cache import GoldenCache
from flipguard.inject.cache import heap_reuse as reuse_heap
from flipguard.inject.certify import Certifier
from flipguard.inject.graph import Pipeline, Program, Rows, pad_rows, same_rows, trace
from flipguard.inject.injector import (
    activation_fault,
    block_forward,
    faulty_value,
    inject,
    module_of,
    probe_block,
    working_copy,
)
from flipguard.inject.outcomes import Criterion, Golden, Outcome, parse_criterion
from flipguard.inject.tasks import Task, fill_masked, logit_gap

__all__ = ["Engine", "evaluate_faults"]

Progress = Callable[[int, int], None]
_OUT = "__golden_out__"


@dataclass
class _Item:
    index: int  # position in the caller's fault list
    fault: Fault
    pos: int  # graph position of the layer; -1: full forward
    slot: int = 0  # row in the pass arrays
    certified: np.ndarray | None = None  # images whose decision is proven (not simulated)


class Engine:
    """Evaluate faults of ``model`` over ``inputs`` (N, ...) for ``task``.

    ``fmt``: number format of the stored words; for fmt != "fp32" a working copy whose
    Conv/ConvTranspose/Linear weights and biases (or those of ``layers``) are quantised is
    the golden model (the user's model is never changed; for fp32 its weights are patched
    in place and restored bit-exactly). ``layers`` also limits which layers get cached cuts
    (faults elsewhere run as full forwards). ``early_stop``: a criterion (text or object);
    images then run in chunks of ``batch_size`` and a fault stops as soon as it is certainly
    critical. ``strategy``: "auto" or "full" (always full forwards, the naive reference).
    ``heap_reuse``: let glibc keep freed activation buffers during the golden run and
    ``run`` (see :func:`~flipguard.inject.cache.heap_reuse`). ``channel_blocks``: compute
    only the faulty output-channel block of Conv/ConvT/Linear layers where a probe proves it
    bit-identical ("auto": where also faster, "always", "never"). ``certify``: weight/bias
    faults a :class:`~flipguard.inject.certify.Certifier` proves harmless to every decision
    are not simulated, and other faults only on the images it cannot certify
    (``Outcome.n_certified``); a simulated image is also dropped at a later cut once its
    measured change there is below that cut's certificate
    (:meth:`~flipguard.inject.certify.Certifier.cut_radius`). ``image_order="margin"``:
    images nearest to their decision boundary run first (detector: |score - threshold|;
    classifier: top-1 logit gap), so an ``early_stop`` decision on a fault that flips only
    borderline images comes sooner (a fault that moves every score decides in the first
    chunks in any order).
    ``golden`` holds the golden facts; ``strategy_used`` / ``fallback_reason`` say how faults
    are evaluated.

    Example:
        >>> eng = Engine(model, x, ClassificationTask(y), batch_size=32)  # doctest: +SKIP
        >>> [o.masked for o in eng.run(faults)]                          # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, inputs: Tensor, task: Task, *, fmt: str = "fp32",
                 device: str | torch.device = "cpu", batch_size: int = 64,
                 cache_budget_bytes: int = 2**31, cache_dir: str | Path | None = None,
                 fault_batch: int = 8, early_stop: str | Criterion | None = None,
                 layers: Sequence[str] | None = None, strategy: str = "auto",
                 heap_reuse: bool = True, channel_blocks: str = "auto",
                 certify: bool = False, image_order: str = "index") -> None:
        if not isinstance(inputs, Tensor) or inputs.dim() < 1 or inputs.shape[0] < 1:
            raise ConfigError("inputs: expected a tensor (N, ...) with at least one sample")
        if not isinstance(task, Task):
            raise ConfigError("task: expected a DetectionTask or ClassificationTask")
        for name, v in (("batch_size", batch_size), ("fault_batch", fault_batch)):
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}: expected an integer >= 1, got {v!r}")
        for name, v, ok in (("strategy", strategy, ("auto", "full")),
                            ("channel_blocks", channel_blocks, ("auto", "always", "never")),
                            ("image_order", image_order, ("index", "margin"))):
            if v not in ok:
                raise ConfigError(f"{name}: expected one of {', '.join(ok)}, got {v!r}")
        task.check(int(inputs.shape[0]))
        self.task, self.inputs, self.n = task, inputs, int(inputs.shape[0])
        self.device, self.fault_batch = torch.device(device), fault_batch
        self.bs = min(batch_size, self.n)  # every forward runs on exactly this many rows
        self.fmt: NumberFormat = get_format(fmt)
        self.early_stop = parse_criterion(early_stop) if early_stop is not None else None
        was_training = model.training
        self.model, self.formats = working_copy(model, self.fmt, self.device, layers)
        self._layers = set(layers) if layers is not None else None
        self.program: Program | None = None
        self._fallback_reason: str | None = "strategy 'full' requested"
        if strategy == "auto":
            try:
                self.program, self._fallback_reason = trace(self.model), None
                self.program.output  # noqa: B018 - raises unless a single tensor output
            except Exception as exc:  # noqa: BLE001 - any tracing failure means fallback
                msg = str(exc).splitlines()[0][:120] if str(exc) else ""
                self.program = None
                self._fallback_reason = f"not traceable by torch.fx ({type(exc).__name__}: {msg})"
        self.cache = GoldenCache(self.n, cache_budget_bytes, self.device, cache_dir)
        self._cache_dir, self._blocks, self._heap_reuse = cache_dir, channel_blocks, heap_reuse
        self._block: dict[str, int] = {}  # layer -> output-channel block size (0: full)
        self._stop_stats: dict[int, list[int]] = {}
        self._was_training, self._golden = was_training, None
        self._certify, self.certifier = bool(certify), None
        self._image_order = image_order
        self._side: Any = None  # the task's input-side terms (Task.input_side), at prepare()
        self._order = np.arange(self.n)
        self.model.train(was_training)

    def prepare(self) -> Engine:
        """The golden pass (idempotent; ``run``, ``golden`` and ``golden_outputs`` call it):
        one fault-free forward over every input that caches the cuts and the golden facts.
        A model whose parameters or fault-free outputs are not finite is refused with one
        line naming the tensor (its faults could not be told from golden).

        >>> from flipguard.inject import ClassificationTask
        >>> eng = Engine(torch.nn.Linear(2, 2), torch.ones(3, 2), ClassificationTask([0, 1, 1]))
        >>> eng.prepare().golden.n_images
        3
        """
        if self._golden is None:
            _check_finite_parameters(self.model)
            with torch.no_grad(), reuse_heap(self._heap_reuse):
                self.model.eval()
                try:
                    self._side = self.task.input_side(self.inputs)
                    self._golden_run()
                finally:
                    self.model.train(self._was_training)
            if self.golden_nonfinite.any():
                bad = np.flatnonzero(self.golden_nonfinite)
                raise ConfigError(f"model: the fault-free output is non-finite (NaN/Inf) for "
                                  f"{bad.size} of {self.n} inputs (first: input {bad[0]})")
            if self._certify:
                self.certifier = Certifier(self)
            if self._image_order == "margin":
                self._order = _margin_order(self.task, self.golden, self.golden_outputs)
        return self

    @property
    def golden(self) -> Golden:
        """Golden (fault-free) facts (runs the golden pass on first use)."""
        self.prepare()
        assert self._golden is not None
        return self._golden

    @property
    def fallback_reason(self) -> str | None:
        """Why faults run as full forwards (None when the graph path is used)."""
        return self.prepare()._fallback_reason

    def _x(self, rows: slice | np.ndarray) -> Tensor:
        """Inputs ``rows`` (a slice or image indices) on the device, padded to the batch."""
        idx = rows if isinstance(rows, slice) else torch.as_tensor(rows)
        return pad_rows(self.inputs[idx].to(self.device, copy=True), self.bs)

    def _fresh(self, env: dict[Any, Tensor]) -> dict[Any, Tensor]:
        """``env`` with private copies of values the graph changes in place."""
        mut = self.program.mutated  # type: ignore[union-attr]
        return {k: v.clone() if k in mut else v for k, v in env.items()}

    def _golden_run(self) -> None:
        prog, n, bs = self.program, self.n, self.bs
        record: set[Any] = set()
        self.cuts: dict[str, list[Any]] = {}
        if prog is not None:
            for name, p in prog.calls.items():
                m = prog.gm.get_submodule(name)
                wanted = self._layers is None or name in self._layers
                if wanted and next(iter(m.parameters(recurse=False)), None) is not None:
                    self.cuts[name] = prog.live(p)
                    record.update(self.cuts[name])
        invalid: set[Any] = set()
        facts, bad_rows = [], []
        for a in range(0, n, bs):
            b = min(a + bs, n)
            x = self._x(slice(a, b))
            y = self.model(x)
            if not isinstance(y, Tensor) or y.shape[0] != bs:
                raise ConfigError("model: expected a single batched tensor output")
            if prog is not None:

                def sink(node: Any, v: Any, a: int = a, b: int = b) -> None:
                    if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == bs:
                        if node not in invalid:
                            self.cache.write(node, a, v[: b - a])
                    else:
                        invalid.add(node)

                env = prog.run({prog.input: x}, 0, prog.end, record, sink)
                if not same_rows(env[prog.output], y).all():  # trace-time specialisation
                    self.program = None
                    self._fallback_reason = "the traced graph's output differs from forward()"
                    self.cache.drop()
                    self.cache = GoldenCache(n, self.cache.budget, self.device, self._cache_dir)
                    return self._golden_run()
            self.cache.write(_OUT, a, y[: b - a], pinned=True)
            ref = (y,) if self.task.needs_golden_outputs else ()
            facts.append(self._facts(x, y, np.arange(a, b), *ref)[: b - a].cpu().numpy())
            bad_rows.append((~torch.isfinite(y[: b - a].reshape(b - a, -1)).all(1)).cpu()
                            if y.is_floating_point() else torch.zeros(b - a, dtype=torch.bool))
        self.cuts = {k: v for k, v in self.cuts.items() if not invalid.intersection(v)}
        self.golden_nonfinite = torch.cat(bad_rows).numpy()
        all_facts = np.concatenate(facts).astype(self.task.fact_dtype)
        self._golden = self.task.golden(all_facts, bool(self.golden_nonfinite.any()))
        self._masked_fields = fill_masked(self._golden, self.task).to_dict()
        self.stops = sorted({prog.calls[k] for k, live in self.cuts.items()
                             if all(self.cache.in_memory(v) for v in live)}) if prog else []
        for layer in self.cuts if self._blocks != "never" else ():  # probe on the 1st chunk
            node = prog.nodes[prog.calls[layer]]  # type: ignore[union-attr]
            env = {v: pad_rows(self.cache.read(v, 0, bs), bs) for v in self.cuts[layer]}
            x = env.get(node.args[0]) if len(node.args) == 1 and not node.kwargs else None
            self._block[layer] = 0 if x is None else probe_block(
                prog.gm.get_submodule(layer), x, prog.call(node, env), self._blocks == "auto")

    strategy_used = property(lambda self: "graph" if self.prepare().program else "full-forward",
                             doc='"graph" (run from the faulty layer) or "full-forward".')

    def run(self, faults: Sequence[Fault], progress: Progress | None = None) -> list[Outcome]:
        """Raw :class:`Outcome` of every fault, in the same order.

        Example:
            >>> eng.run([Fault("weight", "encoder.0", 3, (30,))])[0].n_images  # doctest: +SKIP
            700
        """
        return self._run(faults, progress, None)

    @property
    def golden_outputs(self) -> Tensor:
        """Golden model outputs (N, ...): a new CPU tensor."""
        return self.prepare().cache.read(_OUT, 0, self.n).to("cpu", copy=True)

    def faulty_outputs(self, faults: Sequence[Fault]) -> list[Tensor]:
        """Faulty model outputs (N, ...) per fault, as the engine computes them (CPU).

        Example:
            >>> y = eng.faulty_outputs([Fault("bias", "encoder.0", 1, (30,))])[0]  # doctest: +SKIP
        """
        outs = [self.golden_outputs for _ in faults]

        def capture(idx: np.ndarray, images: np.ndarray, rows: Tensor) -> None:
            for i in np.unique(idx):
                sel = idx == i
                outs[int(i)][torch.as_tensor(images[sel])] = rows[torch.as_tensor(sel)].cpu()

        self._run(faults, None, capture)
        return outs

    def _run(self, faults: Sequence[Fault], progress: Progress | None,
             capture: Callable[[np.ndarray, np.ndarray, Tensor], None] | None) -> list[Outcome]:
        self.prepare()
        faults = list(faults)
        results: list[Outcome | None] = [None] * len(faults)
        todo: list[_Item] = []
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), reuse_heap(self._heap_reuse):
                for i, f in enumerate(faults):
                    if not isinstance(f, Fault):
                        raise ConfigError(f"faults[{i}]: expected a Fault, got "
                                          f"{type(f).__name__}")
                    pre, mask = self._precheck(f)
                    if pre is not None:
                        results[i] = pre
                    else:
                        graph = self.program is not None and f.layer in self.cuts
                        pos = self.program.calls[f.layer] if graph else -1  # type: ignore
                        todo.append(_Item(i, f, pos, certified=mask if graph else None))
                todo.sort(key=lambda it: (it.pos < 0, it.pos, it.index))
                done = len(faults) - len(todo)
                for s in range(0, len(todo), self.fault_batch):
                    items = todo[s : s + self.fault_batch]
                    for slot, it in enumerate(items):
                        it.slot = slot
                    for it, o in zip(items, self._run_pass(items, capture), strict=True):
                        results[it.index] = o
                    done += len(items)
                    if progress is not None:
                        progress(done, len(faults))
        finally:
            self.model.train(was_training)
        return [r for r in results if r is not None]

    def _precheck(self, f: Fault) -> tuple[Outcome | None, np.ndarray | None]:
        """Exact early exits (stuck-at no-ops, faults leaving the stored value unchanged,
        faults certified on every image); else the mask of certified images (or None)."""
        if f.bits[-1] >= self.fmt.bits:
            raise ConfigError(f"bits: expected 0..{self.fmt.bits - 1} for {self.fmt.name}, "
                              f"got {f.bits[-1]}")
        if f.target == "activation":
            module_of(self.model, f.layer)  # raises for an unknown layer
            return None, None
        if self.fmt.name != "fp32" and (f.layer, f.target) not in self.formats:
            raise ConfigError(f"layer: {f.layer}.{f.target} is not stored in {self.fmt.name} "
                              f"by this engine; list it in Engine(layers=...)")
        old, new, noop = faulty_value(self.model, f, self._format(f))
        if noop or bool(same_rows(old.reshape(1, 1), new.reshape(1, 1))[0]):
            return Outcome(**{**self._masked_fields, "noop": noop, "masked": True,
                              "n_images": 0}), None
        mask = None
        if self.certifier is not None:
            with torch.no_grad():
                mask = self.certifier.image_mask(f, old, new)
            if mask is not None and bool(mask.all()):
                return Outcome(**{**self._masked_fields, "masked": False, "n_images": 0,
                                  "n_certified": self.n}), None
        return None, mask if mask is not None and bool(mask.any()) else None

    def _facts(self, x: Tensor, out: Tensor, images: np.ndarray, *ref: Tensor) -> Tensor:
        """The task's facts of the (padded) chunk ``x`` holding dataset rows ``images``:
        padding rows repeat the first row (:func:`pad_rows`), so do their input sides."""
        if self._side is None:
            return self.task.image_facts(x, out, *ref)
        rows = np.concatenate([images, np.full(x.shape[0] - len(images), images[0])])
        return self.task.image_facts(x, out, *ref, side=self._side.take(rows))

    def _format(self, f: Fault) -> NumberFormat:
        if f.target == "activation":
            return self.fmt
        return self.formats.get((f.layer, f.target), self.fmt)

    def _pipeline(self, report: Callable[..., None],
                  certified: Callable[[np.ndarray, np.ndarray], None] | None = None) -> Pipeline:
        out_node = self.program.output if self.program is not None else "out"

        def golden(key: Any, images: np.ndarray) -> Tensor:
            return self.cache.gather(_OUT if key is out_node else key, images)

        def inputs(images: np.ndarray) -> Tensor:
            return self.inputs[torch.as_tensor(images)].to(self.device)

        def facts(x: Tensor, out: Tensor, images: np.ndarray) -> Tensor:
            if not self.task.needs_golden_outputs:
                return self._facts(x, out, images)
            return self._facts(x, out, images, pad_rows(golden(out_node, images), self.bs))

        cut = self.certifier.cut_radius if self.certifier is not None and certified else None
        return Pipeline(self.program, self.stops, self.bs, golden, inputs, facts, report,
                        self._stop_stats, cut, certified)

    def _run_pass(self, items: list[_Item], capture: Callable[..., None] | None
                  ) -> list[Outcome]:
        k, n, bs = len(items), self.n, self.bs
        facts = np.tile(self.golden.facts, (k, 1))
        changed = np.zeros((k, n), dtype=bool)
        nonfin = np.zeros((k, n), dtype=bool)
        evaluated = np.zeros(k, dtype=np.int64)
        slot_index = np.array([it.index for it in items])

        def report(slots: np.ndarray, images: np.ndarray, fct: Tensor, bad: Tensor,
                   out: Tensor) -> None:
            facts[slots, images] = fct.cpu().numpy()
            changed[slots, images] = True
            nonfin[slots, images] = bad.cpu().numpy()
            if capture is not None:
                capture(slot_index[slots], images, out)

        certified = np.zeros(k, dtype=np.int64)

        def certify_rows(slots: np.ndarray, images: np.ndarray) -> None:  # dropped at a cut
            np.add.at(certified, slots, 1)
            np.add.at(evaluated, slots, -1)

        pipe = self._pipeline(report, certify_rows)
        active = list(items)
        for a in range(0, n, bs):
            b = min(a + bs, n)
            images = self._order[a:b]
            self._chunk(pipe, active, a, b)
            for it in active:
                c = 0 if it.certified is None else int(it.certified[images].sum())
                evaluated[it.slot] += b - a - c
                certified[it.slot] += c
            if self.early_stop is not None and b < n:
                pipe.flush()
                remaining = np.zeros(n, dtype=bool)
                remaining[self._order[b:]] = True
                active = [it for it in active if not self.early_stop.certain(
                    self._outcome(it.slot, facts, changed, nonfin, evaluated, certified),
                    self.golden,
                    remaining, facts[it.slot])]
            if not active:
                break
        pipe.flush()
        return [self._outcome(it.slot, facts, changed, nonfin, evaluated, certified)
                for it in items]

    def _outcome(self, s: int, facts: np.ndarray, changed: np.ndarray, nonfin: np.ndarray,
                 evaluated: np.ndarray, certified: np.ndarray) -> Outcome:
        n_changed, n_cert = int(changed[s].sum()), int(certified[s])
        stopped = bool(evaluated[s] + n_cert < self.n)
        if n_changed == 0:
            return Outcome(**{**self._masked_fields, "masked": n_cert == 0,
                              "n_images": int(evaluated[s]), "n_certified": n_cert,
                              "early_stopped": stopped})
        fields = self.task.outcome_fields(facts[s], self.golden)
        return Outcome(noop=False, masked=False, n_images=int(evaluated[s]), n_changed=n_changed,
                       n_certified=n_cert, early_stopped=stopped,
                       nonfinite_outputs=bool((nonfin[s] & ~self.golden_nonfinite).any()),
                       **fields)

    def _rows(self, key: Any, a: int, b: int) -> Tensor:
        """Cached rows of the images at positions ``a..b-1`` of the image order."""
        if self._image_order == "index":
            return self.cache.read(key, a, b)
        return self.cache.gather(key, self._order[a:b])

    def _chunk(self, pipe: Pipeline, items: list[_Item], a: int, b: int) -> None:
        """Feed the images at positions ``a..b-1`` of the image order of every fault in
        ``items`` into the pipeline."""
        r, images, bs = b - a, self._order[a:b], self.bs
        golden_out = self._rows(_OUT, a, b)
        by_layer: dict[str, list[_Item]] = {}
        for it in items:
            if it.pos >= 0:
                by_layer.setdefault(it.fault.layer, []).append(it)
                continue
            with inject(self.model, it.fault, self._format(it.fault)):
                y = self.model(self._x(images))[:r]
            keep = ~same_rows(y, golden_out)
            rows = Rows({pipe.out_key: y}, np.full(r, it.slot), images)
            pipe.push(pipe.end, rows.select(keep) if not bool(keep.all()) else rows)
        prog = self.program
        for layer, group in by_layer.items():
            assert prog is not None
            p = prog.calls[layer]
            node = prog.nodes[p]
            env = {v: pad_rows(self._rows(v, a, b), bs) for v in self.cuts[layer]}
            gold = prog.call(node, self._fresh(env))
            after = prog.live(p + 1)
            for it in group:
                out, sl = self._faulty_layer(it.fault, node, env, gold)
                keep = ~same_rows(out[:r, sl], gold[:r, sl])
                if it.certified is not None:
                    keep &= ~torch.as_tensor(it.certified[images], device=keep.device)
                if not bool(keep.any()):
                    continue
                vals = {v: out[:r] if v is node else
                        env[v][:r].clone() if v in prog.mutated else env[v][:r] for v in after}
                rows = Rows(vals, np.full(r, it.slot), images)
                pipe.push(p + 1, rows if bool(keep.all()) else rows.select(keep))

    def _faulty_layer(self, f: Fault, node: Any, env: dict[Any, Tensor], gold: Tensor
                      ) -> tuple[Tensor, slice]:
        """Faulty output of the fault's layer and the channels (dim 1) that can differ."""
        assert self.program is not None
        if f.target == "activation":
            return activation_fault(gold, f, self.fmt), slice(None)
        size = self._block.get(f.layer, 0)
        if size:
            _, new, _ = faulty_value(self.model, f, self._format(f))
            module = self.model.get_submodule(f.layer)
            lo, hi, blk = block_forward(module, f, new, self._fresh(env)[node.args[0]], size)
            out = gold.clone()
            out[:, lo:hi] = blk
            return out, slice(lo, hi)
        with inject(self.model, f, self._format(f)):
            out = self.program.call(node, self._fresh(env))
        return out, slice(None)


def _margin_order(task: Task, golden: Golden, outputs: Tensor) -> np.ndarray:
    """Image indices nearest to their decision boundary first, the images a small change
    flips first (stable; index order for tasks without a margin)."""
    facts = np.asarray(golden.facts, dtype=np.float64)
    if task.kind == "detection":
        margin = np.abs(facts - float(golden.threshold or 0.0))
    elif task.kind == "classification" and outputs.dim() == 2:
        margin = logit_gap(outputs)[1]
    else:
        return np.arange(len(facts))
    return np.argsort(margin, kind="stable")


def _check_finite_parameters(model: nn.Module) -> None:
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ConfigError(f"model: tensor '{name}' holds {bad} non-finite values (NaN/Inf); "
                              f"a fault-free reference needs finite weights")


def evaluate_faults(model: nn.Module, inputs: Tensor, task: Task, faults: Sequence[Fault],
                    **engine_kwargs: Any) -> list[dict[str, Any]]:
    """Notebook helper: run ``faults`` through an :class:`Engine` and return one flat record
    per fault (fault fields, bits as "29,30", plus the outcome fields).

    Example:
        >>> recs = evaluate_faults(model, x, ClassificationTask(y), faults)  # doctest: +SKIP
    """
    eng = Engine(model, inputs, task, **engine_kwargs)
    return [{**fault_to_dict(f, bits_as="str"), **o.to_dict()}
            for f, o in zip(faults, eng.run(faults), strict=True)]
