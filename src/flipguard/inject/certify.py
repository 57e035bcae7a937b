"""Certified outcomes: weight and bias faults that provably change no image's decision.

A weight fault of output channel ``c`` of a Conv/ConvTranspose/Linear layer changes that
layer's output on channel ``c`` only, by ``dw * x`` with ``x`` an input value in the
kernel's window, so by at most ``|dw| * E`` where ``E`` is the window maximum of ``|x|``
over input channels (1 for a bias). :mod:`flipguard.inject.bounds` turns that into a bound
on the change of every model output for every ``|dw| <= t`` (golden-centred interval
propagation), and the task gives each image's largest output change that cannot change its
decision (``radius``): a detector's score interval over reconstructions within the radius
stays on its side of the threshold (``DetectionTask(score_interval=...)``), a classifier's
top-1 logit margin exceeds twice the radius, a tolerance task's allowance exceeds it.

For every layer, output channel ``c`` and image ``j`` the certifier keeps ``T[c, j]``: the
largest ``|dw|`` for which image ``j``'s decision cannot change. The engine simulates a fault
only on the images it does not certify (``Outcome.n_certified`` counts the others), and not
at all when it certifies every image. Soundness margins: rounding of the
golden and faulty runs (``rounding="ulp"``: 16 units of roundoff per computed value,
checked by simulation in the tests; ``"worst-case"``: the dot-product bound, a proof),
each image's radius divided by ``safety`` (default 2), and scores within ``2**-12``
(relative) of the threshold never certified. Layers the bounds cannot follow, or whose
bound cannot certify even the smallest change a fault makes, certify nothing.

>>> import torch
>>> from flipguard.inject import ClassificationTask, Engine
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
>>> x = torch.randn(16, 4); y = net(x).argmax(1)
>>> cert = Certifier(Engine(net, x, ClassificationTask(y)))
>>> cert.table("2").shape
(3, 16)
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from flipguard.errors import ConfigError
from flipguard.faults import Fault, apply_bits, bits_mask, kernel_of
from flipguard.fileio import replacing
from flipguard.inject.bounds import (
    _LINEAR,
    ROUNDING,
    Unsupported,
    golden_values,
    layer_rounding,
    propagate,
    ulp_rounding,
)
from flipguard.inject.injector import bound_format
from flipguard.inject.outcomes import correct_images, parse_criterion
from flipguard.inject.tasks import (
    ClassificationTask,
    DetectionTask,
    Task,
    ToleranceTask,
    logit_gap,
)

__all__ = ["Certifier", "LayerCertificate", "SLACK"]

SLACK = 2.0**-12
"""Scores within this relative distance of the threshold are never certified."""
FINITE_CAP = 1e15
"""An image whose every output stays below this magnitude keeps finite outputs and a finite
score: the models compute in float32 (float16/bfloat16/INT8 weights are dequantised), and
the scores square and sum such values over at most ~10^8 pixels, far below float32's 3.4e38
(the score intervals themselves are computed in float64, so they alone prove nothing about
float32 overflow)."""

_CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass
class LayerCertificate:
    """``T[c, j]``: faults of output channel ``c`` with ``|dw| < T[c, j]`` keep image
    ``j``'s decision; ``F[c, j]``: with ``|dw| < F[c, j]`` image ``j``'s outputs provably
    stay finite (its change is bounded, even where the bound cannot keep the decision)."""

    T: np.ndarray
    seconds: float = 0.0
    reason: str | None = None  # why nothing is certified (None: computed)
    images: int = 0
    F: np.ndarray | None = None
    share: float | None = None  # skipped as not worth it: the first chunk's certified share

    def __post_init__(self) -> None:
        if self.F is None:
            self.F = self.T


@dataclass
class Certifier:
    """Certificates for the weight/bias faults of ``engine``'s layers (computed per layer on
    first use). ``levels``: the caps ``t`` tried, as fractions of the layer's largest
    |weight|; ``chunk``: images per bound pass; a layer where fewer than ``min_share`` of the
    (channel, image) pairs of the first chunk certify any change is skipped; ``rounding``:
    the rounding model of :func:`flipguard.inject.bounds.propagate`; ``faults``: faults per
    layer to be evaluated — a layer is then certified only where that pays: certifying costs
    about ``(channels + 1) x len(levels)`` simulations of one of its faults, so a layer
    whose faults times the first chunk's certified share is below that is skipped."""

    engine: Any
    safety: float = 2.0
    levels: tuple[float, ...] = (2.0**-6, 2.0**-16)
    chunk: int = 16
    rows: int = 64
    min_share: float = 0.01
    rounding: str = "ulp"
    faults: dict[str, int] | None = None
    cut_levels: tuple[float, ...] = (2.0**-4, 2.0**-10, 2.0**-16)
    _radius: np.ndarray | None = field(default=None, repr=False)
    _finite: np.ndarray | None = field(default=None, repr=False)
    _tables: dict[str, LayerCertificate] = field(default_factory=dict, repr=False)
    _cuts: dict[int, np.ndarray] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.safety >= 1:
            raise ConfigError(f"safety: expected a factor >= 1, got {self.safety!r}")
        if self.rounding not in ROUNDING:
            raise ConfigError(f"rounding: expected one of {', '.join(ROUNDING)}, got "
                              f"{self.rounding!r}")
        self.engine.prepare()
        self.reason = None if self.engine.program is not None else \
            "the model runs as full forwards (no traced graph)"
        if self.reason is None:
            self.reason = _task_reason(self.engine.task)

    # -- per image ------------------------------------------------------------------------
    def radius(self) -> np.ndarray:
        """Per image: the largest uniform change of every model output that cannot change
        its decision, already divided by ``safety`` (0 = none)."""
        if self._radius is None:
            eng = self.engine
            outs = eng.golden_outputs
            parts = [_task_radius(eng.task, eng.inputs[a:a + 64], outs[a:a + 64],
                                  eng.golden.facts[a:a + 64])
                     for a in range(0, eng.n, 64)]
            self._radius = np.concatenate(parts) / self.safety
        return self._radius

    def finite_radius(self) -> np.ndarray:
        """Per image: the largest uniform change of every model output that provably keeps
        its outputs and score finite (divided by ``safety``)."""
        if self._finite is None:
            eng = self.engine
            outs = eng.golden_outputs
            self._finite = np.concatenate(
                [_finite_radius(eng.task, eng.inputs[a:a + 64], outs[a:a + 64])
                 for a in range(0, eng.n, 64)]) / self.safety
        return self._finite

    # -- per cut --------------------------------------------------------------------------
    def cut_radius(self, stop: int) -> np.ndarray | None:
        """Per image: the largest change (max-norm) of the one value live at cut ``stop`` (the
        graph position of a cached layer) that provably keeps the image's decision, whatever
        fault caused it; None where nothing is certified there. The engine drops a simulated
        row at such a cut once its measured change is below this, without running the rest
        of the network (``Outcome.n_certified`` counts it)."""
        return self.cut_radii().get(stop)

    def cut_radii(self) -> dict[int, np.ndarray]:
        """:meth:`cut_radius` of every cut that certifies some image (computed once: per
        chunk of images one golden pass and, per cut and level of ``cut_levels`` (fractions
        of the image's largest magnitude at the cut), one bound pass of the rest of the
        network; a cut certifying fewer than ``min_share`` of the first chunk is dropped)."""
        if self._cuts is None:
            self._cuts = {} if self.reason is not None else self._compute_cuts()
        return self._cuts

    def _compute_cuts(self) -> dict[int, np.ndarray]:
        eng, prog = self.engine, self.engine.program
        cuts = {}
        for stop in eng.stops:
            live = prog.live(stop)
            if len(live) == 1:
                cuts[stop] = (prog.pos[live[0]], np.zeros(eng.n))
        radius = self.radius()
        for a in range(0, eng.n, self.chunk):
            b = min(a + self.chunk, eng.n)
            with torch.no_grad():
                golden = golden_values(prog, eng.inputs[a:b].to(eng.device))
            for stop, (start, rho) in list(cuts.items()):
                node = prog.nodes[start]
                z = golden.get(node)
                if z is None or not z.is_floating_point():
                    del cuts[stop]
                    continue
                scale = z.detach().abs().reshape(b - a, -1).amax(1).double().clamp_min(1e-30)
                for lvl in self.cut_levels:
                    t = scale * lvl
                    f0 = t.to(z.dtype).view(-1, *([1] * (z.dim() - 1))).expand_as(z)
                    try:
                        F, R = propagate(prog, golden, start, f0.contiguous(),
                                         torch.zeros_like(z), model=self.rounding)
                    except Unsupported:
                        F = None
                    if F is None:
                        del cuts[stop]
                        break
                    assert R is not None
                    Fj = F.reshape(b - a, -1).amax(1).double().cpu().numpy()
                    Rj = R.reshape(b - a, -1).amax(1).double().cpu().numpy()
                    best = _largest(t.cpu().numpy(), radius[a:b], Fj[None], Rj)[0]
                    rho[a:b] = np.maximum(rho[a:b], best)
                if stop in cuts and a == 0 and float((rho[a:b] > 0).mean()) < self.min_share:
                    del cuts[stop]
        return {stop: rho for stop, (_, rho) in cuts.items() if rho.any()}

    # -- per layer ------------------------------------------------------------------------
    def table(self, layer: str) -> np.ndarray:
        """``T`` of ``layer``: (output channels, images); a fault of channel ``c`` with
        ``|dw| < T[c, j]`` keeps image ``j``'s decision (zeros: nothing certified)."""
        return self.certificate(layer).T

    def certificate(self, layer: str) -> LayerCertificate:
        """The :class:`LayerCertificate` of ``layer`` (computed on first use)."""
        if layer not in self._tables:
            t0 = time.perf_counter()
            cert = self._compute(layer)
            cert.seconds = time.perf_counter() - t0
            self._tables[layer] = cert
        return self._tables[layer]

    def image_mask(self, fault: Fault, old: Tensor, new: Tensor) -> np.ndarray | None:
        """Per image: True where ``fault`` (stored value ``old`` -> ``new``) provably keeps
        the decision; None when nothing about the fault can be certified."""
        if self.reason is not None or fault.target not in ("weight", "bias"):
            return None
        if fault.layer not in self.engine.program.calls:
            return None
        d = abs(float(new.double()) - float(old.double()))
        if not math.isfinite(d):
            return None
        T = self.table(fault.layer)
        if not T.size:
            return None
        return T[self._channel(fault)] > d

    def certifies(self, fault: Fault, old: Tensor, new: Tensor) -> bool:
        """True when ``fault`` changes no image's decision."""
        mask = self.image_mask(fault, old, new)
        return mask is not None and bool(mask.all())

    def certified_sites(self, layer: str, target: str, index: np.ndarray, bit: np.ndarray,
                        kind: str = "flip", criterion: Any = None) -> np.ndarray:
        """Vectorised :meth:`certifies` for single-bit faults ``kind`` at flat ``index`` and
        ``bit`` (arrays) of ``layer``'s ``target`` in the engine's stored format: True where
        the fault provably changes no image's decision (a fault leaving the stored value
        unchanged is masked, so it counts too). With a ``criterion`` (text or
        :class:`~flipguard.inject.outcomes.Criterion`): True where it provably is not
        critical under it — every image it cannot certify keeps finite outputs and, all
        assumed to flip, they cannot meet the criterion
        (:meth:`~flipguard.inject.outcomes.Criterion.tolerates`)."""
        index = np.asarray(index, np.int64)
        bit = np.asarray(bit, np.int64)
        out = np.zeros(index.shape, bool)
        if self.reason is not None or target not in ("weight", "bias") or \
                layer not in self.engine.program.calls or not index.size:
            return out
        cert = self.certificate(layer)
        if not cert.T.size:
            return out
        m = self.engine.model.get_submodule(layer)
        w = getattr(m, target).detach().cpu()
        t = w.reshape(-1)
        fmt = bound_format(m, target, w, self.engine.formats.get((layer, target),
                                                                 self.engine.fmt))
        d = np.empty(index.shape)
        for b in np.unique(bit).tolist():
            sel = np.flatnonzero(bit == b)
            idx = torch.as_tensor(index[sel])
            old = t[idx]
            new = apply_bits(old, bits_mask(b, fmt.bits), kind, fmt.select(idx))
            d[sel] = (new.double() - old.double()).abs().numpy()
        ch = np.asarray(kernel_of(m, target, index), np.int64)
        crit = parse_criterion("any-flip" if criterion is None else criterion)
        golden = self.engine.golden
        correct = correct_images(golden)
        if correct is None:
            correct = np.ones(self.engine.n, bool)
        with np.errstate(invalid="ignore"):
            for c in np.unique(ch).tolist():
                sel = np.flatnonzero(ch == c)
                order = np.argsort(cert.T[c], kind="stable")
                sT = cert.T[c][order]
                k = np.searchsorted(sT, np.nan_to_num(d[sel], nan=np.inf), side="right")
                lost = np.concatenate([[0], np.cumsum(correct[order])])[k]
                fmin = np.concatenate([[np.inf], np.minimum.accumulate(cert.F[c][order])])
                finite = fmin[k] > d[sel]  # every uncertified image (the first k) bounded
                out[sel] = (d[sel] == 0) | (np.isfinite(d[sel]) & finite &
                                            crit.tolerates(golden, lost, k))
        return out

    def _channel(self, f: Fault) -> int:
        m = self.engine.model.get_submodule(f.layer)
        return int(kernel_of(m, f.target, int(f.index)))

    def _compute(self, layer: str) -> LayerCertificate:
        eng = self.engine
        prog = eng.program
        if self.reason is not None:
            return _nothing(0, eng.n, self.reason)
        m = eng.model.get_submodule(layer)
        if not isinstance(m, _LINEAR) or layer not in prog.calls:
            return _nothing(0, eng.n, f"{type(m).__name__} is not certified")
        p = prog.calls[layer]
        node = prog.nodes[p]
        n_out = int(m.weight.shape[0] if not isinstance(m, _CONVT)
                    else m.weight.shape[1] * m.groups)
        T = np.zeros((n_out, eng.n), np.float32)
        Tf = np.zeros((n_out, eng.n), np.float32)
        floor = _smallest_change(m)
        radius, finite = self.radius(), self.finite_radius()
        scale = float(m.weight.detach().abs().max())
        if getattr(m, "bias", None) is not None:
            scale = max(scale, float(m.bias.detach().abs().max()))
        try:
            for a in range(0, eng.n, self.chunk):
                b = min(a + self.chunk, eng.n)
                with torch.no_grad():
                    golden = golden_values(prog, eng.inputs[a:b].to(eng.device))
                x_in, z = golden[node.args[0]], golden[node]
                env = _envelope(m, x_in, z).clamp_min(1.0)
                rnd = layer_rounding(m, x_in, torch.zeros_like(x_in)) \
                    if self.rounding == "worst-case" else ulp_rounding(z, torch.zeros_like(z))
                best, fin = np.zeros((n_out, b - a)), np.zeros((n_out, b - a))
                for lvl in self.levels:
                    keep, bounded = self._level(prog, golden, p, m, z, env, rnd, lvl * scale,
                                                radius[a:b], finite[a:b], n_out)
                    best, fin = np.maximum(best, keep), np.maximum(fin, bounded)
                T[:, a:b], Tf[:, a:b] = best, fin
                share = float((best > floor).mean())
                if a == 0 and share < self.min_share:
                    return _nothing(n_out, eng.n, "bound too loose", b)
                n_faults = (self.faults or {}).get(layer, 0)
                if a == 0 and not self._pays(layer, n_out, share):
                    skipped = _nothing(n_out, eng.n, f"not worth it for {n_faults} faults", b)
                    skipped.share = share
                    return skipped
        except Unsupported as exc:
            return _nothing(n_out, eng.n, f"unsupported: {exc}")
        T[~np.isfinite(T)] = 0.0
        Tf[~np.isfinite(Tf)] = 0.0
        return LayerCertificate(T, images=eng.n, F=np.maximum(Tf, T))

    def _level(self, prog: Any, golden: dict, p: int, m: nn.Module, z: Tensor, env: Tensor,
               rnd: Tensor, t: float, radius: np.ndarray, finite: np.ndarray, n_out: int
               ) -> tuple[np.ndarray, np.ndarray]:
        """Per channel and image: the largest |dw| under cap ``t`` that provably keeps the
        decision (within ``radius``), and the largest that keeps outputs and score finite
        (within ``finite``). One pass with the envelope on every channel fixes the slopes
        and bounds rounding for a fault of any channel; one linear pass per channel then
        bounds that channel's change."""
        B = z.shape[0]
        last = isinstance(m, nn.Linear)
        e = env[..., 0] if last else env[:, 0]
        eps = float(torch.finfo(z.dtype).eps)
        union = (t * env).expand_as(z).contiguous()
        slopes: dict = {}
        _, R = propagate(prog, golden, p, union, rnd + 4 * eps * union, record=slopes,
                         model=self.rounding)
        assert R is not None
        Rj = R.reshape(B, -1).amax(1).double().cpu().numpy()
        G = max(1, self.rows // B)
        out, fin = np.zeros((n_out, B)), np.zeros((n_out, B))
        rep: dict[int, tuple[dict, dict]] = {}
        for c0 in range(0, n_out, G):
            cs = list(range(c0, min(c0 + G, n_out)))
            g = len(cs)
            if g not in rep:
                rep[g] = (_repeat(golden, B, g), _repeat(slopes, B, g))
            f0 = torch.zeros((g * B, *z.shape[1:]), dtype=z.dtype, device=z.device)
            for i, c in enumerate(cs):
                rows = slice(i * B, (i + 1) * B)
                f0[(rows, Ellipsis, c) if last else (rows, c)] = t * e
            F, _ = propagate(prog, rep[g][0], p, f0, slopes=rep[g][1], rounding=False)
            Fj = F.reshape(g, B, -1).amax(2).double().cpu().numpy()
            out[c0:c0 + g] = _largest(t, radius, Fj, Rj)
            fin[c0:c0 + g] = _largest(t, finite, Fj, Rj)
        return out, fin

    def _pays(self, layer: str, n_out: int, share: float) -> bool:
        """Whether certifying ``layer`` repays its cost for ``faults`` (always without)."""
        return self.faults is None or \
            self.faults.get(layer, 0) * share >= (n_out + 1) * len(self.levels)

    def stale(self) -> list[str]:
        """Layers skipped as not worth it (e.g. by an earlier, smaller campaign whose
        certificates were loaded) that would repay certifying for the current ``faults``."""
        return [k for k, v in self._tables.items()
                if v.share is not None and self._pays(k, v.T.shape[0], v.share)]

    def refresh(self) -> list[str]:
        """Compute the :meth:`stale` layers' certificates; returns their names.

        A cache made for another campaign on the same engine is thus reused: only layers it
        skipped, and that now pay, are computed.
        """
        names = self.stale()
        for k in names:
            del self._tables[k]
            self.certificate(k)
        return names

    def options(self) -> dict[str, Any]:
        """The options that change the certificates (for cache keys; not ``faults``: a
        layer skipped for too few faults is recomputed by :meth:`refresh` where it pays)."""
        return {"safety": self.safety, "levels": list(self.levels), "rounding": self.rounding,
                "min_share": self.min_share, "slack": SLACK, "version": 5,
                "cut_levels": list(self.cut_levels)}

    def compute_all(self) -> Certifier:
        """Certificates of every Conv/ConvT/Linear layer of the traced graph, and of every
        cut (:meth:`cut_radii`)."""
        self.cut_radii()
        if self.reason is None:
            for name in self.engine.program.calls:
                if isinstance(self.engine.model.get_submodule(name), _LINEAR):
                    self.certificate(name)
        return self

    def save(self, path: str | Path) -> Path:
        """Write the radii and every computed certificate (``.npz``, atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {"__radius__": self.radius(),
                                         "__finite__": self.finite_radius()}
        meta = {}
        for k, v in self._tables.items():
            arrays[f"T:{k}"] = v.T
            arrays[f"F:{k}"] = v.F
            meta[k] = {"seconds": v.seconds, "reason": v.reason, "images": v.images,
                       "share": v.share}
        for stop, rho in (self._cuts or {}).items():
            arrays[f"C:{stop}"] = rho
        meta["__cuts__"] = self._cuts is not None
        arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        with replacing(path, ".npz") as tmp:
            np.savez(tmp, **arrays)
        return path

    def load(self, path: str | Path) -> Certifier:
        """Read certificates written by :meth:`save` for the same engine and options."""
        with np.load(path, allow_pickle=False) as d:
            self._radius = np.asarray(d["__radius__"])
            self._finite = np.asarray(d["__finite__"])
            meta = json.loads(bytes(d["__meta__"]).decode())
            if meta.pop("__cuts__", False):
                self._cuts = {int(k[2:]): np.asarray(d[k]) for k in d.files
                              if k.startswith("C:")}
            for k, v in meta.items():
                self._tables[k] = LayerCertificate(np.asarray(d[f"T:{k}"]), v["seconds"],
                                                   v["reason"], v["images"],
                                                   np.asarray(d[f"F:{k}"]), v.get("share"))
        if self._radius.shape != (self.engine.n,):
            raise ConfigError(f"{path}: certificates for {self._radius.shape[0]} images, the "
                              f"engine evaluates {self.engine.n}")
        return self

    def summary(self) -> dict[str, Any]:
        """Per computed layer: seconds, images used, reason, share of (channel, image) pairs
    with T > 0."""
        return {k: {"seconds": round(v.seconds, 3), "images": v.images, "reason": v.reason,
                    "pairs_certifying": float((v.T > 0).mean()) if v.T.size else 0.0}
                for k, v in self._tables.items()}


def _largest(t: float | np.ndarray, allowed: np.ndarray, Fj: np.ndarray, Rj: np.ndarray
             ) -> np.ndarray:
    """Per (channel, image): the largest ``|dw| <= t`` whose change bound (``Fj`` at ``t``,
    linear in ``|dw|``, plus rounding ``Rj``) stays within ``allowed`` per image (``t``: one
    cap, or one per image)."""
    room = allowed[None, :] - Rj[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        tc = np.where(Fj > 0, t * room / Fj, t)
    ok = (room > 0) & np.isfinite(Fj) & np.isfinite(Rj)[None, :]
    return np.where(ok, np.minimum(tc, t), 0.0)


def _nothing(n_out: int, n_images: int, reason: str, images: int = 0) -> LayerCertificate:
    """A certificate that certifies nothing, and why."""
    return LayerCertificate(np.zeros((n_out, n_images), np.float32), reason=reason,
                            images=images)


def _repeat(d: dict, B: int, g: int) -> dict:
    """Tensors of ``d`` with batch ``B`` repeated ``g`` times along the batch."""
    return {k: v.repeat(g, *([1] * (v.dim() - 1))) if isinstance(v, Tensor) and v.dim()
            and v.shape[0] == B else v for k, v in d.items()}


def _task_reason(task: Task) -> str | None:
    if isinstance(task, DetectionTask) and getattr(task, "score_interval", None) is None:
        return "the detection task has no score_interval (its score cannot be bounded)"
    if not isinstance(task, DetectionTask | ClassificationTask | ToleranceTask):
        return f"task {type(task).__name__} has no decision bound"
    return None


def _task_radius(task: Task, x: Tensor, y: Tensor, facts: np.ndarray) -> np.ndarray:
    """Per image: the largest uniform output change keeping its decision (before safety)."""
    if isinstance(task, ClassificationTask):
        top, gap = logit_gap(y)
        return np.maximum((gap - SLACK * np.abs(top)) / 2, 0.0)
    if isinstance(task, ToleranceTask):
        allow = (task.atol + task.rtol * y.double().abs()).flatten(1)
        return np.maximum(allow.amin(1).cpu().numpy() * (1 - SLACK), 0.0)
    assert isinstance(task, DetectionTask)
    thr = task.threshold
    s0 = np.asarray(facts, np.float64)
    slack = SLACK * np.maximum(abs(thr), np.abs(s0))
    anomalous = s0 > thr

    def ok(s_lo: np.ndarray, s_hi: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return np.where(anomalous, s_lo - slack > thr, s_hi + slack <= thr)

    return np.where(np.isfinite(s0), _score_radius(task, x, y, ok, 2.0), 0.0)


def _finite_radius(task: Task, x: Tensor, y: Tensor) -> np.ndarray:
    """Per image: the largest uniform output change keeping outputs and score finite
    (before safety): :data:`FINITE_CAP` less the output's magnitude, for a detector also
    no more than its score interval stays finite for (bisected)."""
    big = np.maximum(FINITE_CAP - y.double().abs().flatten(1).amax(1).cpu().numpy(), 0.0)
    if not isinstance(task, DetectionTask):
        return big
    return np.minimum(_score_radius(
        task, x, y, lambda lo, hi: np.isfinite(lo) & np.isfinite(hi), 16.0), big)


def _score_radius(task: DetectionTask, x: Tensor, y: Tensor,
                  ok: Callable[[np.ndarray, np.ndarray], np.ndarray], top: float
                  ) -> np.ndarray:
    """Per image: the largest ``e`` in ``[1e-14, 10**top]`` (bisected on ``log10 e``, 24
    steps) for which ``ok(score_low, score_high)`` holds over outputs ``y +- e`` (0 if not
    even at ``1e-14``)."""
    yd = y.double()

    def holds(e: np.ndarray) -> np.ndarray:
        et = torch.as_tensor(e, dtype=torch.float64).reshape(-1, *([1] * (y.dim() - 1)))
        s_lo, s_hi = task.score_interval(x, yd - et, yd + et)
        return ok(s_lo.double().cpu().numpy(), s_hi.double().cpu().numpy())

    lo_e, hi_e = np.full(len(y), -14.0), np.full(len(y), top)
    base = holds(10.0 ** lo_e)
    for _ in range(24):
        mid = (lo_e + hi_e) / 2
        good = holds(10.0 ** mid)
        lo_e, hi_e = np.where(good, mid, lo_e), np.where(good, hi_e, mid)
    return np.where(base, 10.0 ** lo_e, 0.0)


def _envelope(m: nn.Module, x: Tensor, z: Tensor) -> Tensor:
    """Upper bound of ``|x|`` over the inputs a weight of ``m`` multiplies into each output
    element, one map per image (channel dim 1 of size 1; last dim for Linear)."""
    a = x.abs().amax(1, keepdim=True) if not isinstance(m, nn.Linear) else \
        x.abs().amax(-1, keepdim=True)
    if isinstance(m, nn.Linear):
        return a.expand(*z.shape[:-1], 1)
    nd = a.dim() - 2
    if isinstance(m, _CONVT):
        k = tuple(m.kernel_size)
        fn = {1: nnf.conv_transpose1d, 2: nnf.conv_transpose2d, 3: nnf.conv_transpose3d}[nd]
        best = None
        for off in np.ndindex(*k):
            w = torch.zeros((1, 1, *k), dtype=a.dtype, device=a.device)
            w[(0, 0, *off)] = 1.0
            v = fn(a, w, None, m.stride, m.padding, m.output_padding, 1, m.dilation)
            best = v if best is None else torch.maximum(best, v)
        assert best is not None
        return best
    if isinstance(m.padding, str) or getattr(m, "padding_mode", "zeros") != "zeros":
        raise Unsupported(f"{type(m).__name__} padding={m.padding!r}, "
                          f"padding_mode={m.padding_mode!r}")
    pad = [q for p in reversed(tuple(m.padding)) for q in (p, p)]
    ap = nnf.pad(a, pad)
    pool = {1: nnf.max_pool1d, 2: nnf.max_pool2d, 3: nnf.max_pool3d}[nd]
    return pool(ap, m.kernel_size, m.stride, 0, m.dilation)


def _smallest_change(m: nn.Module) -> float:
    """A lower bound of the smallest |dw| a fault of ``m`` can make (a bit-0 flip of its
    smallest non-zero weight in float32, or 0 for an all-zero layer)."""
    w = m.weight.detach().abs()
    nz = w[w > 0]
    if not nz.numel():
        return 0.0
    return float(nz.min()) * 2.0**-24
