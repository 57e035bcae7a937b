"""Plain-language sentences and helpers shared by the report sections: the one-line hardening
and resiliency findings (used by their sections and by the summary) and dict flattening.

>>> flatten({"data": {"size": 64}, "score": {"map": "ssim"}})
[('data.size', 64), ('score.map', 'ssim')]
"""

from __future__ import annotations

from typing import Any

from flipguard.report.html import fmt_value

__all__ = ["flatten", "hardening_text", "ra_text"]


def flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``{"a": {"b": 1}} -> [("a.b", 1)]`` (lists kept as values).

    >>> flatten({"data": {"size": 64}, "score": {"map": "ssim"}})
    [('data.size', 64), ('score.map', 'ssim')]
    """
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out += flatten(v, key + ".")
        else:
            out.append((key, v))
    return out


def hardening_text(h: dict[str, Any]) -> str | None:
    """One sentence on the hardening result: measured (paired re-injection) when present,
    else the planner's expectation.

    >>> hardening_text({"overhead": 0.02, "cfr_before": {"cfr": 0.1}, "cfr_after": {"cfr": 0.05},
    ...                 "n_faults": 300})[:60]
    'With 2 % extra storage the measured CFR falls from 10 % to 5'
    """
    pct = lambda v: f"{fmt_value(v, 'pct')} %"  # noqa: E731
    b, a = h.get("cfr_before"), h.get("cfr_after")
    over = f"With {pct(h.get('overhead'))} extra storage"
    if isinstance(b, dict) and isinstance(a, dict):
        text = (f"{over} the measured CFR falls from {pct(b.get('cfr'))} to "
                f"{pct(a.get('cfr'))} on the same {fmt_value(h.get('n_faults'), 'int')} "
                "campaign faults (paired re-injection)")
        ci = h.get("ci")
        weighted = h.get("p_value") is not None
        if h.get("relative_improvement") is not None and isinstance(ci, list) and len(ci) == 2:
            kind = "weighted MOVER-R" if weighted else "paired bootstrap"
            text += (f": relative improvement {pct(h['relative_improvement'])} "
                     f"({100 * float(h.get('ci_level') or 0.95):g} % {kind} interval "
                     f"{fmt_value(ci[0], 'pct')}–{fmt_value(ci[1], 'pct')} %)")
        if weighted:
            text += f", weighted test of no change p = {fmt_value(h['p_value'], 'float')}"
        elif h.get("mcnemar_p") is not None:
            text += f", McNemar p = {fmt_value(h['mcnemar_p'], 'float')}"
        cov = h.get("coverage")
        if isinstance(cov, list) and cov:
            miss = sorted({loc for c in cov for loc in c.get("not_covered", [])})
            text += (". The protections cover faults in "
                     + ", ".join(sorted({loc for c in cov for loc in c.get("locations", [])}))
                     + (f" only, not in {', '.join(miss)}" if miss else ""))
        ex = h.get("exposure")
        if isinstance(ex, dict) and ex.get("relative_improvement") is not None:
            text += (f"; over the {ex.get('hardware')} exposure the improvement is "
                     f"{pct(ex['relative_improvement'])} ({pct(ex.get('covered_share'))} of "
                     "the exposure is in covered locations)")
        return text + "."
    e = h.get("expected") if isinstance(h.get("expected"), dict) else h
    keys = ("cfr_before", "cfr_after") if e is not h else ("expected_cfr_before",
                                                           "expected_cfr_after")
    if all(e.get(k) is not None for k in keys):
        return (f"{over} the CFR is expected to fall from {pct(e[keys[0]])} to "
                f"{pct(e[keys[1]])} (planner estimate).")
    return None


def ra_text(r: dict[str, Any]) -> str | None:
    """One sentence on a resiliency-accuracy result (``flipguard.ra.result_dict`` fields).

    >>> ra_text({"ra": 0.9, "ci": [0.88, 0.92], "confidence": 0.95, "golden_accuracy": 0.95})
    'Resiliency accuracy 90 % (95 % interval 88–92 %), against 95 % without faults.'
    """
    if r.get("ra") is None:
        return None
    text = f"Resiliency accuracy {fmt_value(r['ra'], 'pct')} %"
    ci = r.get("ci")
    if isinstance(ci, list) and len(ci) == 2:
        text += (f" ({100 * float(r.get('confidence', 0.95)):g} % interval "
                 f"{fmt_value(ci[0], 'pct')}–{fmt_value(ci[1], 'pct')} %)")
    if r.get("golden_accuracy") is not None:
        text += f", against {fmt_value(r['golden_accuracy'], 'pct')} % without faults"
    if r.get("hardware"):
        text += f"; exposure model {r['hardware']}"
    if r.get("estimator") and r.get("samples") is not None:
        text += f", {r['estimator']} estimator with {fmt_value(r['samples'], 'int')} samples"
    return text + "."
