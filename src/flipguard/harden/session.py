"""``flipguard harden RUN``: plan, prove by paired re-injection, write ``RUN/hardening.json``.

Besides the paired comparison (:mod:`~flipguard.harden.pairstats`), the result says which
fault locations each chosen scheme covers and what it costs on the read path
(:mod:`~flipguard.harden.coverage`) and, with ``hardware`` (e.g. ``"systolic"``), the
improvement over the whole exposure of that hardware (:mod:`~flipguard.harden.exposure`).

>>> res = harden_run("runs/demo", budget=0.03, hardware="systolic")  # doctest: +SKIP
>>> res["exposure"]["relative_improvement"] <= res["relative_improvement"]  # doctest: +SKIP
True
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from flipguard import __version__
from flipguard.faults import get_format
from flipguard.harden.coverage import COVERAGE
from flipguard.harden.mechanisms import Protection, parse_schemes
from flipguard.harden.module import (
    default_clamp_layers,
    harden_model,
    measure_input_bounds,
    save_hardened_run,
)
from flipguard.harden.paired import (
    HardeningError,
    PairedResult,
    campaign_engines,
    paired_reinjection,
)
from flipguard.harden.planner import improvement_curve, plan_hardening, tensor_words, weight_bits

__all__ = ["RESULT_FILE", "SCHEMA", "coverage_summary", "evaluate_protections", "harden_run"]

SCHEMA = "flipguard.hardening/2"
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


def coverage_summary(model: nn.Module, protections: Sequence[Protection], fmt: str = "fp32",
                     clamps: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Per scheme in use: the locations covered / not covered, effect, read-path logic and
    cost per load (``COVERAGE``), next to its memory bits and the words it protects (each
    load of one of them pays the read-path cost).

    >>> net = nn.Sequential(nn.Linear(4, 3))
    >>> [(c["scheme"], c["memory_bits"], c["protected_words"], c["locations"])
    ...  for c in coverage_summary(net, [Protection("ecc", "0")])]
    [('ecc', 84, 12, ['storage'])]
    """
    fmt_ = get_format(fmt)
    out: dict[str, dict[str, Any]] = {}
    for p in protections:
        _, ids, bound = tensor_words(model, p.layer, p.target, fmt_)
        n = int(ids.numel() if p.kernel is None else (ids == p.kernel).sum())
        d = out.setdefault(p.scheme, {**COVERAGE[p.scheme].to_dict(), "memory_bits": 0,
                                      "protected_words": 0, "protections": 0})
        d["memory_bits"] += p.cost_bits(n, bound.bits)
        d["protected_words"] += n
        d["protections"] += 1
    if clamps:
        out["act"] = {**COVERAGE["act"].to_dict(), "memory_bits": int(clamps["cost_bits"]),
                      "protected_words": None, "protections": len(clamps["layers"])}
    return list(out.values())


def evaluate_protections(run: Any, protections: Sequence[Protection], criterion: str,
                         engine_for: Callable[[nn.Module], Any] | None = None,
                         hardware: str | None = None, n_boot: int = 20_000, seed: int = 0
                         ) -> dict[str, Any]:
    """Fixed ``protections`` re-injected on the campaign of run directory ``run`` (e.g. a
    fresh hold-out campaign of the same model): the paired result dict, with ``exposure``
    when ``hardware`` is given. Weight protections only (no activation clamps)."""
    from flipguard.campaign import CampaignStore, store_path
    from flipguard.run import load_run

    r = load_run(run)
    with CampaignStore(store_path(r.path)) as store:
        fmt = get_format(store.definition.get("plan", {}).get("fmt", "fp32"))
        res = paired_reinjection(store, r.model, protections, criterion,
                                 engine_for or campaign_engines(r, store), None, n_boot, seed)
        N = {s.key: int(s.N) for s in store.strata()}
        data_dir = (store.definition.get("engine") or {}).get("data_dir")
    out = res.to_dict()
    out["exposure"] = (_exposure(r, res, N, fmt.name, hardware,
                                 [(p.scheme, p.target) for p in protections], data_dir)
                       if hardware else None)
    return _jsonable(out)


def _exposure(r: Any, res: PairedResult, N: dict[str, int], fmt: str, hardware: str,
              schemes: Sequence[Any], data_dir: str | None) -> dict[str, Any]:
    from flipguard.harden.exposure import exposure_cfr, split_exposure

    x = r.load_data(data_dir).test[:1]
    full, parts = split_exposure(r.model, x, hardware, fmt)
    return exposure_cfr(full, parts, res.faults, res.strata, N, res.before, res.after,
                        list(dict.fromkeys(schemes)))


def harden_run(run: Any, budget: float = 0.03, schemes: str | Sequence[str] = "tmr,parity,ecc,"
               "range,invariant", criterion: str = "accuracy-drop:0.01", policy: str = "zero",
               method: str = "greedy", curve: bool = True, n_boot: int = 20_000, seed: int = 0,
               clamp_images: int = 64, save: bool = True,
               engine_for: Callable[[nn.Module], Any] | None = None,
               hardware: str | None = None) -> dict[str, Any]:
    """Plan protections for run directory ``run`` from its campaign, prove them by paired
    re-injection and (``save``) write ``RUN/hardening.json`` (and ``RUN/hardened/`` when
    ``schemes`` has "act", activation clamping). Returns the JSON dict (docs/hardening.md).
    ``engine_for``: engine builder to reuse across calls (default :func:`campaign_engines`);
    ``n_boot``: Monte Carlo draws of the sign-flip test; ``hardware``: exposure model
    (``systolic``, ``systolic:FILE.toml``, ``memory``) for the whole-exposure improvement.

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
    if hardware is not None:
        from flipguard.ra import parse_hardware

        parse_hardware(hardware)  # a bad spec fails before any simulation
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
        data_dir = (d.get("engine") or {}).get("data_dir")
        if act:
            ds = r.load_data(data_dir)
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
        N = {s.key: int(s.N) for s in store.strata()}
        ids = ",".join(map(str, res.fault_ids))
    cost = plan.cost_bits + act_bits
    used = [(p.scheme, p.target) for p in plan.protections] + (["act"] if act else [])
    out = {"schema": SCHEMA, "run": str(r.path), "criterion": parse_criterion(criterion).text,
           "format": fmt.name, "schemes": list(wschemes) + (["act"] if act else []),
           "policy": policy, "method": method, "budget": float(budget),
           "budget_bits": int(float(budget) * total), "weight_bits": total, "cost_bits": cost,
           "overhead": cost / total, "reload_bits": plan.reload_bits,
           "protections": [{**p.to_dict(), "label": p.label} for p in plan.protections],
           "table": plan.table, "activation_clamps": clamps, **res.to_dict(),
           "coverage": coverage_summary(r.model, plan.protections, fmt.name, clamps),
           "exposure": _exposure(r, res, N, fmt.name, hardware, used, data_dir)
           if hardware else None,
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
