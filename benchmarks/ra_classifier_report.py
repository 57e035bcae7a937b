"""Markdown report of ``bench_ra_classifier.py`` (tables for BENCHMARKS.md section 7)."""

from __future__ import annotations

from _emit import command


def report(s: dict, args, argv) -> str:
    pct = f"±{100 * s['margin']:.2f} % at {100 * s['confidence']:.0f} %"
    lines = [f"digits CNN ({s['parameters']} parameters), {s['images']} test images, golden "
             f"accuracy {s['golden_accuracy']:.4f}; {s['sites']} sites, all injected; interval "
             f"{args.interval}", "",
             "| exposure model | P(weight) | P(activation) | exact RA | accuracy drop | "
             f"MC to {pct} (mean of runs) | MC coverage |", "|---|---|---|---|---|---|---|"]
    for hw, m in s["models"].items():
        mc = m["mc_seq"]
        lines.append(f"| {hw} | {m['share'].get('weight', 0):.3f} | "
                     f"{m['share'].get('activation', 0):.3f} | {m['exact_ra']:.4f} | "
                     f"{m['drop']:.4f} | {mc['ra_mean']:.4f} ({mc['samples']:.0f} samples) | "
                     f"{mc['coverage']:.0%} |")
    lines += ["", f"Injections for {pct} (distinct sites, pilot included; {args.seeds} runs "
              "per row). valid n: predicted for the betting CS from the exact sd and the term "
              "bound (fixed proposals; + pilot), normal n: (z·sd/m)² (the old planning); "
              "sequential: stop at the first batch with half-width ≤ m (min 100 samples), "
              "mean injections (coverage of the exact RA, mean α for adaptive); fixed n: "
              "smallest n (multiple of the batch) whose RMSE over the runs is ≤ m/z.",
              "", "| exposure model | estimator | sd per sample | valid n (normal n) | "
              "sequential (coverage) | fixed n | MC / IS (sequential) | MC / IS (valid n) |",
              "|---|---|---|---|---|---|---|---|"]
    for hw, m in s["models"].items():
        mc = m["mc_seq"]
        lines.append(f"| {hw} | MC | {m['sd_mc']:.4f} | {m['n_mc']:,} "
                     f"({m['n_mc_clt']:,.0f}) | {mc['injections']:,.0f} ({mc['coverage']:.0%})"
                     " | — | 1 | 1 |")
        for name, r in m["is"].items():
            seq = r.get("seq", {})
            sd = f"{r['sd']:.4f}" if "sd" in r else "—"
            nx = f"{r['n']:,.0f} ({r['n_clt']:,.0f})" if "n" in r else "—"
            al = f", α {seq['alpha']:.2f}" if "alpha" in seq else ""
            sq = f"{seq['injections']:,.0f} ({seq['coverage']:.0%}{al})" if seq else "—"
            fx = f"{seq['fixed_injections']:,.0f}" if "fixed_injections" in seq else "—"
            r_seq = f"{mc['injections'] / seq['injections']:.1f}×" if seq else "—"
            r_fx = f"{m['n_mc'] / r['n']:.1f}×" if "n" in r else "—"
            lines.append(f"| {hw} | IS {name} | {sd} | {nx} | {sq} | {fx} | {r_seq} | "
                         f"{r_fx} |")
            if "n_best" in r:
                lines.append(f"| {hw} | IS {name}, best α = {r['alpha_best']:.2f} | — | "
                             f"{r['n_best']:,} | — | — | — | {m['n_mc'] / r['n_best']:.1f}× |")
    if any("mc_seq_clt" in m for m in s["models"].values()):
        lines += ["", f"Old normal interval, same seeds (sequential to {pct}): injections "
                  "(coverage, mean half-width)", "", "| exposure model | MC | IS adaptive, "
                  f"fixed α = {args.alpha} |", "|---|---|---|"]
        for hw, m in s["models"].items():
            a, b = m["mc_seq_clt"], m["is_seq_clt"]
            lines.append(f"| {hw} | {a['injections']:,.0f} ({a['coverage']:.0%}, "
                         f"±{100 * a['half_width']:.3f} %) | {b['injections']:,.0f} "
                         f"({b['coverage']:.0%}, ±{100 * b['half_width']:.3f} %) |")
    if "check" in s:
        lines += ["", "Real injections (systolic, seed 0, `resiliency_accuracy`, sequential "
                  f"to {pct}):"]
        for k, v in s["check"].items():
            lines.append(f"* {k}: RA {v['ra']:.4f} ± {v['half_width']:.4f}, {v['samples']} "
                         f"samples, {v['injections']} injections, {v['seconds']:.0f} s "
                         f"(interval {v['interval']})")
    return "\n".join(lines + ["", f"command: {command('bench_ra_classifier.py', argv or None)}"])
