"""Objectives of one architecture, from training data only: train, then measure detection
(or classification) quality on validation data, RA under each exposure model with its
interval, parameter bits and MACs.

Detection quality is ``image_auroc`` (or ``pixel_auroc`` / ``aupro`` / ``accuracy``) of the
detector on the validation set of :func:`flipguard.nas.data.detection_data` at a threshold
calibrated on the calibration images; classification quality is validation top-1 accuracy.
RA is the accuracy given a single-bit flip at a site drawn from the exposure model
(:func:`flipguard.ra.resiliency_accuracy`: image-level decisions at the same threshold, or
top-1), on ``ra_images`` evenly spaced validation inputs, with a confidence-sequence interval
at ``confidence``; estimation stops at ``target_margin`` or ``max_samples``. Every exposure
model of one network shares one injection cache (``ra.sqlite``), so a site is injected once.

>>> s = Settings(hardware=("systolic", "uniform"))
>>> s.ra_config("uniform", Fidelity(epochs=1)).hardware
'uniform'
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flipguard.detect import ScoreConfig, Scorer, evaluate_detector, fit_map_stats, reconstruct
from flipguard.errors import ConfigError
from flipguard.fileio import save_torch
from flipguard.fingerprint import state_fingerprint, tensor_fingerprint
from flipguard.inject import ClassificationTask, DetectionTask, Engine
from flipguard.layers import evenly_spaced
from flipguard.nas.cost import count_macs, count_parameters, memory_bits
from flipguard.nas.data import SearchData
from flipguard.ra import (
    PROPOSALS,
    AdaptiveProposal,
    RAConfig,
    RAStore,
    register_proposal,
    resiliency_accuracy,
)
from flipguard.threshold import THRESHOLD_METHODS, calibrate_threshold
from flipguard.train import TrainConfig, train_model

__all__ = ["Fidelity", "Settings", "evaluate_network", "OBJECTIVES", "DIRECTIONS",
           "QUALITY_METRICS", "calibrated_detector", "objective_values", "synthetic_threshold",
           "train_classifier"]

OBJECTIVES = ("quality", "ra", "drop", "memory", "macs")
DIRECTIONS = {"quality": "maximize", "ra": "maximize", "drop": "minimize", "memory": "minimize",
              "macs": "minimize"}
QUALITY_METRICS = ("image_auroc", "pixel_auroc", "aupro", "accuracy")
RA_KEEP = ("ra", "ci", "half_width", "target_margin", "confidence", "accuracy_drop",
           "accuracy_drop_ci", "golden_accuracy", "samples", "injections", "ess", "stopped",
           "estimator", "interval", "proposal", "alpha", "exposure_share", "n_images")


def _register_proposal() -> None:
    """``adaptive-bitfield``: the adaptive proposal started from the free bit-field
    heuristic (no criticality predictor: cheap enough for every trial)."""

    if "adaptive-bitfield" not in PROPOSALS:
        register_proposal("adaptive-bitfield", lambda **kw: AdaptiveProposal(start="bitfield"))


@dataclass(frozen=True)
class Fidelity:
    """Training epochs and RA budget of one evaluation (screen: few epochs, a fixed small
    sample budget; front: full training, the target margin)."""

    epochs: int
    ra_margin: float = 0.02
    ra_max_samples: int = 256
    ra_min_samples: int = 64


@dataclass
class Settings:
    """Everything but the architecture and fidelity that decides an evaluation."""

    hardware: tuple[str, ...] = ("systolic", "uniform")
    fmt: str = "fp32"
    targets: tuple[str, ...] = ("weight", "activation")
    ra_images: int = 64
    confidence: float = 0.95
    estimator: str = "is"
    proposal: str = "adaptive-bitfield"
    alpha: float = 0.2
    batch: int = 64
    quality: str = "image_auroc"
    seed: int = 0
    train: dict[str, Any] = field(default_factory=lambda: {"lr": 1e-3, "batch_size": 32,
                                                           "loss": "l2+ssim"})
    score: dict[str, Any] = field(default_factory=lambda: {"map": "ssim", "standardize": True})
    threshold: dict[str, Any] = field(default_factory=lambda: {"method": "synthetic"})

    def validate(self) -> None:
        if self.quality not in QUALITY_METRICS:
            raise ConfigError(f"--quality: expected one of {', '.join(QUALITY_METRICS)}, got "
                              f"{self.quality!r}")
        if not self.hardware:
            raise ConfigError("--hardware: expected at least one exposure model")

        method = self.threshold.get("method", "synthetic")
        if method not in ("synthetic", *THRESHOLD_METHODS):
            raise ConfigError(f"--threshold: expected synthetic or one of "
                              f"{', '.join(THRESHOLD_METHODS)}, got {method!r}")
        if self.ra_images < 2:
            raise ConfigError(f"--ra-images: expected at least 2, got {self.ra_images}")
        self.ra_config(self.hardware[0], Fidelity(1)).validate()

    def ra_config(self, hardware: str, fid: Fidelity) -> Any:

        _register_proposal()
        return RAConfig(hardware=hardware, estimator=self.estimator, proposal=self.proposal,
                        alpha=self.alpha, target_margin=fid.ra_margin,
                        confidence=self.confidence, max_samples=fid.ra_max_samples,
                        min_samples=min(fid.ra_min_samples, fid.ra_max_samples),
                        batch=self.batch, seed=self.seed, targets=tuple(self.targets),
                        fmt=self.fmt)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hardware"], d["targets"] = list(self.hardware), list(self.targets)
        return d


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int,
                     seed: int = 0, lr: float = 3e-3, batch_size: int = 64) -> list[float]:
    """Adam + cross-entropy, shuffled by a seeded generator (global RNG untouched)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(int(seed))
    losses = []
    model.train()
    for _ in range(int(epochs)):
        order, total = torch.randperm(x.shape[0], generator=gen), 0.0
        for i in range(0, len(order), batch_size):
            b = order[i:i + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x[b]), y[b])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(b)
        losses.append(total / max(1, x.shape[0]))
    model.eval()
    return losses


def _train(model: nn.Module, space: Any, data: SearchData, s: Settings, epochs: int) -> None:
    custom = getattr(space, "train", None)
    if callable(custom):
        custom(model, data, epochs, s.seed)
    elif data.task == "detection":

        cfg = {"lr": 1e-3, "batch_size": 32, "loss": "l2+ssim", **s.train}
        train_model(model, data.train, TrainConfig(epochs=epochs, seed=s.seed, **cfg))
    else:
        assert data.train_labels is not None
        train_classifier(model, data.train, data.train_labels, epochs, s.seed)
    model.eval()


def synthetic_threshold(normal: np.ndarray, defective: np.ndarray) -> float:
    """The threshold (``score > t`` => anomalous) with the highest accuracy on normal and
    defective calibration scores, halfway to the next score (ties: the lowest such
    threshold; non-finite scores count as anomalous).

    >>> synthetic_threshold(np.array([0.1, 0.2, 0.5]), np.array([0.4, 0.6]))
    0.3
    """
    s = np.r_[normal, defective].astype(np.float64)
    y = np.r_[np.zeros(len(normal), bool), np.ones(len(defective), bool)]
    fin = np.isfinite(s)
    cand = np.unique(s[fin])
    if cand.size == 0:
        raise ConfigError("threshold: calibration scores are not finite (training diverged)")
    cand = np.r_[cand[0] - 1.0, cand]
    pred = (s[None, :] > cand[:, None]) | ~fin[None, :]
    acc = (pred == y[None, :]).mean(axis=1)
    i = int(np.flatnonzero(acc == acc.max())[0])
    nxt = cand[i + 1] if i + 1 < cand.size else cand[i] + 1.0
    return float(round((cand[i] + nxt) / 2, 12))


def calibrated_detector(model: nn.Module, data: SearchData, s: Settings
                        ) -> tuple[Any, float, dict[str, Any]]:
    """``(scorer, threshold, validation metrics)``. The scorer's maps are standardised per
    position with the statistics of the training images' maps (``score["standardize"]``,
    default on: textures such as Magnetic-Tile's vary by position). The threshold comes
    from the calibration
    images: ``method="synthetic"`` (default) the accuracy-optimal one on the normal
    calibration images and their synthetic-defect copies (:func:`synthetic_threshold`),
    otherwise :func:`flipguard.threshold.calibrate_threshold` on the normal ones only (e.g.
    ``{"method": "tail", "fpr": 0.05}``, the deployment rule of ``flipguard train``). The
    metrics are those of the validation set."""

    side = int(data.train.shape[-1])
    score = {"smooth_sigma": round(4.0 * side / 128, 3), **s.score}
    scfg = ScoreConfig(**{k: v for k, v in score.items() if k != "standardize"})
    if score.get("standardize"):  # per-position statistics of the normal training maps
        scfg = fit_map_stats(scfg, model, data.train)
    scorer = Scorer(scfg)
    assert data.calib is not None
    cal = scorer.scores(data.calib, reconstruct(model, data.calib)).numpy()
    th = dict(s.threshold)
    if th.get("method", "synthetic") == "synthetic":
        assert data.calib_bad is not None
        bad = scorer.scores(data.calib_bad, reconstruct(model, data.calib_bad)).numpy()
        thr = synthetic_threshold(cal, bad)
    else:
        thr = float(calibrate_threshold(cal, **th))
    if not np.isfinite(thr):
        raise ConfigError("threshold: calibration scores are not finite (training diverged)")
    m = evaluate_detector(model, scorer, thr, data.val, data.val_labels, data.val_masks)
    keep = ("image_auroc", "pixel_auroc", "aupro", "accuracy", "f1", "fpr", "threshold")
    return scorer, thr, {k: m.get(k) for k in keep}


def _engine(model: nn.Module, data: SearchData, s: Settings, scorer: Any, thr: float):

    if data.task == "detection":  # balanced: evenly spaced normals and defective copies
        half = data.val.shape[0] // 2
        k = max(1, s.ra_images // 2)
        idx = np.r_[evenly_spaced(half, k), half + evenly_spaced(half, k)]
    else:
        idx = evenly_spaced(data.val.shape[0], s.ra_images)
    x, y = data.val[torch.as_tensor(idx)], data.val_labels[idx]
    task = (DetectionTask(scorer.scores, thr, y, input_side=scorer.input_side)
            if data.task == "detection"
            else ClassificationTask(torch.as_tensor(y)))
    eng = Engine(model, x, task, fmt=s.fmt)
    fps = {"data": tensor_fingerprint(x, y)[:16],
           "task": json.dumps({"thr": thr, "fmt": s.fmt, "task": data.task}, sort_keys=True)}
    return eng, fps


def evaluate_network(model: nn.Module, space: Any, data: SearchData, s: Settings,
                     fid: Fidelity, workdir: str | Path, *, trained: bool = False,
                     hardware: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Train ``model`` (unless ``trained``), finalise it, and measure every objective on the
    validation data; saves ``workdir/model.pt`` and the RA injections in
    ``workdir/ra.sqlite``. Returns ``{quality, metrics, memory_bits, macs, parameters,
    ra: {hardware: result}, seconds}``."""

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not trained:
        _train(model, space, data, s, fid.epochs)
        space.finalise(model, data.train)
        save_torch(model.state_dict(), work / "model.pt")
    t_train = time.perf_counter() - t0
    model.eval()
    if data.task == "detection":
        scorer, thr, metrics = calibrated_detector(model, data, s)
        quality = metrics.get(s.quality)
    else:
        scorer, thr = None, 0.0
        with torch.no_grad():
            pred = model(data.val).argmax(1).numpy()
        metrics = {"accuracy": float((pred == data.val_labels).mean())}
        quality = metrics["accuracy"]
    if quality is None or not np.isfinite(quality):
        raise ConfigError(f"--quality: {s.quality} is undefined on this validation set")
    eng, fps = _engine(model, data, s, scorer, thr)
    fps["model"] = state_fingerprint(model.state_dict())
    # a freshly trained network never reuses injections recorded for another one
    store = RAStore(work / "ra.sqlite", fps, fresh=not trained)
    ra: dict[str, Any] = {}
    t1 = time.perf_counter()
    try:
        for hw in hardware if hardware is not None else s.hardware:
            res = resiliency_accuracy(eng, s.ra_config(hw, fid), store)
            ra[hw] = {k: res.get(k) for k in RA_KEEP}
    finally:
        store.close()
    return {"quality": float(quality), "metrics": metrics,
            "memory_bits": memory_bits(model, s.fmt), "macs": count_macs(model, data.val),
            "parameters": count_parameters(model), "ra": ra,
            "seconds": {"train": round(t_train, 2),
                        "ra": round(time.perf_counter() - t1, 2),
                        "total": round(time.perf_counter() - t0, 2)}}


def objective_values(result: dict[str, Any], objectives: tuple[str, ...],
                     hardware: str) -> list[float]:
    """The objective vector of a result (RA under ``hardware``)."""
    out = []
    for o in objectives:
        if o == "quality":
            out.append(float(result["quality"]))
        elif o == "ra":
            out.append(float(result["ra"][hardware]["ra"]))
        elif o == "drop":
            out.append(float(result["ra"][hardware]["accuracy_drop"]))
        elif o == "memory":
            out.append(float(result["memory_bits"]))
        elif o == "macs":
            out.append(float(result["macs"]))
        else:
            raise ConfigError(f"--objectives: unknown objective {o!r}")
    return out
