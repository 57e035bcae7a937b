"""What a model's outputs mean: an anomaly detector (scores + threshold) or a classifier.

A task turns a chunk of model outputs into one *fact* per image (a detector's score, a
classifier's top-1 class), summarises the golden facts (:class:`~flipguard.inject.Golden`)
and the raw facts of a faulty run (:class:`~flipguard.inject.Outcome`).

>>> import torch
>>> task = ClassificationTask([0, 1])
>>> task.image_facts(torch.zeros(2, 1), torch.tensor([[2.0, 1.0], [0.0, 3.0]])).tolist()
[0, 1]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flipguard.errors import ConfigError
from flipguard.inject.outcomes import Golden, Outcome, decisions
from flipguard.metrics import MetricError, image_auroc, threshold_metrics

__all__ = ["Task", "DetectionTask", "ClassificationTask", "ToleranceTask"]

ScoreFn = Callable[[Tensor, Tensor], Tensor]


def _labels(labels: Sequence[int] | np.ndarray | Tensor) -> np.ndarray:
    if isinstance(labels, Tensor):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise ConfigError(f"labels: expected a 1-D array of integer labels, got dtype "
                          f"{arr.dtype} and shape {arr.shape}")
    return arr.astype(np.int64)


class Task:
    """Base class of :class:`DetectionTask` and :class:`ClassificationTask`."""

    kind = ""
    labels: np.ndarray
    fact_dtype: Any = np.float64
    needs_golden_outputs = False
    """True: ``image_facts(inputs, outputs, golden_outputs)`` also gets each image's golden
    output (the engine passes it; in the golden run the outputs themselves)."""

    def input_side(self, inputs: Tensor) -> Any:
        """Terms of the facts that depend on the inputs alone, computed once per engine and
        passed back as ``image_facts(..., side=side.take(rows))``; None (the default): none."""
        return None

    def check(self, n_images: int) -> None:
        """Raise a one-line error unless there is one label per image."""
        if self.labels.shape[0] != n_images:
            raise ConfigError(f"labels: expected one label per input ({n_images}), "
                              f"got {self.labels.shape[0]}")

    def image_facts(self, inputs: Tensor, outputs: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def golden(self, facts: np.ndarray, nonfinite: bool) -> Golden:  # pragma: no cover
        raise NotImplementedError

    def outcome_fields(self, facts: np.ndarray, golden: Golden) -> dict[str, Any]:
        raise NotImplementedError  # pragma: no cover


class DetectionTask(Task):
    """Anomaly detection: ``score_fn(inputs_chunk, outputs_chunk) -> scores`` (one per image,
    higher = more anomalous, e.g. ``run.scorer.scores``), ``score > threshold`` or a
    non-finite score => anomalous, ``labels`` 1 = anomalous. ``score_fn`` must give each
    image's score from that image alone (batch-size invariant), as the Scorer does.
    ``score_interval(inputs, lo, hi) -> (low, high)``: optional sound bounds of the scores
    of all outputs between ``lo`` and ``hi`` (e.g. ``Scorer.score_interval``); faults can
    only be certified with it (:mod:`flipguard.inject.certify`). ``input_side(inputs)``:
    optional, the input-only terms of the scores (e.g. ``Scorer.input_side``), an object
    with ``take(rows)`` whose result ``score_fn`` accepts as ``side=`` — the engine computes
    it once and no faulty run recomputes it.

    >>> task = DetectionTask(lambda x, y: (x - y).abs().flatten(1).amax(1), 0.5, [0, 1])
    >>> task.image_facts(torch.zeros(2, 1, 2, 2), torch.eye(2).expand(2, 1, 2, 2)).tolist()
    [1.0, 1.0]
    """

    kind = "detection"

    def __init__(self, score_fn: ScoreFn, threshold: float,
                 labels: Sequence[int] | np.ndarray | Tensor,
                 score_interval: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
                 | None = None, input_side: Callable[[Tensor], Any] | None = None) -> None:
        if not callable(score_fn):
            raise ConfigError("score_fn: expected a callable (inputs, outputs) -> scores")
        if score_interval is not None and not callable(score_interval):
            raise ConfigError("score_interval: expected a callable (inputs, lo, hi) -> "
                              "(low scores, high scores)")
        self.score_fn, self.threshold, self.labels = score_fn, float(threshold), _labels(labels)
        if input_side is not None and not callable(input_side):
            raise ConfigError("input_side: expected a callable inputs -> input-side terms")
        self.score_interval, self._input_side = score_interval, input_side

    def input_side(self, inputs: Tensor) -> Any:
        return None if self._input_side is None else self._input_side(inputs)

    def image_facts(self, inputs: Tensor, outputs: Tensor, side: Any = None) -> Tensor:
        s = self.score_fn(inputs, outputs) if side is None else \
            self.score_fn(inputs, outputs, side=side)  # type: ignore[call-arg]
        if not isinstance(s, Tensor):
            s = torch.as_tensor(np.asarray(s))
        if s.shape != (outputs.shape[0],):
            raise ConfigError(f"score_fn: expected one score per image ({outputs.shape[0]}), "
                              f"got shape {tuple(s.shape)}")
        return s.to(torch.float64)

    def golden(self, facts: np.ndarray, nonfinite: bool) -> Golden:
        m = self._metrics(facts)
        return Golden(kind=self.kind, n_images=int(facts.shape[0]), accuracy=m["accuracy"],
                      f1=m["f1"], auroc=m["auroc"], threshold=self.threshold,
                      n_anomalous=int((self.labels > 0).sum()),
                      nonfinite=bool(nonfinite or not np.isfinite(facts).all()),
                      facts=facts, labels=self.labels)

    def _metrics(self, facts: np.ndarray) -> dict[str, Any]:
        tm = threshold_metrics(self.labels, facts, self.threshold)
        try:
            auroc: float | None = image_auroc(self.labels, facts)
        except MetricError:
            auroc = None
        return {"accuracy": tm["accuracy"], "f1": tm["f1"], "auroc": auroc}

    def outcome_fields(self, facts: np.ndarray, golden: Golden) -> dict[str, Any]:
        assert golden.facts is not None
        g = golden.facts
        dec_f, dec_g = decisions(facts, self.threshold), decisions(g, self.threshold)
        fin_f, fin_g = np.isfinite(facts), np.isfinite(g)
        became = bool((~fin_f & fin_g).any())
        both = fin_f & fin_g
        dmax = float(np.abs(facts[both] - g[both]).max()) if both.any() else 0.0
        return {
            "nonfinite_scores": became,
            "flips_to_anomalous": int((dec_f & ~dec_g).sum()),
            "flips_to_normal": int((~dec_f & dec_g).sum()),
            "max_abs_dscore": float("inf") if became else dmax,
            **self._metrics(facts),
        }


class ClassificationTask(Task):
    """Classification: outputs are logits (N, classes); the fact is the top-1 class.

    >>> ClassificationTask([3, 1]).labels.tolist()
    [3, 1]
    """

    kind = "classification"
    fact_dtype = np.int64

    def __init__(self, labels: Sequence[int] | np.ndarray | Tensor) -> None:
        self.labels = _labels(labels)

    def image_facts(self, inputs: Tensor, outputs: Tensor) -> Tensor:
        if outputs.dim() != 2:
            raise ConfigError(f"outputs: expected logits of shape (N, classes), got "
                              f"{tuple(outputs.shape)}")
        return outputs.argmax(dim=1)

    def golden(self, facts: np.ndarray, nonfinite: bool) -> Golden:
        n = int(facts.shape[0])
        acc = float((facts == self.labels).sum() / n) if n else None
        return Golden(kind=self.kind, n_images=n, accuracy=acc, nonfinite=bool(nonfinite),
                      facts=facts, labels=self.labels)

    def outcome_fields(self, facts: np.ndarray, golden: Golden) -> dict[str, Any]:
        n = int(facts.shape[0])
        return {"mismatches": int((facts != golden.facts).sum()),
                "accuracy": float((facts == self.labels).sum() / n) if n else None}


class ToleranceTask(Task):
    """Outputs within a tolerance of golden: image ``i`` is correct while every output
    element satisfies ``|y - y_golden| <= atol + rtol * |y_golden|`` (``atol = rtol = 0``:
    bit-exact outputs). The fact is the worst ratio of deviation to allowance (0 for golden,
    > 1 = wrong, inf for a non-finite output); ``accuracy`` is the share of correct images
    and ``mismatches`` the count of wrong ones — for regressors, autoencoders, any model.

    >>> t = ToleranceTask(2, atol=0.5)
    >>> g = torch.zeros(2, 3)
    >>> t.image_facts(g, torch.tensor([[0.25, 0, 0], [1.5, 0, 0]]), g).tolist()
    [0.5, 3.0]
    """

    kind = "tolerance"
    needs_golden_outputs = True

    def __init__(self, n_images: int, atol: float = 0.0, rtol: float = 0.0) -> None:
        for name, v in (("atol", atol), ("rtol", rtol)):
            if not isinstance(v, (int, float)) or not v >= 0 or not np.isfinite(v):
                raise ConfigError(f"{name}: expected a finite number >= 0, got {v!r}")
        self.atol, self.rtol = float(atol), float(rtol)
        self.labels = np.zeros(int(n_images), dtype=np.int64)

    def image_facts(self, inputs: Tensor, outputs: Tensor,
                    golden_outputs: Tensor | None = None) -> Tensor:
        ref = outputs if golden_outputs is None else golden_outputs
        y, g = outputs.double().flatten(1), ref.double().flatten(1)
        err = (y - g).abs()
        allowed = self.atol + self.rtol * g.abs()
        ratio = torch.where(err <= allowed, torch.where(allowed > 0, err / allowed, 0.0),
                            torch.where(allowed > 0, err / allowed, torch.inf))
        ratio = torch.where(torch.isfinite(y), ratio, torch.inf)
        return ratio.amax(dim=1) if ratio.shape[1] else ratio.new_zeros(ratio.shape[0])

    def golden(self, facts: np.ndarray, nonfinite: bool) -> Golden:
        n = int(facts.shape[0])
        return Golden(kind=self.kind, n_images=n, accuracy=1.0 if n else None,
                      nonfinite=bool(nonfinite), facts=facts, labels=self.labels)

    def outcome_fields(self, facts: np.ndarray, golden: Golden) -> dict[str, Any]:
        n = int(facts.shape[0])
        wrong = int((~(facts <= 1.0)).sum())
        return {"mismatches": wrong, "accuracy": float((n - wrong) / n) if n else None}


def logit_gap(outputs: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per row of logits (N, classes): the top-1 logit and its gap to the runner-up (inf
    with a single class), float64.

    >>> logit_gap(torch.tensor([[2.0, 0.5, 1.0]]))[1].tolist()
    [1.0]
    """
    y = outputs.detach().double().cpu()
    if y.shape[1] < 2:
        return y[:, 0].numpy(), np.full(y.shape[0], np.inf)
    top = y.topk(2, dim=1).values
    return top[:, 0].numpy(), (top[:, 0] - top[:, 1]).numpy()


def fill_masked(golden: Golden, task: Task) -> Outcome:
    """Outcome fields of a fault whose outputs all equal golden (metrics = golden)."""
    assert golden.facts is not None
    return Outcome(**task.outcome_fields(golden.facts, golden))
