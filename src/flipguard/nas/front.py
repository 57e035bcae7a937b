"""After the screening studies: the fronts, their architectures retrained at full fidelity
(with the space's baseline), evaluated on the test set, and the uniform vs hardware-aware
rankings.

* Front of a study: the non-dominated complete trials under the study's objectives
  (:func:`flipguard.nas.pareto.pareto_front`); at most ``front_max`` of them, spread evenly
  along the first objective, are retrained (``OUT/full/<key>/``, cached).
* Full fidelity: ``full.epochs`` of training and RA to ``full.ra_margin`` (at most
  ``full.ra_max_samples``) under every exposure of the search, on validation data.
* Test set: detection metrics of every retrained network (the test labels are read here,
  never by the objectives).
* Rankings: Kendall's tau-b (``scipy.stats.kendalltau``) between the RA values of the same
  networks under uniform and under the hardware-aware exposure, and the same for the
  accuracy drop ``golden - RA``; on every screened network and on the retrained ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from flipguard.data import load_mvtec
from flipguard.detect import evaluate_detector
from flipguard.fileio import atomic_write, json_clean
from flipguard.nas.config import NASConfig
from flipguard.nas.objectives import DIRECTIONS, calibrated_detector, objective_values
from flipguard.nas.pareto import dominates, pareto_front
from flipguard.nas.search import Context, _load_pt, screen, storage_url

__all__ = ["baseline_dominated_by", "complete_trials", "final_stage", "rank_agreement",
           "select_spread", "study_front"]


def complete_trials(cfg: NASConfig, name: str) -> list[dict[str, Any]]:
    """Complete trials of study ``name``: number, arch, key, values, result."""
    import optuna
    from optuna.trial import TrialState

    try:
        study = optuna.load_study(study_name=name, storage=storage_url(cfg.out))
    except KeyError:
        return []
    return [{"number": t.number, "arch": t.user_attrs.get("arch", t.params),
             "key": t.user_attrs.get("key"), "values": list(t.values),
             "result": t.user_attrs.get("result", {})}
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]


def study_front(cfg: NASConfig, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows on the Pareto front of their objective values (duplicate keys once)."""
    if not rows:
        return []
    idx = pareto_front([r["values"] for r in rows], cfg.directions())
    seen: set[str] = set()
    out = []
    for i in idx:
        if rows[i]["key"] not in seen:
            seen.add(rows[i]["key"])
            out.append(rows[i])
    return out


def select_spread(rows: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """At most ``k`` rows spread evenly along the first objective (ends included).

    >>> [r["v"] for r in select_spread([{"v": i, "values": [i]} for i in range(7)], 3)]
    [0, 3, 6]
    """
    if k <= 0:
        return []
    if len(rows) <= k:
        return list(rows)
    order = sorted(rows, key=lambda r: r["values"][0])
    pick = np.unique(np.linspace(0, len(order) - 1, k).round().astype(int))
    return [order[i] for i in pick]


def rank_agreement(a: list[float], b: list[float]) -> dict[str, Any]:
    """Kendall's tau-b of two scores of the same items (None below 3 items).

    >>> rank_agreement([1, 2, 3, 4], [1, 3, 2, 4])["tau"]
    0.6666666666666669
    """
    from scipy.stats import kendalltau

    n = len(a)
    if n < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return {"n": n, "tau": None, "p_value": None}
    res = kendalltau(a, b)
    return {"n": n, "tau": float(res.statistic), "p_value": float(res.pvalue)}


def _rankings(rows: list[dict[str, Any]], hw: str) -> dict[str, Any]:
    """RA / drop under uniform vs ``hw`` on rows with both (``result["ra"]``)."""
    both = [r for r in rows if "uniform" in r["ra"] and hw in r["ra"]]
    ra_u = [r["ra"]["uniform"]["ra"] for r in both]
    ra_h = [r["ra"][hw]["ra"] for r in both]
    d_u = [r["ra"]["uniform"]["accuracy_drop"] for r in both]
    d_h = [r["ra"][hw]["accuracy_drop"] for r in both]
    diff = np.asarray(ra_u) - np.asarray(ra_h)
    return {"networks": len(both), "ra": rank_agreement(ra_u, ra_h),
            "drop": rank_agreement(d_u, d_h),
            "uniform_minus_hardware_ra": {
                "mean": float(diff.mean()) if diff.size else None,
                "share_positive": float((diff > 0).mean()) if diff.size else None}}


def baseline_dominated_by(items: list[dict[str, Any]], base: dict[str, Any], hw: str,
                          significant: bool = False) -> list[str]:
    """Keys of the items with quality >= the baseline's, higher RA under ``hw`` and memory
    <= the baseline's (strictly higher RA point estimate; with ``significant`` the item's
    RA interval must lie entirely above the baseline's).

    >>> b = {"key": "b", "quality": 0.8, "memory_bits": 10,
    ...      "ra": {"u": {"ra": 0.5, "ci": [0.4, 0.6]}}}
    >>> a = {"key": "a", "quality": 0.8, "memory_bits": 5,
    ...      "ra": {"u": {"ra": 0.55, "ci": [0.5, 0.6]}}}
    >>> baseline_dominated_by([a], b, "u"), baseline_dominated_by([a], b, "u", significant=True)
    (['a'], [])
    """
    out = []
    br = base["ra"][hw]
    for it in items:
        r = it["ra"][hw]
        higher = r["ci"][0] > br["ci"][1] if significant else r["ra"] > br["ra"]
        if it["quality"] >= base["quality"] and higher and \
                it["memory_bits"] <= base["memory_bits"]:
            out.append(it["key"])
    return out


def _test_metrics(ctx: Context, arch: dict[str, Any] | None, work: Path,
                  test: Any) -> dict[str, Any]:
    import torch


    path = work / "test.json"
    if path.is_file():
        return json.loads(path.read_text())
    net = ctx.build(arch)
    net.load_state_dict(torch.load(work / "model.pt", weights_only=True))
    net.eval()
    if ctx.data.task == "detection":
        scorer, thr, _ = calibrated_detector(net, ctx.data, ctx.cfg.settings)
        m = evaluate_detector(net, scorer, thr, test.test, test.test_labels, test.test_masks)
        keep = ("image_auroc", "pixel_auroc", "aupro", "f1", "accuracy", "fpr", "n_test")
        res = {k: m.get(k) for k in keep}
    else:
        x, y = test
        with torch.no_grad():
            res = {"accuracy": float((net(x).argmax(1) == y).float().mean()),
                   "n_test": int(y.shape[0])}
    atomic_write(path, json.dumps(json_clean(res), indent=1) + "\n")
    return res


def _load_test(cfg: NASConfig, task: str) -> Any:
    if task == "detection":

        return load_mvtec(cfg.data, category=cfg.category, size=cfg.size)

    blob = _load_pt(cfg.data)
    if "test_inputs" not in blob or "test_labels" not in blob:
        return None
    return blob["test_inputs"].float(), blob["test_labels"].long()


def _full_job(cfg_dict: dict[str, Any], arch: dict[str, Any] | None) -> dict[str, Any]:
    import torch

    cfg = NASConfig.from_dict(cfg_dict)
    torch.set_num_threads(cfg.threads)
    return screen(Context(cfg), arch, "full")


def final_stage(cfg: NASConfig, ctx: Context, progress: Any = None) -> dict[str, Any]:
    """Fronts, full-fidelity retraining with the baseline, test metrics, rankings."""
    hw = cfg.hardware
    studies: dict[str, Any] = {}
    screened: dict[str, dict[str, Any]] = {}
    chosen: dict[str, dict[str, Any]] = {}
    for name, shw in zip(cfg.study_names(), cfg.study_hardware(), strict=True):
        rows = complete_trials(cfg, name)
        front = study_front(cfg, rows)
        pick = select_spread(front, cfg.front_max)
        for r in rows:
            screened.setdefault(r["key"], {"key": r["key"], "arch": r["arch"], **r["result"]})
        for r in pick:
            chosen.setdefault(r["key"], {"arch": r["arch"], "from": []})["from"].append(name)
        studies[name] = {"hardware": shw, "complete": len(rows),
                         "front": [r["number"] for r in front],
                         "retrained": [r["number"] for r in pick]}
    baseline_ok = ctx.space.baseline(ctx.data.input_shape) is not None
    jobs: list[tuple[str | None, dict[str, Any] | None]] = []
    if cfg.retrain:
        jobs = [(k, v["arch"]) for k, v in chosen.items()]
        if baseline_ok:
            jobs.append((None, None))
    results = _run_jobs(cfg, ctx, [a for _, a in jobs], progress)
    test = _load_test(cfg, ctx.data.task) if jobs else None
    final: list[dict[str, Any]] = []
    base: dict[str, Any] | None = None
    for (skey, arch), res in zip(jobs, results, strict=True):
        work = cfg.out_path / "full" / res["key"]
        item = {**{k: res[k] for k in ("key", "arch", "quality", "metrics", "memory_bits",
                                         "macs", "parameters", "ra", "seconds")},
                "screen_key": skey, "from_studies": chosen[skey]["from"] if skey else [],
                "test": _test_metrics(ctx, arch, work, test) if test is not None else None}
        if skey is None:
            item["name"] = ctx.space.baseline_name()
            base = item
        else:
            final.append(item)
    values = [objective_values(it, cfg.objectives, hw) for it in final + ([base] if base else [])]
    fidx = pareto_front(values, cfg.directions()) if values else np.zeros(0, int)
    allf = final + ([base] if base else [])
    doc: dict[str, Any] = {
        "studies": studies, "screened": list(screened.values()), "final": final,
        "baseline": base, "final_front": [allf[i]["key"] for i in fidx],
        "dominates_baseline": baseline_dominated_by(final, base, hw) if base else [],
        "dominates_baseline_significant":
            baseline_dominated_by(final, base, hw, significant=True) if base else [],
        "pareto_dominates_baseline": [it["key"] for it, v in zip(final, values, strict=False)
                                      if base and dominates(v, values[-1], cfg.directions())],
        "directions": {o: DIRECTIONS[o] for o in cfg.objectives}}
    if "uniform" in cfg.settings.hardware and hw != "uniform":
        doc["rankings"] = {"screen": _rankings(list(screened.values()), hw),
                           "full": _rankings(allf, hw)}
    return doc


def _run_jobs(cfg: NASConfig, ctx: Context, archs: list[dict[str, Any] | None],
              progress: Any) -> list[dict[str, Any]]:
    if cfg.workers == 1 or len(archs) <= 1:
        out = []
        for i, a in enumerate(archs):
            out.append(screen(ctx, a, "full"))
            if progress is not None:
                progress("full", {"done": i + 1, "total": len(archs)})
        return out
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(cfg.workers, mp_context=mp.get_context("spawn")) as pool:
        futs = [pool.submit(_full_job, cfg.to_dict(), a) for a in archs]
        out = []
        for i, f in enumerate(futs):
            out.append(f.result())
            if progress is not None:
                progress("full", {"done": i + 1, "total": len(archs)})
        return out
