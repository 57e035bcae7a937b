"""Decision thresholds from scores of *normal* images only, for a target false-positive rate.

Methods (``calibrate_threshold(scores, method=..., fpr=...)``):

``"auto"`` (default of ``flipguard train``)
    ``"empirical"`` when the validation set expects at least :data:`AUTO_MIN_EXCEEDANCES`
    scores above the target quantile (``(n + 1) * fpr >= 2``: n >= 39 at fpr = 0.05), since
    it is then unbiased for any distribution; ``"tail"`` otherwise (small sets, tiny fpr).
``"tail"``
    A fitted tail model: the upper half of the scores above their median ``u`` is fitted with
    an exponential tail (a generalised Pareto tail with shape 0, the limit for scores in the
    Gumbel max-domain: normal, log-normal, gamma, Gumbel, maxima of smooth anomaly maps), by
    maximum likelihood (scale = mean excess ``b``). With ``m`` excesses out of ``n`` scores,
    ``P(S > u)`` is estimated by the plotting position ``(m + 1) / (n + 1)`` and the threshold
    is ``t = u + b * ln(P(S > u) / fpr)``. It extrapolates beyond the largest score, so it
    works for validation sets far smaller than ``1 / fpr`` (from 4 scores on) and is not
    decided by the single largest score.
``"empirical"``
    Distribution-free: the order statistic at plotting position ``(n + 1)(1 - fpr)``
    (``np.quantile(..., method="weibull")``), whose expected false-positive rate on fresh
    normal images is exactly ``fpr`` at integer positions for *any* continuous score
    distribution; needs ``n >= 1 / fpr - 1`` scores (otherwise a one-line error).
``"quantile"``
    The legacy rule: ``np.quantile(scores, quantile)`` with linear interpolation (its false
    positive rate is ``~ 1 / (n + 1)`` or worse when ``n < 1 / (1 - quantile)``).
``"mean+kstd"``
    ``mean + k * std`` (ddof = 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from flipguard.errors import ConfigError

__all__ = [
    "THRESHOLD_METHODS",
    "ThresholdMethod",
    "calibrate_threshold",
    "check_fpr",
    "check_threshold_args",
    "resolve_auto",
    "score_stats",
]

ThresholdMethod = Literal["auto", "tail", "empirical", "quantile", "mean+kstd"]
THRESHOLD_METHODS: tuple[str, ...] = ("auto", "tail", "empirical", "quantile", "mean+kstd")
MIN_TAIL_SCORES = 4
AUTO_MIN_EXCEEDANCES = 2.0


def check_fpr(fpr: float, name: str = "fpr") -> float:
    """Validate a target false-positive rate (0 < fpr < 1); one-line :class:`ConfigError`.

    Example:
        >>> check_fpr(0.05)
        0.05
    """
    if isinstance(fpr, bool) or not isinstance(fpr, (int, float, np.floating)):
        raise ConfigError(f"{name}: expected a number in (0, 1) (got {fpr!r})")
    if not 0.0 < float(fpr) < 1.0:
        raise ConfigError(f"{name}: expected a false-positive rate in (0, 1) (got {fpr})")
    return float(fpr)


def check_threshold_args(method: str, fpr: float, quantile: float, k: float) -> None:
    """Validate threshold options up front (before any training); one-line ConfigError.

    Example:
        >>> check_threshold_args("quantile", 0.05, 2.0, 3.0)
        Traceback (most recent call last):
        ...
        flipguard.errors.ConfigError: quantile: expected a value in [0, 1] (got 2.0)
    """
    if method not in THRESHOLD_METHODS:
        raise ConfigError(f"threshold method: expected one of {', '.join(THRESHOLD_METHODS)} "
                          f"(got {method!r})")
    if method in ("auto", "tail", "empirical"):
        check_fpr(fpr)
    elif method == "quantile" and not 0.0 <= quantile <= 1.0:
        raise ConfigError(f"quantile: expected a value in [0, 1] (got {quantile})")
    elif method == "mean+kstd" and not np.isfinite(k):
        raise ConfigError(f"k: expected a finite number (got {k})")


def resolve_auto(n: int, fpr: float) -> str:
    """The rule ``method="auto"`` uses for ``n`` validation scores at target ``fpr``.

    Example:
        >>> resolve_auto(66, 0.05), resolve_auto(21, 0.05), resolve_auto(66, 0.01)
        ('empirical', 'tail', 'tail')
    """
    return "empirical" if (n + 1) * fpr >= AUTO_MIN_EXCEEDANCES else "tail"


def score_stats(scores: Sequence[float] | np.ndarray | torch.Tensor) -> dict[str, float]:
    """``n``, ``mean``, ``std``, ``min``, ``max`` of calibration scores (the ``val_stats`` a
    run records beside its threshold).

    >>> score_stats([1.0, 3.0])
    {'n': 2.0, 'mean': 2.0, 'std': 1.0, 'min': 1.0, 'max': 3.0}
    """
    x = np.asarray(scores, dtype=np.float64)
    return {"n": float(x.size), "mean": float(x.mean()), "std": float(x.std()),
            "min": float(x.min()), "max": float(x.max())}


def _as_array(val_scores: Sequence[float] | np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(val_scores, torch.Tensor):
        val_scores = val_scores.detach().cpu().double().numpy()
    s = np.asarray(val_scores, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise ConfigError("val_scores: expected at least one validation score (got none)")
    if not np.isfinite(s).all():
        raise ConfigError(f"val_scores: expected finite scores ({int((~np.isfinite(s)).sum())} "
                          f"of {s.size} are NaN/Inf)")
    return s


def _tail(s: np.ndarray, fpr: float) -> float:
    n = s.size
    if n < MIN_TAIL_SCORES:
        raise ConfigError(f"val_scores: method 'tail' needs at least {MIN_TAIL_SCORES} "
                          f"validation scores (got {n})")
    x = np.sort(s)
    m = n // 2  # excesses: the upper half
    u = x[n - m - 1]
    p_u = (m + 1) / (n + 1)
    if fpr >= p_u:  # the target lies inside the bulk: no extrapolation needed
        return float(np.quantile(x, 1.0 - fpr, method="weibull"))
    scale = float((x[n - m :] - u).mean())
    return float(u + scale * np.log(p_u / fpr))


def _empirical(s: np.ndarray, fpr: float) -> float:
    n = s.size
    if (n + 1) * fpr < 1.0:
        need = int(np.ceil(1.0 / fpr - 1.0 - 1e-9))
        raise ConfigError(f"val_scores: method 'empirical' at fpr={fpr} needs at least {need} "
                          f"validation scores (got {n}); use method 'tail' or a larger fpr")
    return float(np.quantile(s, 1.0 - fpr, method="weibull"))


def calibrate_threshold(
    val_scores: Sequence[float] | np.ndarray | torch.Tensor,
    quantile: float = 0.99,
    method: str = "quantile",
    k: float = 3.0,
    fpr: float = 0.05,
) -> float:
    """Decision threshold (``score > t`` => anomalous) from scores of normal images only.

    ``fpr`` is the target false-positive rate of the ``"auto"``, ``"tail"`` and
    ``"empirical"`` methods;
    ``quantile`` and ``k`` belong to the legacy ``"quantile"`` and ``"mean+kstd"`` methods
    (see the module docstring). Errors are one-line :class:`ConfigError`.

    Example:
        >>> calibrate_threshold([1.0, 2.0, 3.0, 4.0, 5.0], quantile=0.5)
        3.0
        >>> round(calibrate_threshold([1.0, 2.0, 3.0, 4.0, 5.0], method="tail", fpr=0.05), 3)
        6.454
    """
    s = _as_array(val_scores)
    if method == "auto":
        method = resolve_auto(s.size, check_fpr(fpr))
    if method == "tail":
        return _tail(s, check_fpr(fpr))
    if method == "empirical":
        return _empirical(s, check_fpr(fpr))
    if method == "quantile":
        if not 0.0 <= quantile <= 1.0:
            raise ConfigError(f"quantile: expected a value in [0, 1] (got {quantile})")
        return float(np.quantile(s, quantile))
    if method == "mean+kstd":
        if s.size < 2:
            raise ConfigError("val_scores: method 'mean+kstd' needs at least 2 scores")
        return float(s.mean() + k * s.std(ddof=1))
    raise ConfigError(f"method: expected one of {', '.join(THRESHOLD_METHODS)} (got {method!r})")
