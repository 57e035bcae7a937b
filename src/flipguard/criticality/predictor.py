"""Cheap criticality predictor for every fault site, computed once per model and dataset.

Image ``i`` (golden fact ``s_i``: a detector's score, a classifier's logit margin; threshold
``θ``, 0 for classifiers) flips its decision, to first order, when a fault moving a value by
``Δ`` gives ``Δ r_i > 1`` with ``r_i = (∂s_i/∂v) / (θ - s_i)``. The criterion needs ``k``
flips (:func:`criterion_k`), so a site's *criticality ratio* is ``ρ = k-th largest_i Δ r_i``;
weights keep only ``R± = k-th largest ±r_i`` per element (``ρ = Δ R+`` or ``-Δ R-``), scored
per (layer, bit) vectorised over the tensor; activations keep ``ρ`` per (element, bit, kind).
A faulty value that is NaN/Inf or beyond ``range_factor`` x the tensor's largest magnitude
gets ``ρ = inf`` ("extreme"). Classes: ``ρ < 1e-3`` harmless, ``< 0.1`` low, ``< 1``
borderline, ``>= 1`` critical, ``inf`` extreme. Details: docs/criticality.md.

Example::

    pred = Predictor.build(model, images, DetectionTask(scorer.scores, thr, labels))
    pred.classes("encoder.0", bit=30)[:4]      # array([4, 4, 4, 4], dtype=uint8)
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from flipguard.campaign.substrata import CLASS_LABELS, CLASS_PRIORS
from flipguard.detect import Scorer
from flipguard.errors import ConfigError
from flipguard.faults import Fault, SiteSpace, apply_bits, get_format
from flipguard.fileio import save_torch
from flipguard.inject import parse_criterion
from flipguard.layers import forward_hooks

__all__ = ["CLASS_LABELS", "CLASS_PRIORS", "DEFAULT_EDGES", "EXTREME", "Predictor",
           "classes_of_rho", "criterion_k", "differentiable_score_fn"]

DEFAULT_EDGES = (1e-3, 0.1, 1.0)
EXTREME = len(CLASS_LABELS) - 1
_VERSION = 1


def classes_of_rho(rho: np.ndarray, edges: Sequence[float] = DEFAULT_EDGES) -> np.ndarray:
    """Class (uint8) of criticality ratios: bins of ``edges``, ``inf`` -> :data:`EXTREME`.

    >>> classes_of_rho(np.array([0.0, 0.01, 0.5, 3.0, np.inf])).tolist()
    [0, 1, 2, 3, 4]
    """
    r = np.asarray(rho, dtype=np.float64)
    out = np.searchsorted(np.asarray(edges, dtype=np.float64), r, side="right").astype(np.uint8)
    out[np.isinf(r)] = EXTREME
    return out


def criterion_k(criterion: Any, n_images: int) -> tuple[int, bool]:
    """``(k, correct_only)``: decision flips needed for ``criterion`` and whether only
    correctly decided images count (accuracy-drop).

    >>> criterion_k("accuracy-drop:0.01", 700)
    (8, True)
    """

    c = parse_criterion(criterion)
    if c.name in ("accuracy-drop", "mismatch"):
        return int(math.floor(c.delta * n_images + 1e-9)) + 1, c.name == "accuracy-drop"
    return 1, False


def differentiable_score_fn(score_fn: Callable) -> Callable:
    """A differentiable version of a detector's ``score_fn(inputs, recon)``: the
    :class:`~flipguard.detect.Scorer` computes its scores without autograd, so its map and
    reduction are composed directly; other callables are returned as they are."""

    owner = getattr(score_fn, "__self__", None)
    if isinstance(owner, Scorer):  # float32, as Scorer.scores computes
        return lambda x, y: owner.reduce(owner._maps(x.to(y.device, torch.float32),
                                                     y.to(torch.float32)))
    return score_fn


def _facts(task: Any, model: nn.Module, inputs: Tensor, batch: int
           ) -> tuple[Callable, np.ndarray, float]:
    """Differentiable fact function ``f(x, y, idx)``, golden facts and threshold."""
    if task.kind == "detection":
        sf = differentiable_score_fn(task.score_fn)
        fn: Callable = lambda x, y, idx: sf(x, y).reshape(-1)  # noqa: E731
        theta = float(task.threshold)
    elif task.kind == "classification":
        theta, top = 0.0, []
        with torch.no_grad():
            for a in range(0, len(inputs), batch):
                top.append(model(inputs[a:a + batch]).argmax(dim=1))
        golden = torch.cat(top)

        def fn(x: Tensor, y: Tensor, idx: Tensor) -> Tensor:
            g = golden[idx]
            own = y.gather(1, g[:, None])[:, 0]
            other = y.scatter(1, g[:, None], float("-inf")).amax(dim=1)
            return own - other
    else:
        raise ConfigError(f"task: expected a detection or classification task, got {task!r}")
    with torch.no_grad():
        s = [fn(inputs[a:a + batch], model(inputs[a:a + batch]),
                torch.arange(a, min(a + batch, len(inputs)))).double()
             for a in range(0, len(inputs), batch)]
    return fn, torch.cat(s).numpy(), theta


def _topk(buf: Tensor | None, new: Tensor, k: int) -> Tensor:
    both = new if buf is None else torch.cat([buf, new])
    return both if both.shape[0] <= k else both.topk(k, dim=0).values


@dataclass
class _Tensor:
    values: Tensor  # stored golden values (flat, float32)
    r_pos: Tensor  # k-th largest  r_i  (flat, >= 0)
    r_neg: Tensor  # k-th largest -r_i
    vmax: float


class Predictor:
    """Per-site predicted criticality of a model's fault sites (see module docstring).

    Build with :meth:`build` (for a run directory:
    :func:`flipguard.study.predictors.predictor_for_run`), then ``rho``/``classes`` per stratum,
    ``class_of(faults)`` or ``site_weights(...)`` (predicted probability of a critical
    fault, e.g. for an importance-sampling proposal).
    """

    def __init__(self, space: SiteSpace, tensors: dict[tuple[str, str], _Tensor],
                 acts: dict[str, np.ndarray], info: dict[str, Any],
                 edges: Sequence[float] = DEFAULT_EDGES, range_factor: float = 100.0) -> None:
        self.space, self.tensors, self.acts, self.info = space, tensors, acts, info
        self.edges, self.range_factor = tuple(float(e) for e in edges), float(range_factor)
        self.kinds = tuple(info.get("kinds", ("flip",)))

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, model: nn.Module, inputs: Tensor, task: Any,
              criterion: str = "accuracy-drop:0.01", *, targets: Iterable[str] = ("weight",),
              layers: Iterable[str] | None = None, fmt: str = "fp32", max_images: int = 64,
              kinds: Sequence[str] = ("flip",), batch: int = 16, range_factor: float = 100.0,
              edges: Sequence[float] = DEFAULT_EDGES) -> Predictor:
        """Per-image gradients of the task's facts on ``inputs`` (a detector/classifier task of
        :mod:`flipguard.inject`) for every target tensor; activations via forward hooks."""
        targets = tuple(targets)
        model.eval()
        space = SiteSpace(model, targets=targets, layers=layers, fmt=fmt,
                          example_input=inputs[:1] if "activation" in targets else None)
        fn, s, theta = _facts(task, model, inputs, batch)
        labels = np.asarray(task.labels)
        k, correct_only = criterion_k(criterion, len(inputs))
        finite = np.isfinite(s)
        correct = ((s > theta) == (labels > 0) if task.kind == "detection"
                   else _golden_is_label(model, inputs, labels, batch))
        counted = finite & (correct if correct_only else True)
        m = theta - s
        m = np.where(np.abs(m) < 1e-12, np.where(m < 0, -1e-12, 1e-12), m)
        order = np.flatnonzero(counted)
        grad_idx = order[np.argsort(np.abs(m[order]), kind="stable")][:max_images]
        info = {"k": k, "n_images": len(inputs), "counted": int(counted.sum()),
                "grad_images": len(grad_idx), "criterion": str(criterion), "fmt": fmt,
                "kinds": list(kinds), "task": task.kind, "version": _VERSION}
        tensors, acts = _gradients(model, space, inputs, fn, m, np.sort(grad_idx), k, kinds,
                                   batch, range_factor)
        return cls(space, tensors, acts, info, edges, range_factor)

    def save(self, path: str | Path) -> Path:
        """Write the predictor's statistics (``torch.save``, atomically)."""

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"info": json.dumps({**self.info, "edges": self.edges,
                                    "range_factor": self.range_factor,
                                    "targets": list(self.space.targets)}),
                "tensors": {f"{t}|{ly}": {"values": v.values, "r_pos": v.r_pos,
                                          "r_neg": v.r_neg, "vmax": torch.tensor(v.vmax)}
                            for (t, ly), v in self.tensors.items()},
                "acts": {ly: torch.from_numpy(a) for ly, a in self.acts.items()}}
        return save_torch(data, path)

    @classmethod
    def load(cls, path: str | Path, model: nn.Module, layers: Iterable[str] | None = None,
             example_input: Tensor | None = None) -> Predictor:
        """Read a predictor written by :meth:`save` for ``model`` (``weights_only``)."""
        data = torch.load(path, map_location="cpu", weights_only=True)
        info = json.loads(data["info"])
        space = SiteSpace(model, targets=info["targets"], layers=layers, fmt=info["fmt"],
                          example_input=example_input)
        tensors = {tuple(k.split("|", 1)): _Tensor(d["values"], d["r_pos"], d["r_neg"],
                                                    float(d["vmax"]))
                   for k, d in data["tensors"].items()}
        acts = {ly: a.numpy() for ly, a in data["acts"].items()}
        return cls(space, tensors, acts, info, info["edges"], info["range_factor"])

    # ------------------------------------------------------------------ scoring
    def _elements(self, layer: str, target: str | None, kernel: int | None) -> np.ndarray:
        ls = self.space.layer(layer, target)
        return (np.arange(ls.numel, dtype=np.int64) if kernel is None
                else ls.kernel_elements(kernel))

    def rho(self, layer: str, target: str | None = None, index: np.ndarray | None = None,
            bits: Sequence[int] | np.ndarray | None = None,
            kinds: Sequence[str] | None = None) -> np.ndarray:
        """Criticality ratios ``(len(index), len(bits), len(kinds))`` (float64, ``inf`` =
        extreme) of elements ``index`` (default all) of one target tensor."""
        ls = self.space.layer(layer, target)
        idx = np.arange(ls.numel) if index is None else np.asarray(index, dtype=np.int64)
        bitset = np.arange(self.space.fmt.bits) if bits is None else np.asarray(bits)
        kinds = tuple(kinds or self.kinds)
        if ls.target == "activation":
            return self._act_rho(ls.name, idx, bitset, kinds)
        st = self.tensors[(ls.target, ls.name)]
        fmt = self.space.bound_format(ls.name, ls.target, st.values.reshape(ls.shape))
        ti = torch.as_tensor(idx)
        vals, fsel = st.values[ti], fmt.select(ti)
        rp, rn = st.r_pos[ti].double(), st.r_neg[ti].double()
        out = np.empty((len(idx), len(bitset), len(kinds)))
        with torch.no_grad():
            for bi, b in enumerate(bitset.tolist()):
                for ki, kind in enumerate(kinds):
                    faulty = apply_bits(vals, 1 << int(b), kind, fsel)
                    d = faulty.double() - vals.double()
                    r = torch.where(d > 0, d * rp, -d * rn).clamp(max=1e300)
                    bad = ~torch.isfinite(faulty) | (faulty.abs() > self.range_factor * st.vmax)
                    r = torch.where(d == 0, torch.zeros_like(r), r)
                    out[:, bi, ki] = torch.where(bad, math.inf, r).numpy()
        return out

    def _act_rho(self, layer: str, idx: np.ndarray, bitset: np.ndarray,
                 kinds: Sequence[str]) -> np.ndarray:
        table = self.acts[layer]  # (A, bits, kinds of the build)
        ks = [self.kinds.index(k) if k in self.kinds else -1 for k in kinds]
        if min(ks) < 0:
            raise ConfigError(f"kinds: activation predictions were built for {self.kinds}")
        return table[idx][:, bitset][:, :, ks].astype(np.float64)

    def classes(self, layer: str, bit: int | None = None, kernel: int | None = None,
                bits: Any = None, target: str | None = None,
                kinds: Sequence[str] = ("flip",)) -> np.ndarray:
        """Class (uint8) of every fault of a stratum, in the campaign's stratum-local fault
        order ``j`` (site ``j // K`` as :meth:`SiteSpace.decode` numbers it, kind ``j % K``)."""
        bitset = self.space.resolve_bits(bit, bits)
        r = self.rho(layer, target, self._elements(layer, target, kernel), bitset, kinds)
        return classes_of_rho(r.reshape(-1), self.edges)

    def class_of(self, faults: Sequence[Fault]) -> np.ndarray:
        """Class of each single-bit fault (vectorised per tensor, bit and kind)."""
        out = np.zeros(len(faults), dtype=np.uint8)
        groups: dict[tuple, list[int]] = {}
        for i, f in enumerate(faults):
            groups.setdefault((f.target, f.layer, f.bits, f.kind), []).append(i)
        for (target, layer, bits, kind), pos in groups.items():
            if len(bits) != 1:
                raise ConfigError(f"faults: expected single-bit faults, got bits {bits}")
            idx = np.array([faults[i].index for i in pos], dtype=np.int64)
            r = self.rho(layer, target, idx, [bits[0]], [kind])[:, 0, 0]
            out[pos] = classes_of_rho(r, self.edges)
        return out

    def site_weights(self, target: str, layer: str, index: np.ndarray, bit: np.ndarray,
                     kind: str = "flip", probs: Sequence[float] = CLASS_PRIORS) -> np.ndarray:
        """Predicted probability that each site's fault is critical (``probs`` per class,
        e.g. calibrated by a pilot)."""
        faults = [Fault(target, layer, int(i), (int(b),), kind)
                  for i, b in zip(np.asarray(index).tolist(), np.asarray(bit).tolist(),
                                  strict=True)]
        return np.asarray(probs, dtype=np.float64)[self.class_of(faults)]

    def probability_matrix(self, layer: str, target: str | None = None, kind: str = "flip",
                           probs: Sequence[float] = CLASS_PRIORS) -> np.ndarray:
        """``(numel, bits)`` predicted critical probabilities of one tensor's sites."""
        r = self.rho(layer, target, None, None, [kind])[:, :, 0]
        return np.asarray(probs, dtype=np.float64)[classes_of_rho(r, self.edges)]


def _golden_is_label(model: nn.Module, inputs: Tensor, labels: np.ndarray,
                     batch: int) -> np.ndarray:
    with torch.no_grad():
        top = torch.cat([model(inputs[a:a + batch]).argmax(dim=1)
                         for a in range(0, len(inputs), batch)])
    return top.numpy() == labels


class _ActAcc:
    """Running top-k of one activation's flip ratios per (element, bit, kind) plus the
    largest faulty magnitude and a non-finite flag (for the exact "extreme" facts)."""

    def __init__(self, numel: int, nb: int, nk: int) -> None:
        self.buf: Tensor | None = None
        self.maxabs = torch.zeros(numel, nb, nk)
        self.nonfinite = torch.zeros(numel, nb, nk, dtype=torch.bool)
        self.amax = 0.0

    def update(self, act: Tensor, r: Tensor, fmt: Any, kinds: Sequence[str], k: int) -> None:
        nb = self.maxabs.shape[1]
        ratios = torch.empty(1, act.numel(), nb, len(kinds), dtype=torch.float64)
        f = fmt if fmt.is_bound else get_format(fmt.name, scale=float(
            max(act.abs().max().item() / 127.0, torch.finfo(torch.float32).eps)))
        for b in range(nb):
            for ki, kind in enumerate(kinds):
                faulty = apply_bits(act, 1 << b, kind, f)
                fin = torch.isfinite(faulty)
                d = torch.where(fin, faulty.double() - act.double(), 0.0)
                ratios[0, :, b, ki] = (d * r).clamp(-1e300, 1e300)
                self.nonfinite[:, b, ki] |= ~fin
                mag = torch.where(fin, faulty.abs(), 0.0)
                self.maxabs[:, b, ki] = torch.maximum(self.maxabs[:, b, ki], mag)
        self.buf = _topk(self.buf, ratios, k)
        self.amax = max(self.amax, float(act.abs().max()))

    def rho(self, k: int, range_factor: float) -> np.ndarray:
        if self.buf is None or self.buf.shape[0] < k:
            rho = torch.zeros(self.maxabs.shape, dtype=torch.float64)
        else:
            rho = self.buf[k - 1].clamp(min=0)
        bad = self.nonfinite | (self.maxabs > range_factor * self.amax)
        return torch.where(bad, math.inf, rho).float().numpy()


def _gradients(model: nn.Module, space: SiteSpace, inputs: Tensor, fn: Callable, m: np.ndarray,
               idx: np.ndarray, k: int, kinds: Sequence[str], batch: int, range_factor: float
               ) -> tuple[dict[tuple[str, str], _Tensor], dict[str, np.ndarray]]:
    """Per-image gradient loop; running top-k of the flip ratios per element (and bit)."""
    fmt = get_format(space.fmt)
    wkeys = [(ls.target, ls.name) for ls in space.layers if ls.target != "activation"]
    alayers = [ls for ls in space.layers if ls.target == "activation"]
    params = [getattr(space.modules[ly], t) for t, ly in wkeys]
    pos: dict[Any, Tensor | None] = dict.fromkeys(wkeys)
    neg: dict[Any, Tensor | None] = dict.fromkeys(wkeys)
    accs = {ls.name: _ActAcc(ls.numel, fmt.bits, len(kinds)) for ls in alayers}
    grads_on = [p.requires_grad for p in params]
    captured: dict[str, Tensor] = {}

    def hook(name: str, _m: nn.Module, _i: object, out: Tensor) -> Tensor:
        captured[name] = out
        return out.clone()  # later in-place ops must not touch the captured value

    hooked = {ls.name: space.modules[ls.name] for ls in alayers}
    try:
        with forward_hooks(hooked, hook):
            for p in params:
                p.requires_grad_(True)
            for a in range(0, len(idx), batch):
                chunk = torch.as_tensor(idx[a:a + batch])
                with torch.enable_grad():
                    x = inputs[chunk]
                    s = fn(x, model(x), chunk)
                    wrt = params + [captured[ls.name] for ls in alayers]
                    for j, i in enumerate(chunk.tolist()):
                        gs = torch.autograd.grad(s[j], wrt, retain_graph=j < len(chunk) - 1,
                                                 allow_unused=True)
                        for key, p, g in zip(wkeys, params, gs, strict=False):
                            r = (torch.zeros_like(p) if g is None else g).reshape(1, -1) / m[i]
                            pos[key], neg[key] = _topk(pos[key], r, k), _topk(neg[key], -r, k)
                        for ls, g in zip(alayers, gs[len(params):], strict=True):
                            act = captured[ls.name][j].detach().reshape(-1)
                            r = (torch.zeros_like(act) if g is None else g[j].reshape(-1)) / m[i]
                            accs[ls.name].update(act, r.double(), fmt, kinds, k)
    finally:
        for p, on in zip(params, grads_on, strict=True):
            p.requires_grad_(on)
    tensors = {}
    for (t, ly), p in zip(wkeys, params, strict=True):
        bound = space.bound_format(ly, t, p.detach())
        vals = bound.decode(bound.encode(p.detach().float())).reshape(-1)

        def kth(b: Tensor | None, n: int = vals.numel()) -> Tensor:
            return torch.zeros(n) if b is None or b.shape[0] < k else b[k - 1].clamp(min=0)

        tensors[(t, ly)] = _Tensor(vals, kth(pos[(t, ly)]).float(), kth(neg[(t, ly)]).float(),
                                   float(vals.abs().max()) if vals.numel() else 0.0)
    return tensors, {ly: acc.rho(k, range_factor) for ly, acc in accs.items()}
