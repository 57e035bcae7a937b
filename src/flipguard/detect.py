"""Reconstruction-based anomaly detection: anomaly maps, image scores, threshold, evaluation.

The scorer is a pure, deterministic tensor function of ``(inputs, recon)``: it runs on the
reconstructions' device, gives bit-identical per-image results for any batch size on CPU
(tested; on CUDA results are deterministic for a given batch size), and lets
NaN/Inf from faulty reconstructions propagate into the scores instead of failing. A
non-finite value anywhere in an image makes that image's whole (smoothed or SSIM) map
non-finite, because the Gaussian filters are dense banded matrix products; other images in
the batch are unaffected.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import nn

from flipguard.errors import ConfigError
from flipguard.metrics import (
    MetricError,
    aupro,
    best_f1_threshold,
    image_auroc,
    pixel_auroc,
    threshold_metrics,
)
from flipguard.models.cae import StrictConfig
from flipguard.ssim import gaussian_blur, ssim_map

__all__ = [
    "ScoreConfig",
    "Scorer",
    "reconstruct",
    "calibrate_threshold",
    "evaluate_detector",
]

Progress = Callable[[int, int], None]


class ScoreConfig(StrictConfig):
    """How reconstructions become anomaly maps and image scores.

    Example:
        >>> ScoreConfig(map="l2", smooth_sigma=0, reduce="mean").map
        'l2'
    """

    map: Literal["l2", "ssim"] = Field("ssim", description="per-pixel residual type")
    smooth_sigma: float = Field(4.0, ge=0, description="Gaussian smoothing of the map; 0 = off")
    reduce: Literal["max", "mean"] = Field("max", description="map -> image score")
    batch_size: int = Field(64, ge=1, description="images per chunk when scoring")
    ssim_window: int = Field(11, ge=1, description="odd SSIM Gaussian window size")
    ssim_sigma: float = Field(1.5, gt=0, description="SSIM Gaussian window sigma")

    @field_validator("ssim_window")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError("expected an odd window size")
        return v


class Scorer:
    """Anomaly maps and image scores from inputs and their reconstructions.

    Example:
        >>> scorer = Scorer(ScoreConfig(map="l2", smooth_sigma=0.0, reduce="max"))
        >>> x = torch.zeros(2, 1, 8, 8); r = x.clone(); r[1, 0, 3, 3] = 0.5
        >>> scorer.scores(x, r).tolist()
        [0.0, 0.25]
    """

    def __init__(self, cfg: ScoreConfig | None = None) -> None:
        self.cfg = cfg or ScoreConfig()

    def __repr__(self) -> str:
        return f"Scorer({self.cfg!r})"

    def _maps(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        if self.cfg.map == "l2":
            m = (x - r).square().mean(dim=1, keepdim=True)
        else:
            m = 1.0 - ssim_map(x, r, window_size=self.cfg.ssim_window, sigma=self.cfg.ssim_sigma)
        if self.cfg.smooth_sigma > 0:
            m = gaussian_blur(m, self.cfg.smooth_sigma)
        return m

    def _chunks(self, inputs: torch.Tensor, recon: torch.Tensor) -> Any:
        if inputs.shape != recon.shape or inputs.dim() != 4:
            raise ConfigError(f"Scorer: expected inputs and reconstructions of equal (N, C, H, W) "
                              f"shape (got {tuple(inputs.shape)} and {tuple(recon.shape)})")
        dev = recon.device
        bs = self.cfg.batch_size
        for i in range(0, recon.shape[0], bs):
            x = inputs[i : i + bs].to(dev, torch.float32)
            r = recon[i : i + bs].to(torch.float32)
            yield self._maps(x, r)

    def maps(self, inputs: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """Anomaly maps (N, 1, H, W), float32 on ``recon``'s device, higher = more anomalous:
        L2 = squared residual averaged over channels, SSIM = 1 - SSIM map; then smoothed."""
        with torch.no_grad():
            parts = list(self._chunks(inputs, recon))
        if not parts:
            return torch.empty(0, 1, *recon.shape[2:], device=recon.device)
        return torch.cat(parts)

    def reduce(self, maps: torch.Tensor) -> torch.Tensor:
        """Image scores (N,) from maps; NaN propagates (``amax``/``mean`` keep NaN)."""
        flat = maps.flatten(1)
        return flat.amax(dim=1) if self.cfg.reduce == "max" else flat.mean(dim=1)

    def scores(self, inputs: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """Image anomaly scores (N,), float32 on ``recon``'s device."""
        with torch.no_grad():
            parts = [self.reduce(m) for m in self._chunks(inputs, recon)]
        if not parts:
            return torch.empty(0, device=recon.device)
        return torch.cat(parts)


def reconstruct(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> torch.Tensor:
    """Run ``model`` over ``images`` in batches (inference mode, eval mode during the call);
    returns the reconstructions as a float32 CPU tensor. ``progress(done, total)`` is called
    after each batch. The model is moved to ``device``.

    Example:
        >>> recon = reconstruct(nn.Identity(), torch.rand(5, 1, 8, 8), batch_size=2)
        >>> recon.shape
        torch.Size([5, 1, 8, 8])
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size: expected >= 1 (got {batch_size})")
    model.to(device)
    was_training = model.training
    model.eval()
    outs: list[torch.Tensor] = []
    n = images.shape[0]
    try:
        with torch.inference_mode():
            for i in range(0, n, batch_size):
                out = model(images[i : i + batch_size].to(device))
                outs.append(out.float().cpu())
                if progress is not None:
                    progress(min(i + batch_size, n), n)
    finally:
        model.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0, *images.shape[1:])


def calibrate_threshold(
    val_scores: Sequence[float] | np.ndarray | torch.Tensor,
    quantile: float = 0.99,
    method: Literal["quantile", "mean+kstd"] = "quantile",
    k: float = 3.0,
) -> float:
    """Decision threshold from scores of *normal* validation images only.

    ``"quantile"``: the ``quantile`` of the scores (linear interpolation, ``np.quantile``);
    ``"mean+kstd"``: mean + k * sample standard deviation (ddof=1).

    Example:
        >>> calibrate_threshold([1.0, 2.0, 3.0, 4.0, 5.0], quantile=0.5)
        3.0
    """
    s = np.asarray(
        val_scores.detach().cpu().double() if isinstance(val_scores, torch.Tensor) else val_scores,
        dtype=np.float64,
    ).reshape(-1)
    if s.size == 0:
        raise ConfigError("val_scores: expected at least one validation score (got none)")
    if not np.isfinite(s).all():
        raise ConfigError(f"val_scores: expected finite scores ({int((~np.isfinite(s)).sum())} "
                          f"of {s.size} are NaN/Inf)")
    if method == "quantile":
        if not 0.0 <= quantile <= 1.0:
            raise ConfigError(f"quantile: expected a value in [0, 1] (got {quantile})")
        return float(np.quantile(s, quantile))
    if method == "mean+kstd":
        if s.size < 2:
            raise ConfigError("val_scores: method 'mean+kstd' needs at least 2 scores")
        return float(s.mean() + k * s.std(ddof=1))
    raise ConfigError(f"method: expected 'quantile' or 'mean+kstd' (got {method!r})")


def evaluate_detector(
    model: nn.Module,
    scorer: Scorer,
    threshold: float,
    images: torch.Tensor,
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    masks: torch.Tensor | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    fpr_limit: float = 0.3,
) -> dict[str, Any]:
    """Evaluate a detector on a labelled test set.

    Returns ``image_auroc``, ``pixel_auroc`` and ``aupro`` (None when ``masks`` is None or the
    set lacks a class), ``f1``/``precision``/``recall``/``accuracy`` and ``tp``/``fp``/``tn``/
    ``fn`` at ``threshold``, ``threshold``, ``n_test``, ``n_anomalous``, and ``oracle_f1`` /
    ``oracle_threshold``: the F1-optimal threshold chosen *on the test labels* (an upper
    bound, not a deployable result).

    Example:
        >>> res = evaluate_detector(model, Scorer(), thr, ds.test, ds.test_labels,
        ...                         ds.test_masks)  # doctest: +SKIP
    """
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    if y.shape[0] != images.shape[0]:
        raise ConfigError(f"labels: expected one label per test image "
                          f"({images.shape[0]} images, got {y.shape[0]} labels)")
    if masks is not None and (
        masks.shape[0] != images.shape[0] or masks.shape[2:] != images.shape[2:]
    ):
        raise ConfigError(f"masks: expected shape (N, 1, H, W) matching the images "
                          f"(got {tuple(masks.shape)} for images {tuple(images.shape)})")
    maps_parts: list[torch.Tensor] = []
    score_parts: list[torch.Tensor] = []
    n = images.shape[0]
    for i in range(0, n, batch_size):
        x = images[i : i + batch_size]
        recon = reconstruct(model, x, batch_size=batch_size, device=device)
        m = scorer.maps(x, recon)
        score_parts.append(scorer.reduce(m))
        if masks is not None:
            maps_parts.append(m)
        if progress is not None:
            progress(min(i + batch_size, n), n)
    scores = torch.cat(score_parts).numpy() if score_parts else np.zeros(0)
    res: dict[str, Any] = {"image_auroc": _maybe(image_auroc, y, scores)}
    res["pixel_auroc"] = res["aupro"] = None
    if masks is not None and maps_parts:
        maps = torch.cat(maps_parts).numpy()
        mk = masks.cpu().numpy()
        res["pixel_auroc"] = _maybe(pixel_auroc, mk, maps)
        res["aupro"] = _maybe(lambda a, b: aupro(a, b, fpr_limit=fpr_limit), mk, maps)
    res.update(threshold_metrics(y, scores, threshold))
    oracle_f1, oracle_thr = best_f1_threshold(y, scores)
    res.update(
        threshold=float(threshold),
        n_test=int(n),
        n_anomalous=int((y > 0).sum()),
        oracle_f1=oracle_f1,
        oracle_threshold=oracle_thr,
    )
    return res


def _maybe(fn: Callable[..., float], *args: Any) -> float | None:
    """Metric value, or None when it is undefined for this data (e.g. a single class)."""
    try:
        return fn(*args)
    except MetricError:
        return None
