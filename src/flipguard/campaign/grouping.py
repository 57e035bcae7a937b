"""Groups of predicted criticality classes that share one sub-stratum.

Splitting a stratum by predicted class pays when the classes' critical rates differ; classes
whose rates are all (near) zero cost *more* apart than together, because each sub-stratum
must bound its own unseen rate (with 0 critical of ``n`` the 99 % upper bound is ≈ 5.3 / n):
three equal zero-rate classes need ≈ √3× the faults of their union. A grouping is a
partition of the ordered classes into contiguous runs, fixed before anything is drawn (it is
part of the plan, so the same seed gives the same faults); each group is sampled as one
sub-stratum keyed by its lowest class. :func:`choose_groups` picks the grouping with the
smallest predicted campaign from class rates (calibrated on earlier campaigns of the run).

>>> parse_groups("0-2,3,4")
((0, 1, 2), (3,), (4,))
>>> groups_text(((0, 1, 2), (3,), (4,)))
'0-2,3,4'
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np

from flipguard.campaign.substrata import CLASS_LABELS, allocate
from flipguard.errors import ConfigError

__all__ = ["Groups", "choose_groups", "group_label", "group_map", "groups_text",
           "parse_groups", "partitions"]

Groups = tuple[tuple[int, ...], ...]
N_CLASSES = len(CLASS_LABELS)


def parse_groups(text: str, n_classes: int = N_CLASSES) -> Groups:
    """Groups from ``"0-2,3,4"`` (ranges and single classes, contiguous, covering every class
    ``0 .. n_classes - 1`` once, in order).

    >>> parse_groups("0,1-4")
    ((0,), (1, 2, 3, 4))
    """
    groups: list[tuple[int, ...]] = []
    try:
        for part in str(text).split(","):
            a, _, b = part.strip().partition("-")
            lo, hi = int(a), int(b) if b else int(a)
            groups.append(tuple(range(lo, hi + 1)))
    except ValueError:
        groups = []
    flat = [h for g in groups for h in g]
    if not groups or any(not g for g in groups) or flat != list(range(n_classes)):
        raise ConfigError(f"class-groups: expected contiguous ranges covering the classes "
                          f"0..{n_classes - 1} in order, e.g. '0-2,3,4' (got {text!r})")
    return tuple(groups)


def groups_text(groups: Groups) -> str:
    """Canonical text of ``groups`` (:func:`parse_groups` inverts it)."""
    return ",".join(str(g[0]) if len(g) == 1 else f"{g[0]}-{g[-1]}" for g in groups)


def group_map(groups: Groups) -> np.ndarray:
    """``map[class]`` = the lowest class of its group (the sub-stratum's class).

    >>> group_map(((0, 1, 2), (3,), (4,))).tolist()
    [0, 0, 0, 3, 4]
    """
    out = np.zeros(sum(len(g) for g in groups), dtype=np.uint8)
    for g in groups:
        out[list(g)] = g[0]
    return out


def group_label(h: int, groups: Groups | None, labels: Sequence[str] = CLASS_LABELS) -> str:
    """Label of the sub-stratum of class ``h`` (``"harmless+low+borderline"`` when merged).

    >>> group_label(0, ((0, 1), (2,), (3,), (4,)))
    'harmless+low'
    """
    for g in groups or ():
        if g[0] == h:
            return "+".join(labels[i] for i in g)
    return labels[h]


def partitions(n_classes: int = N_CLASSES) -> list[Groups]:
    """Every partition of ``0 .. n_classes - 1`` into contiguous runs, finest first.

    >>> len(partitions(5)), partitions(2)
    (16, [((0,), (1,)), ((0, 1),)])
    """
    out: list[Groups] = []
    for cuts in itertools.product((True, False), repeat=n_classes - 1):
        groups, cur = [], [0]
        for h, cut in zip(range(1, n_classes), cuts, strict=True):
            if cut:
                groups.append(tuple(cur))
                cur = []
            cur.append(h)
        groups.append(tuple(cur))
        out.append(tuple(groups))
    return sorted(out, key=len, reverse=True)


def choose_groups(sizes: Sequence[Mapping[int, int]], rates: Mapping[int, float],
                  error: float, confidence: float, audit: int = 30
                  ) -> tuple[Groups, dict[str, int]]:
    """The grouping with the smallest predicted campaign and every candidate's prediction.

    ``sizes``: per planned stratum, the number of faults of each predicted class; ``rates``:
    the critical rate to plan with per class. A group's rate is its classes' size-weighted
    mean; the prediction per stratum is its audit plus :func:`allocate`'s allocation at
    ``error`` / ``confidence``. Ties keep the finer grouping.

    >>> sizes = [{0: 600_000, 1: 200_000, 2: 100_000, 3: 50_000, 4: 50_000}]
    >>> best, _ = choose_groups(sizes, {0: 1e-4, 1: 1e-4, 2: 1e-4, 3: 0.06, 4: 0.99},
    ...                         0.01, 0.99)
    >>> groups_text(best)
    '0-2,3,4'
    """
    n_classes = max([N_CLASSES, *(h + 1 for s in sizes for h in s)])
    table: dict[str, int] = {}
    best: tuple[int, Groups] | None = None
    for groups in partitions(n_classes):
        total = 0
        for s in sizes:
            N = [sum(int(s.get(h, 0)) for h in g) for g in groups]
            p = [sum(int(s.get(h, 0)) * float(rates.get(h, 0.5)) for h in g) / n if n else 0.0
                 for g, n in zip(groups, N, strict=True)]
            keep = [i for i, n in enumerate(N) if n > 0]
            N, p = [N[i] for i in keep], [p[i] for i in keep]
            n0 = [min(n, audit) for n in N]
            more = allocate(N, p, error, confidence, audit, None, n0)
            total += int(sum(n0) + more.sum())
        table[groups_text(groups)] = total
        if best is None or total < best[0]:
            best = (total, groups)
    assert best is not None
    return best[1], table
