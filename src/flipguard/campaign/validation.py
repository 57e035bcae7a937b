"""Statistical fault injection checked against exhaustive injection.

Given the class of *every* fault of a population (an exhaustive campaign), the true CFR of
the population and of each bit is known exactly, and SFI samples of any plan can be drawn
from it at no simulation cost: a sample of ``n`` faults without replacement has a
hypergeometric number of critical faults, so ``replications`` samples cost one vectorised
draw. For each margin ``e`` this gives the planned sample sizes (Leveugle et al.), one
seeded SFI estimate with its interval, and the empirical coverage of the intervals over the
replications — for the layer-wise design (one stratum) and for the layer × bit design (one
stratum per bit, combined by :func:`~flipguard.campaign.stats.stratified`).

>>> crit = np.zeros(4096, bool); crit[:41] = True
>>> bits = np.tile(np.arange(32), 128)
>>> rows = validate_sfi(crit, bits, margins=(0.05,), confidence=0.95, replications=400)
>>> r = rows[0]
>>> r.scope, r.N, r.n, round(r.cfr, 4)
('layer', 4096, 352, 0.01)
>>> 0.9 <= r.coverage <= 1.0
True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from flipguard.campaign.stats import DEFAULT_METHOD, interval, leveugle_n, stratified
from flipguard.errors import ConfigError

__all__ = ["ValidationRow", "validate_sfi"]


@dataclass(frozen=True)
class ValidationRow:
    """One design at one margin: the exhaustive truth, one SFI draw and the coverage.

    ``scope``: ``"layer"`` (one stratum), ``"layer×bit"`` (per-bit strata combined) or
    ``"bit"`` (one bit's stratum, ``key`` = the bit). ``estimate``/``ci``: the first seeded
    SFI sample; ``coverage`` ± ``coverage_se`` over ``replications`` samples;
    ``mean_width``: mean interval width.
    """

    scope: str
    key: str
    margin: float
    confidence: float
    N: int
    n: int
    cfr: float
    estimate: float
    ci: tuple[float, float]
    coverage: float
    coverage_se: float
    mean_width: float
    replications: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ci"] = list(self.ci)
        return d


def _intervals(k: np.ndarray, n: int, N: int, confidence: float, method: str
               ) -> tuple[np.ndarray, np.ndarray]:
    """Interval of every count in ``k`` (computed once per distinct count)."""
    lo, hi = np.empty(k.size), np.empty(k.size)
    for v in np.unique(k):
        a, b = interval(int(v), n, confidence, method, N=N)
        lo[k == v], hi[k == v] = a, b
    return lo, hi


def _row(scope: str, key: str, e: float, conf: float, N: int, n: int, p: float,
         est: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> ValidationRow:
    hit = (lo <= p + 1e-12) & (p - 1e-12 <= hi)
    cov = float(hit.mean())
    return ValidationRow(scope, key, e, conf, N, n, p, float(est[0]),
                         (float(lo[0]), float(hi[0])), cov,
                         float(np.sqrt(max(cov * (1 - cov), 1e-12) / hit.size)),
                         float((hi - lo).mean()), int(hit.size))


def validate_sfi(critical: np.ndarray, bits: np.ndarray | None = None, *,
                 margins: Sequence[float] = (0.01, 0.02, 0.05), confidence: float = 0.95,
                 replications: int = 2000, seed: int = 0, method: str = DEFAULT_METHOD,
                 p: float = 0.5) -> list[ValidationRow]:
    """SFI against the exhaustive classes ``critical[i]`` (one per fault of the population)
    with the bit of each fault in ``bits`` (None: layer-wise design only). Rows per margin:
    the layer-wise design, then (with ``bits``) the layer × bit design's combined estimate
    and one row per bit."""
    crit = np.asarray(critical, dtype=bool).reshape(-1)
    N = int(crit.size)
    if N < 2:
        raise ConfigError("validate: expected an exhaustive population of at least 2 faults")
    if replications < 1:
        raise ConfigError(f"--replications: expected >= 1, got {replications}")
    rng = np.random.default_rng(seed)
    K = int(crit.sum())
    rows: list[ValidationRow] = []
    groups: list[tuple[int, int, int]] = []
    if bits is not None:
        b = np.asarray(bits).reshape(-1)
        if b.size != N:
            raise ConfigError(f"validate: expected one bit per fault ({N}), got {b.size}")
        groups = [(int(v), int((b == v).sum()), int(crit[b == v].sum())) for v in np.unique(b)]
    for e in margins:
        n = leveugle_n(N, e, confidence, p)
        k = rng.hypergeometric(K, N - K, n, size=replications) if 0 < n < N else \
            np.full(replications, K if n >= N else 0)
        lo, hi = _intervals(k, n, N, confidence, method)
        rows.append(_row("layer", "all", e, confidence, N, n, K / N, k / max(n, 1), lo, hi))
        if not groups:
            continue
        sizes = [leveugle_n(Nb, e, confidence, p) for _, Nb, _ in groups]
        ks = np.stack([rng.hypergeometric(Kb, Nb - Kb, nb, size=replications)
                       if 0 < nb < Nb else np.full(replications, Kb if nb >= Nb else 0)
                       for (_, Nb, Kb), nb in zip(groups, sizes, strict=True)])
        ests = [stratified([(Nb, nb, int(kk)) for (_, Nb, _), nb, kk in
                            zip(groups, sizes, ks[:, r], strict=True)], confidence, method)
                for r in range(replications)]
        rows.append(_row("layer×bit", "all", e, confidence, N, sum(sizes), K / N,
                         np.array([x.p for x in ests]), np.array([x.ci[0] for x in ests]),
                         np.array([x.ci[1] for x in ests])))
        for j, ((bit, Nb, Kb), nb) in enumerate(zip(groups, sizes, strict=True)):
            blo, bhi = _intervals(ks[j], nb, Nb, confidence, method)
            rows.append(_row("bit", str(bit), e, confidence, Nb, nb, Kb / Nb,
                             ks[j] / max(nb, 1), blo, bhi))
    return rows
