"""Train and evaluate one CAE detector configuration on an MVTec-layout dataset; print the
detector row (image / pixel AUROC, AUPRO, deployed F1 and accuracy vs oracle, train time,
inference time) and the threshold table (normal-data-only rules vs the test-label oracle).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_detector.py \
        --data ../shared/datasets/magnetic_tile --out runs/mt_detector

The defaults are those of ``flipguard train``; every option maps to the CLI option of the
same name. Thresholds in the second table are all computed from the same held-out normal
validation scores (never from test labels); only the "oracle" column uses test labels.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _emit import command, emit  # noqa: E402

from flipguard.data import split_validation  # noqa: E402
from flipguard.detect import reconstruct  # noqa: E402
from flipguard.metrics import best_f1_threshold, threshold_metrics  # noqa: E402
from flipguard.study.detector import detector_options, train_detector  # noqa: E402
from flipguard.threshold import calibrate_threshold  # noqa: E402


def _args(argv: list[str] | None) -> argparse.Namespace:
    from flipguard.cli._core import DEFAULTS as D

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default="../shared/datasets/magnetic_tile")
    ap.add_argument("--out", default="runs/mt_detector")
    ap.add_argument("--size", type=int, default=D["size"])
    ap.add_argument("--resize", default=D["resize"])
    ap.add_argument("--epochs", type=int, default=D["epochs"])
    ap.add_argument("--batch-size", type=int, default=D["batch_size"])
    ap.add_argument("--lr", type=float, default=D["lr"])
    ap.add_argument("--loss", default=D["loss"])
    ap.add_argument("--inpaint", type=float, default=D["inpaint"])
    ap.add_argument("--crop", type=int, default=D["crop"])
    ap.add_argument("--schedule", default=D["schedule"])
    ap.add_argument("--ema", type=float, default=D["ema"])
    ap.add_argument("--map", default=D["map"])
    ap.add_argument("--smooth", type=float, default=D["smooth"])
    ap.add_argument("--standardize", action=argparse.BooleanOptionalAction,
                    default=D["standardize"])
    ap.add_argument("--ignore-margin", action=argparse.BooleanOptionalAction,
                    default=D["ignore_margin"])
    ap.add_argument("--latent", type=int, default=D["latent"])
    ap.add_argument("--bottleneck", default=D["bottleneck"])
    ap.add_argument("--latent-stride", type=int, default=D["latent_stride"])
    ap.add_argument("--memory", type=int, default=D["memory"])
    ap.add_argument("--width", type=float, default=D["width"])
    ap.add_argument("--fpr", type=float, default=D["fpr"])
    ap.add_argument("--threshold", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--label", default="", help="name of the configuration in the table")
    ap.add_argument("--save", default=None, help="write the summary JSON here")
    ap.add_argument("--json", action="store_true")
    return ap.parse_args(argv)


def threshold_table(run, ds) -> list[dict]:
    """Deployed F1/accuracy/test FPR of each normal-data-only rule, same validation scores."""
    d = run.config.data
    _, val_idx = split_validation(len(ds.train), d.val_fraction, seed=d.split_seed)
    val = ds.train[torch.as_tensor(val_idx)]
    vs = run.scorer.scores(val, reconstruct(run.model, val)).numpy()
    ts = run.scorer.scores(ds.test, reconstruct(run.model, ds.test)).numpy()
    y = np.asarray(ds.test_labels)
    oracle_f1, oracle_thr = best_f1_threshold(y, ts)
    oracle_acc = threshold_metrics(y, ts, oracle_thr)["accuracy"]
    rows = []
    rules = [("quantile", {"quantile": 0.99}, "quantile 0.99 (old default)")]
    for fpr in (0.01, 0.05, 0.1):
        rules += [("tail", {"fpr": fpr}, f"tail, fpr {fpr:g}")]
        if (len(vs) + 1) * fpr >= 1:
            rules += [("empirical", {"fpr": fpr}, f"empirical, fpr {fpr:g}")]
    for method, kw, name in rules:
        thr = calibrate_threshold(vs, method=method, **kw)
        m = threshold_metrics(y, ts, thr)
        rows.append({"rule": name, "threshold": thr, "f1": m["f1"], "accuracy": m["accuracy"],
                     "recall": m["recall"], "test_fpr": m["fp"] / max(1, m["fp"] + m["tn"]),
                     "f1_vs_oracle": m["f1"] / oracle_f1 if oracle_f1 else None,
                     "oracle_f1": oracle_f1, "oracle_accuracy": oracle_acc,
                     "n_val": int(len(vs))})
    return rows


def main(argv: list[str] | None = None) -> dict:
    a = _args(argv)
    torch.set_num_threads(a.threads)
    cmd = command("bench_detector.py", argv, prefix="OMP_WAIT_POLICY=PASSIVE ")
    t0, c0 = time.perf_counter(), time.process_time()

    def progress(stage: str, done: int, total: int, info: dict) -> None:
        if stage == "train" and (done % 10 == 0 or done == total):
            print(f"epoch {done}/{total} loss={info.get('loss', 0):.4f} "
                  f"t={time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)

    o = detector_options(
        size=a.size, resize=a.resize, width=a.width, latent=a.latent, bottleneck=a.bottleneck,
        latent_stride=a.latent_stride, memory=a.memory, epochs=a.epochs,
        batch_size=a.batch_size, lr=a.lr,
        loss=a.loss, inpaint=a.inpaint, crop=a.crop, schedule=a.schedule, ema=a.ema,
        map=a.map, smooth=a.smooth, standardize=a.standardize, ignore_margin=a.ignore_margin,
        fpr=a.fpr)
    run = train_detector(
        a.data, a.out, size=o["size"], resize=o["resize"], model=o["model"],
        train={**o["train"], "augment": True, "seed": a.seed},
        score={**o["score"], "reduce": "max"}, threshold_method=a.threshold,
        threshold_fpr=o["threshold_fpr"], split_seed=a.seed, progress=progress,
    )
    cpu_total = time.process_time() - c0
    m = run.metrics
    rows = threshold_table(run, run.load_data())
    summary = {"command": cmd, "label": a.label or os.path.basename(a.out), "metrics": m,
               "thresholds": rows, "cpu_seconds_total": round(cpu_total, 1),
               "threads": torch.get_num_threads()}

    def text() -> str:
        f = lambda v: "–" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
        out = [f"command: {cmd}", "",
               "| config | image AUROC | pixel AUROC | AUPRO | deployed F1 / acc | oracle F1 / acc "
               "| test FPR | train s (wall) | infer ms/img | params |",
               "|---|---|---|---|---|---|---|---|---|---|",
               f"| {summary['label']} | {f(m['image_auroc'])} | {f(m['pixel_auroc'])} | "
               f"{f(m['aupro'])} | {f(m['f1'])} / {f(m['accuracy'])} | {f(m['oracle_f1'])} / "
               f"{f(m['oracle_accuracy'])} | {f(m['fpr'])} | {m['train_seconds']:.0f} | "
               f"{m['infer_ms_per_image']:.1f} | {m['n_parameters']:,} |", "",
               "| threshold rule (normal val scores only) | n val | F1 | accuracy | recall | "
               "test FPR | F1 / oracle F1 |", "|---|---|---|---|---|---|---|"]
        out += [f"| {r['rule']} | {r['n_val']} | {f(r['f1'])} | {f(r['accuracy'])} | "
                f"{f(r['recall'])} | {f(r['test_fpr'])} | {f(r['f1_vs_oracle'])} |" for r in rows]
        out.append(f"\nthreads={summary['threads']} total wall "
                   f"{time.perf_counter() - t0:.0f}s, CPU {cpu_total:.0f}s")
        return "\n".join(out)

    return emit(summary, a.save, a.json, text)


if __name__ == "__main__":
    main()
