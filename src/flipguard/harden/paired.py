"""Proof by paired re-injection: the same sampled faults, re-run with the protections active.

Every protection maps (golden stored word, fault) to the word the protected hardware delivers
(``ReadPath.deliver``). Delivered == golden => the fault is masked without simulation.
Otherwise delivered differs from golden by some bit pattern, which is exactly a multi-bit
*flip* of the golden word: the *effective fault* ``Fault(kind="flip", bits=golden XOR
delivered)`` runs through the unmodified engine. Faults whose delivered word equals the
unprotected faulty word (no protection covers them, activation faults) keep their recorded
outcome, unless activation clamping changed the model, in which case every fault is re-run on
the hardened model and classified against the hardened model's own golden run.

CFRs before/after are stratified estimates over the campaign strata (same ``N_h`` weights);
the relative improvement ``(before - after) / before`` gets the weighted paired comparison
of :mod:`~flipguard.harden.pairstats` (MOVER-R interval over per-stratum exact bounds, a test
of ``D = 0`` consistent with it, and the exact stratified sign-flip test); the unweighted
McNemar p-value is kept for reference only.

>>> res = paired_reinjection(store, run.model, plan.protections, "accuracy-drop:0.01",
...                          lambda m: Engine(m, x, task))                 # doctest: +SKIP
>>> res.relative_improvement, res.ci                                        # doctest: +SKIP
(0.93, (0.81, 0.98))
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.stats import binomtest
from torch import nn

from flipguard.campaign.stats import stratified
from flipguard.errors import FlipguardError
from flipguard.faults import Fault, NumberFormat, get_format
from flipguard.harden.mechanisms import (
    NO_ERROR,
    STATUS_NAMES,
    Protection,
    ReadPath,
    stored_word,
)
from flipguard.harden.pairstats import compare_paired, pair_cells
from flipguard.harden.planner import tensor_words
from flipguard.inject import CRITICAL, Golden, Outcome, parse_criterion

__all__ = ["Delivered", "HardeningError", "PairedResult", "check_fault_free", "deliver_faults",
           "paired_bootstrap", "paired_reinjection", "stratified_cfr"]


class HardeningError(FlipguardError):
    """A hardening run cannot proceed (missing campaign, protection changing golden, ...)."""


@dataclass(frozen=True)
class Delivered:
    """What the protected hardware makes of one fault: ``status`` ("unprotected",
    "no-error", "corrected", "detected", "undetected"), the ``effective`` fault to simulate
    (None: masked without simulation) and ``same`` (delivered == unprotected faulty word)."""

    status: str
    effective: Fault | None
    same: bool


def _paths(model: nn.Module, protections: Sequence[Protection], fmt: NumberFormat
           ) -> dict[tuple[str, str], tuple[ReadPath, torch.Tensor, NumberFormat]]:
    groups: dict[tuple[str, str], list[Protection]] = {}
    for p in protections:
        groups.setdefault((p.layer, p.target), []).append(p)
    out = {}
    for (layer, target), prots in groups.items():
        words, ids, bound = tensor_words(model, layer, target, fmt)
        out[(layer, target)] = (ReadPath.build(prots, words.numel(), ids, fmt), words, bound)
    return out


def check_fault_free(model: nn.Module, protections: Sequence[Protection],
                     fmt: NumberFormat | str = "fp32") -> int:
    """Assert every protected word reads back bit-identical without a fault (so the weight
    protections change no fault-free output or metric); returns the words checked."""
    fmt = get_format(fmt)
    n = 0
    for (layer, target), (path, words, bound) in _paths(model, protections, fmt).items():
        got, status = path.deliver(words, torch.zeros_like(words), "flip",
                                   bound.select(torch.arange(words.numel())))
        bad = torch.nonzero((got != words) | (status != NO_ERROR)).reshape(-1)
        if bad.numel():
            raise HardeningError(f"protections: {layer}.{target}[{int(bad[0])}] reads back "
                                 f"changed without a fault (invariant/range not from the "
                                 f"fault-free weights?)")
        n += words.numel()
    return n


def deliver_faults(model: nn.Module, faults: Sequence[Fault], protections: Sequence[Protection],
                   fmt: NumberFormat | str = "fp32") -> list[Delivered]:
    """Map each fault through the protections of its word (vectorised per layer and kind)."""
    fmt = get_format(fmt)
    paths = _paths(model, protections, fmt)
    out: list[Delivered | None] = [None] * len(faults)
    todo: dict[tuple[str, str, str], list[int]] = {}
    for i, f in enumerate(faults):
        if f.target == "activation" or (f.layer, f.target) not in paths:
            out[i] = Delivered("unprotected", f, True)
        else:
            todo.setdefault((f.layer, f.target, f.kind), []).append(i)
    for (layer, target, kind), idx in todo.items():
        path, words, bound = paths[(layer, target)]
        el = torch.tensor([faults[i].index for i in idx], dtype=torch.int64)
        if int(el.max()) >= words.numel():
            raise HardeningError(f"faults: index {int(el.max())} out of range for "
                                 f"{layer}.{target}")
        masks = torch.tensor([faults[i].mask for i in idx], dtype=torch.int64)
        g = words[el]
        got, status = path.select(el).deliver(g, masks, kind, bound.select(el))
        stored = stored_word(g, masks, kind) & ((1 << bound.bits) - 1)
        for j, i in enumerate(idx):
            f, d, gw = faults[i], int(got[j]), int(g[j])
            eff = None if d == gw else Fault(f.target, f.layer, f.index,
                                             tuple(b for b in range(bound.bits)
                                                   if (d ^ gw) >> b & 1), "flip")
            out[i] = Delivered(STATUS_NAMES[int(status[j])], eff, d == int(stored[j]))
    return [d for d in out if d is not None]


def stratified_cfr(critical: np.ndarray, strata: Sequence[str], N: dict[str, int],
                   confidence: float = 0.99) -> dict[str, Any]:
    """``{"cfr", "ci", "n", "critical"}``: stratified CFR of per-fault flags."""
    crit = np.asarray(critical, dtype=bool)
    keys = np.asarray(strata)
    cells = [(int(N[k]), int((keys == k).sum()), int(crit[keys == k].sum()))
             for k in dict.fromkeys(strata)]
    e = stratified(cells, confidence)
    return {"cfr": e.p, "ci": [e.ci[0], e.ci[1]], "n": e.n, "critical": e.k}


def paired_bootstrap(before: np.ndarray, after: np.ndarray, strata: Sequence[str],
                     N: dict[str, int], n_boot: int = 2000, seed: int = 0,
                     confidence: float = 0.95) -> tuple[float, tuple[float, float]]:
    """Relative improvement ``(cfr_b - cfr_a) / cfr_b`` and its percentile interval from a
    seeded stratified bootstrap of the (before, after) pairs; NaN when nothing was critical.

    Kept for comparison only: it cannot put critical faults in strata where none was
    sampled (a stratum with no critical fault after hardening never gets one), so it
    undercovers; :func:`flipguard.harden.pairstats.compare_paired` replaces it.

    >>> b = np.array([1, 1, 1, 0]); a = np.array([0, 0, 1, 0])
    >>> paired_bootstrap(b, a, ["s"] * 4, {"s": 100})[0]
    0.6666666666666666
    """
    b, a = np.asarray(before, dtype=bool), np.asarray(after, dtype=bool)
    keys = np.asarray(strata)
    rng = np.random.Generator(np.random.PCG64(seed))
    total = sum(N[k] for k in dict.fromkeys(strata))
    num = np.zeros(n_boot)
    den = np.zeros(n_boot)
    pb = pa = 0.0
    for k in dict.fromkeys(strata):
        sel = keys == k
        n = int(sel.sum())
        cat = 2 * b[sel].astype(int) + a[sel].astype(int)  # 0: 00, 1: 01, 2: 10, 3: 11
        probs = np.bincount(cat, minlength=4) / n
        w = N[k] / total
        pb += w * probs[2:].sum()
        pa += w * (probs[1] + probs[3])
        draws = rng.multinomial(n, probs, size=n_boot) / n
        den += w * (draws[:, 2] + draws[:, 3])
        num += w * (draws[:, 2] - draws[:, 1])
    if pb <= 0:
        return float("nan"), (float("nan"), float("nan"))
    ok = den > 0
    ratios = num[ok] / den[ok]
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(ratios, [alpha, 1.0 - alpha]) if ratios.size else (math.nan,) * 2
    return float((pb - pa) / pb), (float(lo), float(hi))


@dataclass
class PairedResult:
    """Before/after CFRs of the same faults, the paired comparison and bookkeeping.
    ``ci``: interval of the relative improvement (MOVER-R); ``comparison``: the whole
    :class:`~flipguard.harden.pairstats.PairedComparison`; ``mcnemar_p``: unweighted
    McNemar (reference only)."""

    fault_ids: list[int]
    before: np.ndarray
    after: np.ndarray
    cfr_before: dict[str, Any]
    cfr_after: dict[str, Any]
    relative_improvement: float
    ci: tuple[float, float]
    mcnemar_p: float
    statuses: dict[str, int]
    simulated: int
    fault_free: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    comparison: dict[str, Any] = field(default_factory=dict)
    strata: list[str] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (no per-fault arrays)."""
        c = self.comparison
        return {"cfr_before": self.cfr_before, "cfr_after": self.cfr_after,
                "relative_improvement": self.relative_improvement, "ci": list(self.ci),
                "ci_level": c.get("confidence"), "p_value": c.get("p_value"),
                "p_sign_flip": c.get("p_sign_flip"),
                "p_sign_flip_method": c.get("p_sign_flip_method"),
                "difference": c.get("difference"), "difference_ci": c.get("difference_ci"),
                "unsampled_share": c.get("unsampled_share"),
                "zero_critical_share": c.get("zero_critical_share"),
                "test": c.get("test"), "interval": c.get("interval"),
                "mcnemar_p": self.mcnemar_p, "n_faults": len(self.fault_ids),
                "fixed": int((self.before & ~self.after).sum()),
                "broken": int((~self.before & self.after).sum()),
                "statuses": self.statuses, "simulated": self.simulated,
                "fault_free": self.fault_free, **self.extra}


def _mcnemar(before: np.ndarray, after: np.ndarray) -> float:
    fixed = int((before & ~after).sum())
    broken = int((~before & after).sum())
    if fixed + broken == 0:
        return 1.0
    return float(binomtest(fixed, fixed + broken, 0.5).pvalue)


def _norm(d: Any) -> Any:
    return json.loads(json.dumps(d, sort_keys=True))


def _golden_metrics(golden: Any) -> dict[str, Any]:
    return {k: getattr(golden, k, None) for k in ("accuracy", "f1", "auroc", "nonfinite")}


def paired_reinjection(store: Any, model: nn.Module, protections: Sequence[Protection],
                       criterion: str, engine_for: Callable[[nn.Module], Any],
                       hardened: nn.Module | None = None, n_boot: int = 20_000, seed: int = 0,
                       confidence: float = 0.95) -> PairedResult:
    """Re-run the executed faults of campaign ``store`` with ``protections`` on ``model``
    (``hardened``: the same model with activation clamps, or None). ``engine_for(m)`` builds
    the engine of the campaign (same inputs/task/format) for model ``m``. ``n_boot``: Monte
    Carlo draws of the sign-flip test when its null cannot be enumerated; ``confidence``: of
    the improvement interval."""
    crit = parse_criterion(criterion)
    fmt = get_format(store.definition.get("plan", {}).get("fmt", "fp32"))
    results = store.results()
    if not results:
        raise HardeningError(f"{store.path}: no executed faults (run the campaign first)")
    gold_meta = store.get_meta("golden")
    if gold_meta is None:
        raise HardeningError(f"{store.path}: no golden reference recorded")
    golden_b = Golden.from_dict(gold_meta)
    N = {s.key: int(s.N) for s in store.strata()}
    ids = [pf.fault_id for pf, _ in results]
    strata = [pf.stratum for pf, _ in results]
    faults = [pf.fault for pf, _ in results]
    before = np.array([crit.classify(Outcome.from_dict(d), golden_b) in CRITICAL
                       for _, d in results], dtype=bool)
    checked = check_fault_free(model, protections, fmt)
    deliv = deliver_faults(model, faults, protections, fmt)
    after = before.copy()
    rerun = [i for i, d in enumerate(deliv) if d.effective is not None
             and (hardened is not None or not d.same)]
    fault_free = {"changed": False, "before": _golden_metrics(golden_b),
                  "checked_words": checked}
    for i, d in enumerate(deliv):
        if d.effective is None:
            after[i] = False  # corrected / no error: golden word delivered => masked
    if rerun:
        eng = engine_for(hardened if hardened is not None else model)
        golden_a = eng.golden
        if hardened is None and _norm(golden_a.to_dict()) != _norm(gold_meta):
            raise HardeningError(f"{store.path}: the engine's golden run differs from the "
                                 f"recorded one (model, data or environment changed)")
        outs = eng.run([deliv[i].effective for i in rerun])
        for i, o in zip(rerun, outs, strict=True):
            after[i] = crit.classify(o, golden_a) in CRITICAL
        if hardened is not None:
            fault_free["after"] = _golden_metrics(golden_a)
            fault_free["changed"] = fault_free["after"] != fault_free["before"]
    elif hardened is not None:
        golden_a = engine_for(hardened).golden
        fault_free["after"] = _golden_metrics(golden_a)
        fault_free["changed"] = fault_free["after"] != fault_free["before"]
    if hardened is None:
        fault_free["after"] = fault_free["before"]
    statuses: dict[str, int] = {}
    for d in deliv:
        statuses[d.status] = statuses.get(d.status, 0) + 1
    conf = float(store.definition.get("plan", {}).get("confidence", 0.99))
    cmp = compare_paired(pair_cells(before, after, strata, N), confidence, n_boot, seed)
    return PairedResult(ids, before, after, stratified_cfr(before, strata, N, conf),
                        stratified_cfr(after, strata, N, conf), cmp.relative_improvement,
                        cmp.ci, _mcnemar(before, after), statuses, len(rerun), fault_free,
                        comparison=cmp.to_dict(), strata=strata, faults=faults)
