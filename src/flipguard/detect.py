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

import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from flipguard.errors import ConfigError
from flipguard.intervals import blur_interval, msgms_interval, square, ssim_interval
from flipguard.metrics import (
    MetricError,
    aupro,
    best_f1_threshold,
    image_auroc,
    pixel_auroc,
    threshold_metrics,
)
from flipguard.models.cae import StrictConfig
from flipguard.ssim import (
    gaussian_blur,
    msgms_input_side,
    msgms_map,
    ssim_input_side,
    ssim_map,
)
from flipguard.threshold import calibrate_threshold

__all__ = [
    "ScoreConfig",
    "Scorer",
    "InputSide",
    "content_box",
    "fill_margin",
    "reconstruct",
    "fit_map_stats",
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

    map: Literal["l2", "ssim", "msgms"] = Field(
        "ssim", description="per-pixel residual: l2, 1 - SSIM, or 1 - multi-scale GMS (RIAD)"
    )
    smooth_sigma: float = Field(4.0, ge=0, description="Gaussian smoothing of the map; 0 = off")
    reduce: Literal["max", "mean"] = Field("max", description="map -> image score")
    batch_size: int = Field(64, ge=1, description="images per chunk when scoring")
    ssim_window: int = Field(11, ge=1, description="odd SSIM Gaussian window size")
    ssim_sigma: float = Field(1.5, gt=0, description="SSIM Gaussian window sigma")
    standardize: bool = Field(
        False, description="standardise maps per position with normal-image statistics "
        "(norm_mean / norm_std, fitted by fit_map_stats on train/good images)"
    )
    ignore_margin: bool = Field(
        False, description="score only each image's content box: leading/trailing rows and "
        "columns that repeat their neighbour exactly (the edge-replicated margin of "
        "resize='fit') get the image's content minimum in the map (max reduce only)",
    )
    norm_mean: list[list[float]] | None = Field(None, description="G x G mean map grid")
    norm_std: list[list[float]] | None = Field(None, description="G x G std map grid (floored)")

    @field_validator("ignore_margin")
    @classmethod
    def _margin_needs_max(cls, v: bool, info: ValidationInfo) -> bool:
        if v and info.data.get("reduce") != "max":
            raise ValueError("expected reduce='max' with ignore_margin")
        return v

    @field_validator("ssim_window")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError("expected an odd window size")
        return v

    @field_validator("norm_mean", "norm_std")
    @classmethod
    def _grid(cls, v: list[list[float]] | None) -> list[list[float]] | None:
        if v is not None and (not v or any(len(row) != len(v[0]) or not row for row in v)):
            raise ValueError("expected a non-empty rectangular grid")
        if v is not None and not np.isfinite(np.asarray(v, dtype=np.float64)).all():
            raise ValueError("expected finite values")
        return v


def _edges(same: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``same`` (N, L): the number of leading and of trailing True values."""
    return same.long().cumprod(1).sum(1), same.flip(1).long().cumprod(1).sum(1)


def content_box(x: torch.Tensor) -> torch.Tensor:
    """Per image of ``x`` (N, C, H, W) the box ``(top, bottom, left, right)`` (exclusive
    ends, int64 (N, 4)) left after removing leading and trailing rows / columns that are
    exact copies of their inner neighbour — the margin that ``resize="fit"`` fills by
    repeating edge pixels. An image with no such rows keeps its full extent; a constant
    image keeps its full extent too (nothing distinguishes margin from content).

    Example:
        >>> x = torch.rand(1, 1, 6, 4); x[0, 0, :2] = x[0, 0, 2]   # two margin rows on top
        >>> content_box(x).tolist()
        [[2, 6, 0, 4]]
    """
    h, w = x.shape[-2:]
    top, bottom = _edges((x[..., 1:, :] == x[..., :-1, :]).all(dim=3).all(dim=1))
    left, right = _edges((x[..., :, 1:] == x[..., :, :-1]).all(dim=2).all(dim=1))
    box = torch.stack([top, h - bottom, left, w - right], dim=1).cpu()
    empty = (box[:, 0] >= box[:, 1]) | (box[:, 2] >= box[:, 3])
    box[empty] = torch.tensor([0, h, 0, w])
    return box


def fill_margin(m: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """``m`` (N, 1, H, W) with every position outside each image's ``box`` set to that
    image's minimum inside it, so the maximum of the map is the maximum over the box.

    Example:
        >>> m = torch.arange(16.).reshape(1, 1, 4, 4)
        >>> fill_margin(m, torch.tensor([[0, 2, 0, 4]]))[0, 0, 2:].tolist()
        [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    """
    h, w = m.shape[-2:]
    yy = torch.arange(h, device=m.device).view(1, h, 1)
    xx = torch.arange(w, device=m.device).view(1, 1, w)
    b = box.to(m.device)
    inside = ((yy >= b[:, 0, None, None]) & (yy < b[:, 1, None, None])
              & (xx >= b[:, 2, None, None]) & (xx < b[:, 3, None, None])).unsqueeze(1)
    low = torch.where(inside, m, torch.full_like(m, float("inf"))).flatten(1).amin(1)
    return torch.where(inside, m, low.view(-1, 1, 1, 1).to(m.dtype))


class InputSide:
    """Per-image input-side terms of a :class:`Scorer`'s maps (rows = images), from
    :meth:`Scorer.input_side`; ``take(rows)`` selects images in any order."""

    def __init__(self, parts: list[torch.Tensor]) -> None:
        self.parts = parts

    def __len__(self) -> int:
        return int(self.parts[0].shape[0]) if self.parts else 0

    def take(self, rows: np.ndarray | torch.Tensor) -> InputSide:
        if not self.parts:  # a map without input-side terms (L2)
            return self
        idx = torch.as_tensor(rows, dtype=torch.long)
        return InputSide([t[idx.to(t.device)] for t in self.parts])


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
        self._stats: dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        c = self.cfg
        if c.standardize and (c.norm_mean is None or c.norm_std is None):
            raise ConfigError("ScoreConfig.standardize: map statistics norm_mean/norm_std are "
                              "missing (fit them with flipguard.detect.fit_map_stats)")
        if c.standardize and np.shape(c.norm_mean) != np.shape(c.norm_std):
            raise ConfigError("ScoreConfig.norm_std: expected the same grid shape as norm_mean")

    def _standardize(self, m: torch.Tensor) -> torch.Tensor:
        """``(map - mean) / std`` with the G x G statistics bilinearly resized to the map."""
        mu, sd = self._standardize_stats(m)
        return (m - mu) / sd

    def _standardize_stats(self, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = m.shape[-2:]
        key = (h, w, str(m.device))
        if key not in self._stats:
            grids = torch.tensor([self.cfg.norm_mean, self.cfg.norm_std], dtype=torch.float32)
            up = F.interpolate(grids[:, None], size=(h, w), mode="bilinear",
                               align_corners=False)
            self._stats[key] = (up[0:1, 0:1].to(m.device), up[1:2, 0:1].to(m.device))
        return self._stats[key]

    def __repr__(self) -> str:
        return f"Scorer({self.cfg!r})"

    def input_side(self, inputs: torch.Tensor) -> InputSide:
        """The parts of every image's map that depend on the input alone (SSIM: local mean
        and second moment; MS-GMS: gradient magnitudes per scale; L2: none; with
        ``ignore_margin`` also the content box), computed once
        so that scoring many reconstructions of the same inputs — a campaign's faults —
        skips them: ``scores(x, r, side=side.take(rows))`` is bit-identical to
        ``scores(x, r)``.

        Example:
            >>> s = Scorer(ScoreConfig(map="msgms"))
            >>> x, r = torch.rand(3, 1, 16, 16), torch.rand(3, 1, 16, 16)
            >>> rows = [2, 0]
            >>> side = s.input_side(x).take(np.array(rows))
            >>> bool(s.scores(x[rows], r[rows], side=side).equal(s.scores(x[rows], r[rows])))
            True
        """
        with torch.no_grad():
            parts = [self._side(inputs[i : i + self.cfg.batch_size].to(torch.float32))
                     for i in range(0, inputs.shape[0], self.cfg.batch_size)]
        return InputSide([torch.cat(t) for t in zip(*parts, strict=True)] if parts else [])

    def _side(self, x: torch.Tensor) -> list[torch.Tensor]:
        box = [content_box(x)] if self.cfg.ignore_margin else []
        if self.cfg.map == "msgms":
            return msgms_input_side(x) + box
        if self.cfg.map == "ssim":
            return list(ssim_input_side(x, self.cfg.ssim_window, self.cfg.ssim_sigma)) + box
        return box

    def _maps(self, x: torch.Tensor, r: torch.Tensor, side: list[torch.Tensor] | None = None
              ) -> torch.Tensor:
        box = None
        if self.cfg.ignore_margin:  # the content box is the last input-side term
            box = content_box(x) if side is None else side[-1]
            side = None if side is None else side[:-1]
        if self.cfg.map == "l2":
            m = (x - r).square().mean(dim=1, keepdim=True)
        elif self.cfg.map == "msgms":
            m = 1.0 - msgms_map(x, r, x_side=side)
        else:
            m = 1.0 - ssim_map(x, r, window_size=self.cfg.ssim_window, sigma=self.cfg.ssim_sigma,
                               x_side=None if side is None else (side[0], side[1]))
        if self.cfg.smooth_sigma > 0:
            m = gaussian_blur(m, self.cfg.smooth_sigma)
        if self.cfg.standardize:
            m = self._standardize(m)
        if box is not None:
            m = fill_margin(m, box)
        return m

    def _chunks(self, inputs: torch.Tensor, recon: torch.Tensor,
                side: InputSide | None = None) -> Any:
        if inputs.shape != recon.shape or inputs.dim() != 4:
            raise ConfigError(f"Scorer: expected inputs and reconstructions of equal (N, C, H, W) "
                              f"shape (got {tuple(inputs.shape)} and {tuple(recon.shape)})")
        if side is not None and side.parts and len(side) != recon.shape[0]:
            raise ConfigError(f"Scorer: expected the input side of {recon.shape[0]} images, "
                              f"got {len(side)}")
        dev = recon.device
        bs = self.cfg.batch_size
        for i in range(0, recon.shape[0], bs):
            x = inputs[i : i + bs].to(dev, torch.float32)
            r = recon[i : i + bs].to(torch.float32)
            part = None if side is None or not side.parts else \
                [t[i : i + bs].to(dev) for t in side.parts]
            yield self._maps(x, r, part)

    def maps(self, inputs: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """Anomaly maps (N, 1, H, W), float32 on ``recon``'s device, higher = more anomalous:
        L2 = squared residual averaged over channels, SSIM = 1 - SSIM map, MSGMS = 1 - the
        multi-scale gradient-magnitude similarity; then smoothed and, with ``standardize``,
        turned into per-position z-scores against normal images."""
        with torch.no_grad():
            parts = list(self._chunks(inputs, recon))
        if not parts:
            return torch.empty(0, 1, *recon.shape[2:], device=recon.device)
        return torch.cat(parts)

    def reduce(self, maps: torch.Tensor) -> torch.Tensor:
        """Image scores (N,) from maps; NaN propagates (``amax``/``mean`` keep NaN)."""
        flat = maps.flatten(1)
        return flat.amax(dim=1) if self.cfg.reduce == "max" else flat.mean(dim=1)

    def score_interval(self, inputs: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image interval ``(low, high)`` holding the score of every reconstruction
        between ``lo`` and ``hi`` (elementwise), in float64 real arithmetic
        (:mod:`flipguard.intervals`); used to certify faults.

        Example:
            >>> s = Scorer(ScoreConfig(map="l2", smooth_sigma=0.0))
            >>> x = torch.zeros(1, 1, 4, 4)
            >>> [round(v.item(), 4) for v in s.score_interval(x, x - 0.1, x + 0.1)]
            [0.0, 0.01]
        """
        c = self.cfg
        x, lo, hi = (t.to(torch.float64) for t in (inputs, lo, hi))
        if c.map == "l2":
            d_lo, d_hi = square(x - hi, x - lo)
            m_lo, m_hi = d_lo.mean(1, keepdim=True), d_hi.mean(1, keepdim=True)
        else:
            fn = msgms_interval if c.map == "msgms" else \
                partial(ssim_interval, window_size=c.ssim_window, sigma=c.ssim_sigma)
            s_lo, s_hi = fn(x, lo, hi)
            m_lo, m_hi = 1.0 - s_hi, 1.0 - s_lo
        if c.smooth_sigma > 0:
            m_lo, m_hi = blur_interval(m_lo, m_hi, c.smooth_sigma)
        if c.standardize:
            mu, sd = (t.to(torch.float64) for t in self._standardize_stats(m_lo))
            m_lo, m_hi = (m_lo - mu) / sd, (m_hi - mu) / sd
        if c.ignore_margin:  # max over the box of a bound is a bound of the max over the box
            box = content_box(inputs)
            m_lo, m_hi = fill_margin(m_lo, box), fill_margin(m_hi, box)
        return self.reduce(m_lo), self.reduce(m_hi)

    def scores(self, inputs: torch.Tensor, recon: torch.Tensor,
               side: InputSide | None = None) -> torch.Tensor:
        """Image anomaly scores (N,), float32 on ``recon``'s device; ``side``: the
        :meth:`input_side` of exactly these ``inputs`` (then not recomputed)."""
        with torch.no_grad():
            parts = [self.reduce(m) for m in self._chunks(inputs, recon, side)]
        if not parts:
            return torch.empty(0, device=recon.device)
        return torch.cat(parts)


def fit_map_stats(
    cfg: ScoreConfig,
    model: nn.Module,
    images: torch.Tensor,
    grid: int = 32,
    floor: float = 0.1,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> ScoreConfig:
    """Per-position statistics of the anomaly maps of *normal* ``images`` reconstructed by
    ``model`` -> a copy of ``cfg`` with ``standardize=True`` and ``norm_mean``/``norm_std``.

    The mean and standard deviation over images are taken per pixel, then averaged down to
    a ``grid`` x ``grid`` grid (at most the map size); the std is floored at ``floor`` times
    its grid mean so flat regions (e.g. padding) cannot blow up small residuals.

    Example:
        >>> cfg = fit_map_stats(ScoreConfig(map="l2"), nn.Identity(), torch.rand(4, 1, 8, 8), 4)
        >>> cfg.standardize, len(cfg.norm_mean), len(cfg.norm_std[0])
        (True, 4, 4)
    """
    if images.shape[0] < 2:
        raise ConfigError(f"fit_map_stats: expected at least 2 normal images "
                          f"(got {images.shape[0]})")
    plain = Scorer(cfg.model_copy(update={"standardize": False, "norm_mean": None,
                                          "norm_std": None, "ignore_margin": False}))
    parts = [plain.maps(x, reconstruct(model, x, batch_size, device)).cpu().double()
             for x in images.split(batch_size)]
    maps = torch.cat(parts)
    h, w = maps.shape[-2:]
    gh, gw = min(grid, h), min(grid, w)
    mean = F.adaptive_avg_pool2d(maps.mean(0, keepdim=True), (gh, gw))[0, 0]
    std = F.adaptive_avg_pool2d(maps.std(0, keepdim=True), (gh, gw))[0, 0]
    std = std.clamp(min=floor * float(std.mean()) + 1e-12)
    return cfg.model_copy(update={
        "standardize": True, "norm_mean": mean.tolist(), "norm_std": std.tolist()})


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
    ``fn`` at ``threshold``, ``fpr`` (share of normal test images flagged), ``threshold``,
    ``n_test``, ``n_anomalous``, ``oracle_f1`` / ``oracle_threshold`` / ``oracle_accuracy``:
    the F1-optimal threshold chosen *on the test labels* (an upper bound, not a deployable
    result), and ``infer_ms_per_image`` (reconstruction + scoring wall time per image).

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
    infer = 0.0
    for i in range(0, n, batch_size):
        x = images[i : i + batch_size]
        t0 = time.perf_counter()
        recon = reconstruct(model, x, batch_size=batch_size, device=device)
        m = scorer.maps(x, recon)
        score_parts.append(scorer.reduce(m))
        infer += time.perf_counter() - t0
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
    n_normal = int((y == 0).sum())
    res.update(
        threshold=float(threshold),
        fpr=res["fp"] / n_normal if n_normal else None,
        n_test=int(n),
        n_anomalous=int((y > 0).sum()),
        oracle_f1=oracle_f1,
        oracle_threshold=oracle_thr,
        oracle_accuracy=threshold_metrics(y, scores, oracle_thr)["accuracy"],
        infer_ms_per_image=round(1000.0 * infer / max(1, n), 3),
    )
    return res


def _maybe(fn: Callable[..., float], *args: Any) -> float | None:
    """Metric value, or None when it is undefined for this data (e.g. a single class)."""
    try:
        return fn(*args)
    except MetricError:
        return None
