"""Do two campaigns of the same model agree within their intervals, layer by layer? (§12)

    python benchmarks/campaign_agree.py RUN_A RUN_B [--criterion C] [--json] [--save F]

Both runs must hold the same model (the weights in ``model.pt`` compared byte for byte) and
judge the same criterion. Per layer: each campaign's executed faults, CFR and interval, and
``agree`` when the two intervals overlap — the check BENCHMARKS §6 applies to a uniform and a
stratified campaign. Overlap is a weak check; the rows also give ``z``, the difference of the
two estimates over the larger half-width, for a look at how close they are.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _emit import emit

from flipguard.campaign.analysis import cfr_table
from flipguard.campaign.store import store_path
from flipguard.fingerprint import state_fingerprint


def _digest(run: str) -> str:
    """Fingerprint of the run's weights (names, dtypes, shapes, bytes), not of the file's bytes:
    a ``model.pt`` written before ``save_torch`` names its temp file inside the archive."""
    return state_fingerprint(torch.load(Path(run) / "model.pt", weights_only=True))


def agreement(a: list[dict], b: list[dict]) -> list[dict]:
    """Rows of the layers both CFR tables have, with ``agree`` = the intervals overlap.

    >>> r = agreement([{"layer": "x", "n": 9, "cfr": .1, "ci": [.05, .2]}],
    ...               [{"layer": "x", "n": 5, "cfr": .25, "ci": [.15, .4]}])
    >>> r[0]["agree"], round(r[0]["z"], 2)
    (True, 1.0)
    """
    other = {r["layer"]: r for r in b}
    rows = []
    for ra in a:
        rb = other.get(ra["layer"])
        if rb is None:
            continue
        overlap = ra["ci"][0] <= rb["ci"][1] and rb["ci"][0] <= ra["ci"][1]
        half = max(ra["ci"][1] - ra["cfr"], ra["cfr"] - ra["ci"][0],
                   rb["ci"][1] - rb["cfr"], rb["cfr"] - rb["ci"][0], 1e-12)
        rows.append({"layer": ra["layer"], "n_a": ra["n"], "cfr_a": ra["cfr"], "ci_a": ra["ci"],
                     "n_b": rb["n"], "cfr_b": rb["cfr"], "ci_b": rb["ci"],
                     "agree": bool(overlap), "z": abs(ra["cfr"] - rb["cfr"]) / half})
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_a")
    ap.add_argument("run_b")
    ap.add_argument("--criterion", default="accuracy-drop:0.01")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--save", default=None)
    a = ap.parse_args(argv)
    if _digest(a.run_a) != _digest(a.run_b):
        raise SystemExit(f"{a.run_b}/model.pt: expected the same model as {a.run_a}/model.pt")
    rows = agreement(cfr_table(store_path(a.run_a), criterion=a.criterion),
                     cfr_table(store_path(a.run_b), criterion=a.criterion))
    summary = {"run_a": a.run_a, "run_b": a.run_b, "criterion": a.criterion,
               "all_agree": all(r["agree"] for r in rows),
               "agree": sum(r["agree"] for r in rows), "layers": rows}

    def pct(x: float) -> str:
        return f"{100 * x:.2f}"

    def text() -> str:
        out = ["| layer | n A | CFR A % [CI] | n B | CFR B % [CI] | agree |",
               "|---|---:|---|---:|---|---|"]
        for r in rows:
            out.append(f"| {r['layer']} | {r['n_a']:,} | {pct(r['cfr_a'])} [{pct(r['ci_a'][0])}, "
                       f"{pct(r['ci_a'][1])}] | {r['n_b']:,} | {pct(r['cfr_b'])} "
                       f"[{pct(r['ci_b'][0])}, {pct(r['ci_b'][1])}] | "
                       f"{'yes' if r['agree'] else 'NO'} |")
        out.append(f"\n{summary['agree']} of {len(rows)} layers agree within their intervals.")
        return "\n".join(out)

    return emit(summary, a.save, a.json, text)


if __name__ == "__main__":
    main()
