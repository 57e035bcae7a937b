"""The figure of an SFI-vs-exhaustive validation record (``flipguard validate``).

Left: the exhaustive CFR of every bit (bars) with the SFI estimate and interval of one draw
of the per-bit design at each margin beside it. Right: the empirical coverage of each design
(layer-wise, layer×bit) against the margin, with ±2 Monte-Carlo standard errors, beside the
nominal confidence.

>>> rec = {"layer": "l", "confidence": 0.95, "fmt": "fp32", "criterion": "any-flip",
...        "rows": [{"scope": s, "key": k, "margin": 0.05, "cfr": 0.1, "estimate": 0.1,
...                  "ci": [0.05, 0.15], "coverage": 0.95, "coverage_se": 0.01}
...                 for s, k in (("layer", "all"), ("bit", "0"), ("bit", "1"))]}
>>> fig = validation_figure(rec); len(fig.axes)
2
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flipguard.faults import get_format
from flipguard.report.figures import BAR_COLOUR, ERR_COLOUR, STYLE, field_colour, new_figure

__all__ = ["validation_figure"]

_MARKERS = "os^Dv"


def validation_figure(record: dict[str, Any]) -> Any:
    """Two panels (module docstring) of a ``RUN/validate/<layer>.json`` record."""
    import matplotlib.pyplot as plt

    rows = record.get("rows", [])
    margins = sorted({float(r["margin"]) for r in rows})
    bits = sorted({int(r["key"]) for r in rows if r["scope"] == "bit"})
    fmt = get_format(record.get("fmt", "fp32"))
    with plt.rc_context(STYLE):
        fig, (ax, cx) = new_figure(11.0, 3.6, 1, 2, width_ratios=[2.2, 1])
        x = np.arange(len(bits))
        truth = {int(r["key"]): 100 * r["cfr"] for r in rows if r["scope"] == "bit"}
        colours = [field_colour(fmt.field(b)) for b in bits]
        ax.bar(x, [truth[b] for b in bits], color=colours, alpha=0.35, width=0.8,
               label="exhaustive")
        width = 0.8 / max(len(margins), 1)
        for j, e in enumerate(margins):
            sel = {int(r["key"]): r for r in rows if r["scope"] == "bit" and r["margin"] == e}
            est = np.array([100 * sel[b]["estimate"] for b in bits])
            lo = np.array([100 * sel[b]["ci"][0] for b in bits])
            hi = np.array([100 * sel[b]["ci"][1] for b in bits])
            ax.errorbar(x - 0.4 + width * (j + 0.5), est,
                        yerr=np.vstack([np.clip(est - lo, 0, None), np.clip(hi - est, 0, None)]),
                        fmt=_MARKERS[j % len(_MARKERS)], ms=3, color=ERR_COLOUR,
                        alpha=0.5 + 0.5 * (j + 1) / len(margins), label=f"SFI e = {e:g}")
        ax.set_xticks(x, [str(b) for b in bits], fontsize=7)
        ax.set_xlabel("bit")
        ax.set_ylabel("CFR (%)")
        ax.set_title(f"{record.get('layer', '')}: exhaustive vs one SFI draw per bit")
        ax.legend(loc="upper left", frameon=False)
        nominal = 100 * float(record.get("confidence", 0.95))
        for k, scope in enumerate(s for s in ("layer", "layer×bit", "bit")
                                  if any(r["scope"] == s for r in rows)):
            sel = sorted((r for r in rows if r["scope"] == scope), key=lambda r: r["margin"])
            if scope == "bit":  # the worst bit at each margin
                sel = [min((r for r in sel if r["margin"] == e), key=lambda r: r["coverage"])
                       for e in margins]
            cov = np.array([100 * r["coverage"] for r in sel])
            se = np.array([200 * r.get("coverage_se", 0.0) for r in sel])
            cx.errorbar([100 * r["margin"] for r in sel], cov, yerr=se,
                        fmt=_MARKERS[k] + "-", ms=4,
                        color=(BAR_COLOUR, "#e67e22", "#7f8c8d")[k],
                        label="worst bit" if scope == "bit" else scope)
        cx.axhline(nominal, color="#c0392b", lw=1, ls="--", label=f"nominal {nominal:g} %")
        cx.axhline(nominal - 1, color="#c0392b", lw=0.6, ls=":")
        cx.set_xlabel("margin e (%)")
        cx.set_ylabel("coverage (%)")
        cx.set_title("interval coverage")
        cx.legend(frameon=False, fontsize=8)
    return fig
