"""Critical-fault rates (CFR) of a campaign with stratified estimates and intervals.

Each executed fault is classified after the fact by a criterion (``accuracy-drop:0.01``,
``any-flip``, ``auroc-drop:0.02``; see ``flipguard.inject.parse_criterion``) into masked,
sdc-benign, sdc-critical or non-finite. A fault is *critical* when it is sdc-critical or
non-finite. For a group (any combination of layer, target, bit, field, kernel, kind) the rate
is the stratified estimator over its cells ``stratum x group`` with known populations
``N_c``: ``p = sum W_c p_c``, ``var = sum W_c^2 (N_c-n_c)/(N_c-1) p_c (1-p_c) / n_c``;
``margin = t sqrt(var)``; the Wilson / Clopper–Pearson interval uses the effective size
``min(p (1-p) / var, 1 / sum W_c^2 fpc_c / n_c)`` (``flipguard.campaign.stats.stratified``).
Cells without executed faults (a partial campaign) are reported as ``uncovered``, the share
of the group's population they hold, and the interval is widened to allow any rate there.

Example::

    rows = cfr_table("runs/demo", by=("layer",), criterion="accuracy-drop:0.01")
    rows[0]["cfr"], rows[0]["ci"], rows[0]["margin"]
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from flipguard.campaign.certified import check_judged
from flipguard.campaign.classify import classify_store, open_store
from flipguard.campaign.plan_types import UNIFORM, Sampling, sampling_type
from flipguard.campaign.planner import PlannedFault, PlannedStratum
from flipguard.campaign.stats import DEFAULT_METHOD, METHODS, check_confidence
from flipguard.campaign.store import CampaignStore
from flipguard.campaign.substrata import CERTIFIED
from flipguard.errors import ConfigError
from flipguard.faults import get_format
from flipguard.inject import CLASSES, CRITICAL

__all__ = ["BY_KEYS", "CLASSES", "CRITICAL", "cfr_rows", "cfr_table", "classify_store",
           "parse_by"]

BY_KEYS = ("layer", "target", "bit", "field", "kernel", "kind")


def parse_by(by: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"layer,bit"`` -> ("layer", "bit"); ``"network"``, "" or None -> () (one row).

    >>> parse_by("bit, layer")
    ('layer', 'bit')
    """
    if by is None:
        return ()
    parts = [p.strip() for p in (by.split(",") if isinstance(by, str) else by) if p.strip()]
    parts = [p for p in parts if p != "network"]
    bad = [p for p in parts if p not in BY_KEYS]
    if bad:
        raise ConfigError(f"by: expected a comma list of {', '.join(BY_KEYS)} (or network), "
                          f"got {bad[0]!r}")
    return tuple(k for k in BY_KEYS if k in parts)


def _group_of(pf: PlannedFault, field: str, by: Sequence[str]) -> tuple:
    f = pf.fault
    values = {"layer": f.layer, "target": f.target, "bit": f.bits[0], "field": field,
              "kernel": pf.kernel, "kind": f.kind}
    return tuple(values[k] for k in by)


def _cell_population(s: PlannedStratum, g: dict[str, Any], fmt: Any) -> int:
    if "layer" in g and g["layer"] != s.layer or "target" in g and g["target"] != s.target:
        return 0
    bits: set[int] | None = None
    if "bit" in g:
        bits = {int(g["bit"])}
    if "field" in g:
        fb = set(fmt.bits_of_field(g["field"]))
        bits = fb if bits is None else bits & fb
    return s.population_of(None if bits is None else sorted(bits), g.get("kernel"),
                           g.get("kind"))


def cfr_rows(strata: Sequence[PlannedStratum], records: Iterable[tuple[PlannedFault, str]],
             by: Sequence[str] = ("layer",), confidence: float = 0.99,
             method: str = DEFAULT_METHOD, fmt: str = "fp32", sampling: Sampling = UNIFORM
             ) -> list[dict[str, Any]]:
    """Rows of CFR per group from ``records`` = (planned fault, class) and the plan strata,
    estimated as the plan type ``sampling`` prescribes (``sampling_type(plan.sampling)``).

    Each row: the group keys, ``n``, ``critical``, ``cfr``, ``ci`` [low, high], ``N``,
    ``margin``, ``n_eff`` (None when enumerated exhaustively), ``uncovered`` (population
    share of the group's cells with no executed fault; ``cfr`` and ``margin`` describe the
    rest, ``ci`` the whole group), the rates ``masked``, ``sdc_benign``, ``sdc_critical``,
    ``non_finite`` and ``sampling`` ("uniform", or "stratified" for criticality sub-strata:
    estimator of docs/criticality.md).
    """
    by = parse_by(by)
    check_confidence(confidence)
    if method not in METHODS:
        raise ConfigError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    form = get_format(fmt)
    counts: dict[tuple, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    audit: dict[tuple, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    by_round: dict[tuple, dict[str, dict[int, Counter]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(Counter)))
    for pf, cls in records:
        if cls not in CLASSES:
            raise ConfigError(f"class: expected one of {', '.join(CLASSES)}, got {cls!r}")
        g = _group_of(pf, form.field(pf.fault.bits[0]), by)
        counts[g][pf.stratum][cls] += 1
        audit[g][pf.stratum][cls] += pf.round == 0
        by_round[g][pf.stratum][pf.round][cls] += 1
    layer_pos = {s.layer: i for i, s in reversed(list(enumerate(strata)))}
    order = {"layer": lambda v: layer_pos.get(v, 1 << 30), "bit": lambda v: -v,
             "field": lambda v: form.fields.index(v), "target": str, "kernel": int, "kind": str}
    rows = []
    for g in sorted(counts, key=lambda g: tuple(order[k](v) for k, v in zip(by, g,
                                                                            strict=True))):
        gd = dict(zip(by, g, strict=True))
        per = counts[g]
        cells = [(s, _cell_population(s, gd, form)) for s in strata]
        cells = [(s, N) for s, N in cells if N > 0]

        def est(classes: Sequence[str], cells=cells, per=per, first=audit[g],
                rounds=by_round[g]):
            return sampling.estimate(cells, per, first, rounds, classes, confidence, method)

        e = est(CRITICAL)
        row: dict[str, Any] = dict(gd)
        row.update(n=e.n, critical=e.k, cfr=e.p, ci=[e.ci[0], e.ci[1]], N=e.N,
                   margin=e.margin, n_eff=e.n_eff if math.isfinite(e.n_eff) else None,
                   uncovered=e.uncovered, sampling=sampling.name)
        for cls in CLASSES:
            row[cls.replace("-", "_")] = est((cls,)).p
        rows.append(row)
    return rows


def cfr_table(run_or_store: Any, by: str | Sequence[str] = ("layer",),
              criterion: str = "accuracy-drop:0.01", method: str = DEFAULT_METHOD,
              confidence: float | None = None,
              classify: Callable[[CampaignStore, str], list] | None = None
              ) -> list[dict[str, Any]]:
    """CFR rows of a campaign (run directory, ``Run``, store path or ``CampaignStore``).

    ``confidence`` defaults to the planned confidence; see :func:`cfr_rows` for the rows.
    """
    store, opened = open_store(run_or_store)
    try:
        plan = store.definition.get("plan", {})
        conf = float(confidence if confidence is not None else plan.get("confidence", 0.99))
        strata = store.strata()
        if any(s.crit == CERTIFIED for s in strata):
            check_judged(plan.get("criterion", "accuracy-drop:0.01"), criterion)
        records = (classify or classify_store)(store, criterion)
        return cfr_rows(strata, records, by, conf, method, plan.get("fmt", "fp32"),
                        sampling_type(plan.get("sampling", "uniform")))
    finally:
        if opened:
            store.close()
