"""The Pareto front as rows and as a figure (quality vs RA, memory as colour), shared by the
``flipguard nas`` outputs and the report section.

>>> front_rows({"final": [], "final_front": []}, ["systolic"])
[]
"""

from __future__ import annotations

import math
from typing import Any


def _arch_text(arch: dict[str, Any] | None) -> str:
    if not arch:
        return ""
    d = arch.get("depth")
    if d is None:
        return ", ".join(f"{k}={v}" for k, v in arch.items())
    w = "/".join(str(arch.get(f"width{i}")) for i in range(d))
    k = "/".join(str(arch.get(f"kernel{i}")) for i in range(d))
    extra = (" +res" if arch.get("skip") else " +conv") if arch.get("refine") else ""
    return (f"d{d} w{w} k{k}{extra} {arch.get('latent_kind', '')}:{arch.get('latent')} "
            f"{arch.get('act')}")


def front_rows(doc: dict[str, Any], hardware: list[str]) -> list[dict[str, Any]]:
    """One row per retrained network (and the baseline): validation objectives, RA with its
    interval per exposure, test metrics, whether it is on the full-fidelity front."""
    items = list(doc.get("final") or []) + ([doc["baseline"]] if doc.get("baseline") else [])
    front = set(doc.get("final_front") or [])
    rows = []
    for it in items:
        row: dict[str, Any] = {"network": it.get("name") or it["key"],
                               "architecture": _arch_text(it.get("arch")),
                               "on_front": it["key"] in front,
                               "val_quality": it["quality"], "memory_bits": it["memory_bits"],
                               "macs": it["macs"], "parameters": it["parameters"]}
        for hw in hardware:
            r = it["ra"].get(hw)
            if r:
                row[f"ra_{hw}"], row[f"ra_{hw}_ci"] = r["ra"], list(r["ci"])
                row[f"drop_{hw}"] = r["accuracy_drop"]
        test = it.get("test") or {}
        for k in ("image_auroc", "pixel_auroc", "aupro", "f1", "accuracy"):
            if k in test:
                row[f"test_{k}"] = test[k]
        rows.append(row)
    return rows


def front_figure(doc: dict[str, Any], hardware: list[str]) -> Any:
    """Quality vs RA per exposure model: screened networks (small), retrained ones (large,
    RA interval as bars, ringed when on the final front), the baseline (X); colour =
    log10 of the stored parameter bits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    screened = doc.get("screened") or []
    final = doc.get("final") or []
    base = doc.get("baseline")
    every = screened + final + ([base] if base else [])
    mem = [math.log10(max(1, it["memory_bits"])) for it in every] or [0.0, 1.0]
    norm = Normalize(min(mem), max(mem) if max(mem) > min(mem) else min(mem) + 1)
    cmap = plt.get_cmap("viridis")
    front = set(doc.get("final_front") or [])
    fig, axes = plt.subplots(1, len(hardware), figsize=(5.2 * len(hardware), 4.2),
                             squeeze=False, layout="constrained")
    for ax, hw in zip(axes[0], hardware, strict=True):
        pts = [it for it in screened if hw in it.get("ra", {})]
        ax.scatter([it["ra"][hw]["ra"] for it in pts], [it["quality"] for it in pts], s=14,
                   c=[cmap(norm(math.log10(max(1, it["memory_bits"])))) for it in pts],
                   alpha=0.55, label="screened", linewidths=0)
        for it, marker, label in [(f, "o", "retrained") for f in final] + (
                [(base, "X", base.get("name", "baseline"))] if base else []):
            r = it["ra"].get(hw)
            if r is None:
                continue
            col = cmap(norm(math.log10(max(1, it["memory_bits"]))))
            lo, hi = r["ci"]
            ax.errorbar([r["ra"]], [it["quality"]], xerr=[[r["ra"] - lo], [hi - r["ra"]]],
                        fmt="none", ecolor="#555555", elinewidth=0.8, capsize=2)
            ax.scatter([r["ra"]], [it["quality"]], s=90 if marker == "X" else 60,
                       marker=marker, color=col,
                       edgecolors="red" if marker == "X" else "black",
                       linewidths=2.0 if it["key"] in front else 0.8, zorder=3)
            if marker == "X":
                ax.annotate(label, (r["ra"], it["quality"]), textcoords="offset points",
                            xytext=(6, -10), fontsize=8, color="red")
        ax.set_xlabel(f"RA under {hw} exposure (validation)")
        ax.set_ylabel("detection quality (validation)")
        ax.set_title(f"{hw}: quality vs RA")
        ax.grid(alpha=0.3)
    sm = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, ax=axes[0].tolist(), label="log10 parameter bits")
    return fig


