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
the relative improvement ``(before - after) / before`` gets a seeded paired bootstrap
interval (resampling the faults of each stratum with their before/after pair) and an exact
McNemar p-value on the discordant pairs.

>>> res = paired_reinjection(store, run.model, plan.protections, "accuracy-drop:0.01",
...                          lambda m: Engine(m, x, task))                 # doctest: +SKIP
>>> res.relative_improvement, res.ci                                        # doctest: +SKIP
(0.93, (0.88, 0.97))
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from flipguard import __version__
from flipguard.errors import FlipguardError
from flipguard.faults import Fault, NumberFormat, get_format
from flipguard.harden.mechanisms import (
    NO_ERROR,
    STATUS_NAMES,
    Protection,
    ReadPath,
    parse_schemes,
    stored_word,
)
from flipguard.harden.module import (
    default_clamp_layers,
    harden_model,
    measure_input_bounds,
    save_hardened_run,
)
from flipguard.harden.planner import improvement_curve, plan_hardening, tensor_words, weight_bits

__all__ = ["RESULT_FILE", "SCHEMA", "Delivered", "HardeningError", "PairedResult",
           "check_fault_free", "deliver_faults", "harden_run", "paired_bootstrap",
           "paired_reinjection", "stratified_cfr"]

CRITICAL = ("sdc-critical", "non-finite")


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
    from flipguard.campaign.stats import stratified

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
    """Before/after CFRs of the same faults, the paired improvement and bookkeeping."""

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

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (no per-fault arrays)."""
        return {"cfr_before": self.cfr_before, "cfr_after": self.cfr_after,
                "relative_improvement": self.relative_improvement, "ci": list(self.ci),
                "mcnemar_p": self.mcnemar_p, "n_faults": len(self.fault_ids),
                "fixed": int((self.before & ~self.after).sum()),
                "broken": int((~self.before & self.after).sum()),
                "statuses": self.statuses, "simulated": self.simulated,
                "fault_free": self.fault_free, **self.extra}


def _mcnemar(before: np.ndarray, after: np.ndarray) -> float:
    from scipy.stats import binomtest

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
                       hardened: nn.Module | None = None, n_boot: int = 2000, seed: int = 0,
                       confidence: float = 0.95) -> PairedResult:
    """Re-run the executed faults of campaign ``store`` with ``protections`` on ``model``
    (``hardened``: the same model with activation clamps, or None). ``engine_for(m)`` builds
    the engine of the campaign (same inputs/task/format) for model ``m``."""
    from flipguard.inject import Golden, Outcome, parse_criterion

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
    imp, ci = paired_bootstrap(before, after, strata, N, n_boot, seed, confidence)
    return PairedResult(ids, before, after, stratified_cfr(before, strata, N, conf),
                        stratified_cfr(after, strata, N, conf), imp, ci,
                        _mcnemar(before, after), statuses, len(rerun), fault_free)


SCHEMA = "flipguard.hardening/1"
RESULT_FILE = "hardening.json"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) or isinstance(obj, np.floating):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer | np.bool_):
        return obj.item()
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


def campaign_engines(r: Any, store: Any) -> Callable[[nn.Module], Any]:
    """``engine_for(model)`` of :func:`paired_reinjection` for loaded run ``r`` and its
    campaign ``store``: the campaign's inputs, task and number format (the run's own engine
    for the run's model, a new one over the same inputs for a hardened copy)."""
    from flipguard.campaign import RunEngineFactory
    from flipguard.inject import Engine

    d = store.definition
    fmt = get_format(d.get("plan", {}).get("fmt", "fp32"))
    eng_d = d.get("engine") or {}
    factory = RunEngineFactory(str(r.path), images=eng_d.get("images"), fmt=fmt.name,
                               data_dir=eng_d.get("data_dir"))

    def engine_for(m: nn.Module) -> Any:
        base = factory()
        return base if m is r.model else Engine(m, base.inputs, base.task, fmt=fmt.name)

    return engine_for


def harden_run(run: Any, budget: float = 0.03, schemes: str | Sequence[str] = "tmr,parity,ecc,"
               "range,invariant", criterion: str = "accuracy-drop:0.01", policy: str = "zero",
               method: str = "greedy", curve: bool = True, n_boot: int = 2000, seed: int = 0,
               clamp_images: int = 64, save: bool = True,
               engine_for: Callable[[nn.Module], Any] | None = None) -> dict[str, Any]:
    """Plan protections for run directory ``run`` from its campaign, prove them by paired
    re-injection and (``save``) write ``RUN/hardening.json`` (and ``RUN/hardened/`` when
    ``schemes`` has "act", activation clamping). Returns the JSON dict (docs/hardening.md).
    ``engine_for``: engine builder to reuse across calls (default :func:`campaign_engines`).

    >>> res = harden_run("runs/demo", budget=0.03)  # doctest: +SKIP
    >>> res["overhead"] <= 0.03                      # doctest: +SKIP
    True
    """
    from flipguard.campaign import CampaignStore, cfr_table, store_path
    from flipguard.inject import parse_criterion
    from flipguard.run import atomic_write_text, load_run

    names = [p.strip() for p in (schemes.split(",") if isinstance(schemes, str) else schemes)]
    act = "act" in names
    wnames = [n for n in names if n and n != "act"]
    wschemes = parse_schemes(wnames) if wnames or not act else ()
    parse_criterion(criterion)
    r = load_run(run)
    with CampaignStore(store_path(r.path)) as store:
        d = store.definition
        if d.get("model_fingerprint") not in (None, r.model_fingerprint()):
            raise HardeningError(f"{store.path}: made for another model (fingerprint differs)")
        fmt = get_format(d.get("plan", {}).get("fmt", "fp32"))
        kernel = any(s.kernel is not None for s in store.strata())
        rows = cfr_table(store, by=("layer", "target", "bit") + (("kernel",) if kernel else ()),
                         criterion=criterion)
        total = weight_bits(r.model, fmt)
        hardened, clamps, act_bits = None, None, 0
        if act:
            ds = r.load_data((d.get("engine") or {}).get("data_dir"))
            idx = np.unique(np.linspace(0, len(ds.train) - 1, min(clamp_images, len(ds.train)))
                            .round().astype(np.int64))
            train = ds.train[torch.as_tensor(idx)]
            bounds = measure_input_bounds(r.model, train, default_clamp_layers(r.model, train))
            hardened = harden_model(r.model, bounds)
            act_bits = 2 * 32 * len(bounds)
            clamps = {"layers": {k: list(v) for k, v in bounds.items()}, "cost_bits": act_bits,
                      "path": "hardened" if save else None}
        if act_bits > float(budget) * total:
            raise HardeningError(f"budget: activation clamping alone needs {act_bits} bits, "
                                 f"more than {budget} of {total} weight bits")
        left = max(0.0, float(budget) - act_bits / total) if act else budget
        plan = plan_hardening(r.model, rows, fmt, left, wschemes or "invariant", policy,
                              method, None if wschemes else [])
        res = paired_reinjection(store, r.model, plan.protections, criterion,
                                 engine_for or campaign_engines(r, store), hardened, n_boot,
                                 seed)
        ids = ",".join(map(str, res.fault_ids))
    cost = plan.cost_bits + act_bits
    out = {"schema": SCHEMA, "run": str(r.path), "criterion": parse_criterion(criterion).text,
           "format": fmt.name, "schemes": list(wschemes) + (["act"] if act else []),
           "policy": policy, "method": method, "budget": float(budget),
           "budget_bits": int(float(budget) * total), "weight_bits": total, "cost_bits": cost,
           "overhead": cost / total, "reload_bits": plan.reload_bits,
           "protections": [{**p.to_dict(), "label": p.label} for p in plan.protections],
           "table": plan.table, "activation_clamps": clamps, **res.to_dict(), "ci_level": 0.95,
           "expected": {"cfr_before": plan.expected_cfr_before,
                        "cfr_after": plan.expected_cfr_after,
                        "relative_improvement": plan.expected_removed / plan.expected_critical
                        if plan.expected_critical > 0 else None},
           "campaign": {"store": store_path(r.path).name, "n_faults": len(res.fault_ids),
                        "fault_ids_sha256": hashlib.sha256(ids.encode()).hexdigest()},
           "curve": improvement_curve(r.model, rows, None, fmt, wschemes, policy, method)
           if curve and wschemes else None,
           "flipguard_version": __version__, "created": time.time()}
    out = _jsonable(out)
    if save:
        if hardened is not None:
            save_hardened_run(r, hardened, r.path / "hardened")
        atomic_write_text(r.path / RESULT_FILE, json.dumps(out, indent=2) + "\n")
    return out
