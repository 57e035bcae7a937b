"""``flipguard ra``: Resiliency Accuracy of a run directory's detector or of a bring-your-own
classifier, with its sample store and result file.

* a run directory: its campaign engine recipe (:class:`~flipguard.study.engines.
  RunEngineFactory`: test images, threshold, scorer), image-level accuracy at the deployed
  threshold; samples and result in the run directory (or ``out``);
* a classifier ``pkg.module:factory`` with optional weights and a tensor file of inputs and
  labels (:func:`flipguard.data.tensors.load_tensor_dataset`), top-1 accuracy; samples and
  result beside the data file (or ``out``).

Samples go to ``ra.sqlite`` (:class:`~flipguard.ra.RAStore`, refused when it was recorded
for another model, data or task), the result to ``ra.json`` (schema ``flipguard.ra/1``,
docs/resiliency-accuracy.md), which keeps one summary per exposure model in ``by_hardware``.

>>> RASource(run="runs/demo").describe()
{'run': 'runs/demo'}
>>> RASource().check()
Traceback (most recent call last):
flipguard.errors.ConfigError: RUN: expected a run directory or --model pkg.module:factory
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flipguard.data.tensors import load_tensor_dataset
from flipguard.errors import ConfigError
from flipguard.fileio import atomic_write, json_clean
from flipguard.fingerprint import state_fingerprint, tensor_fingerprint
from flipguard.inject import ClassificationTask, Engine
from flipguard.layers import evenly_spaced
from flipguard.models import load_model
from flipguard.ra import (
    STORE_FILE,
    Estimate,
    RAConfig,
    RAStore,
    resiliency_accuracy,
    reweighted_accuracy,
)
from flipguard.study.engines import RunEngineFactory

__all__ = ["RESULT_FILE", "SCHEMA", "RARun", "RASource", "engine_for_model", "engine_for_run",
           "estimate_run", "save_result"]

RESULT_FILE = "ra.json"
SCHEMA = "flipguard.ra/1"
SUMMARY_KEYS = ("ra", "ci", "accuracy_drop", "golden_accuracy", "samples", "ess", "estimator",
                "interval", "confidence", "stream", "exposure_share")
"""What ``ra.json`` keeps per exposure model in ``by_hardware``."""

Engined = tuple[Engine, dict[str, str], dict[str, Any]]
"""``(engine, fingerprints, source)``."""


def _images(images: int | None) -> None:
    if images is not None and images < 1:
        raise ConfigError(f"--images: expected a positive count, got {images}")


def engine_for_run(run_dir: str | Path, images: int | None = None, fmt: str = "fp32",
                   data_dir: str | Path | None = None) -> Engined:
    """``(engine, fingerprints, source)`` of a run directory's detector on ``images`` evenly
    spaced test images (the campaign engine of the run: same fingerprints)."""
    _images(images)
    factory = RunEngineFactory(str(run_dir), images=images, fmt=fmt,
                               data_dir=None if data_dir is None else str(data_dir))
    return factory(), factory.fingerprints(), {"run": str(run_dir)}


def engine_for_model(model: str, weights: str | Path | None, data: str | Path | None,
                     images: int | None = None, fmt: str = "fp32") -> Engined:
    """``(engine, fingerprints, source)`` of a classifier factory on a tensor file with
    ``inputs`` and integer ``labels``."""
    if data is None:
        raise ConfigError("--data: required with --model (a .pt file with 'inputs' and "
                          "'labels' tensors)")
    _images(images)
    net = load_model(model, str(weights) if weights is not None else None).eval()
    ds = load_tensor_dataset(data)
    idx = torch.as_tensor(evenly_spaced(ds.inputs.shape[0], images))
    inputs, labels = ds.inputs[idx], torch.as_tensor(ds.labels)[idx]
    fps = {"model": state_fingerprint(net.state_dict()),
           "data": tensor_fingerprint(inputs, labels), "task": f"classification:{fmt}"}
    engine = Engine(net, inputs, ClassificationTask(labels), fmt=fmt)
    return engine, fps, {"model": model, "weights": str(weights) if weights else None,
                         "data": str(data)}


@dataclass(frozen=True)
class RASource:
    """Whose RA: a run directory ``run`` (``data_dir`` overrides its data), or a classifier
    ``model`` with ``weights`` on tensor file ``data``; ``images``: evaluate that many
    inputs, evenly spaced (None: all); ``out``: folder of ``ra.sqlite`` / ``ra.json``."""

    run: str | Path | None = None
    model: str | None = None
    weights: str | Path | None = None
    data: str | Path | None = None
    images: int | None = None
    data_dir: str | Path | None = None
    out: str | Path | None = None

    def check(self) -> None:
        """One line when neither or both of a run and a model are given."""
        if self.run is None and self.model is None:
            raise ConfigError("RUN: expected a run directory or --model pkg.module:factory")
        if self.run is not None and self.model is not None:
            raise ConfigError("RUN: give a run directory or --model pkg.module:factory, not "
                              "both")

    def describe(self) -> dict[str, Any]:
        """The ``source`` field of ``ra.json``."""
        if self.run is not None:
            return {"run": str(self.run)}
        return {"model": self.model, "weights": str(self.weights) if self.weights else None,
                "data": str(self.data)}

    def out_dir(self) -> Path:
        if self.out is not None:
            return Path(self.out)
        if self.run is not None:
            return Path(self.run)
        return Path(self.data).parent if self.data is not None else Path(".")

    def engine(self, fmt: str) -> Engined:
        self.check()
        if self.run is not None:
            return engine_for_run(self.run, self.images, fmt, self.data_dir)
        assert self.model is not None
        return engine_for_model(self.model, self.weights, self.data, self.images, fmt)


@dataclass
class RARun:
    """One ``flipguard ra`` result: the ``ra.json`` fields of this estimation (``result``,
    with ``source`` and ``fingerprints``) and where they were written."""

    result: dict[str, Any]
    path: Path

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, **self.result}


def save_result(out_dir: str | Path, result: dict[str, Any]) -> Path:
    """Write ``OUT/ra.json``: ``result`` plus ``by_hardware`` (the summaries of earlier
    results of the same model/data/task under other exposure models are kept)."""
    path = Path(out_dir) / RESULT_FILE
    by_hw: dict[str, Any] = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            if old.get("fingerprints") == result.get("fingerprints"):
                by_hw = dict(old.get("by_hardware") or {})
        except (OSError, json.JSONDecodeError, AttributeError):
            by_hw = {}
    by_hw[result["hardware"]] = {k: result.get(k) for k in SUMMARY_KEYS}
    doc = {"schema": SCHEMA, **result, "by_hardware": by_hw}
    atomic_write(path, json.dumps(json_clean(doc), indent=2) + "\n")
    return path


def estimate_run(source: RASource, cfg: RAConfig, *, reweight_from: str | None = None,
                 fresh: bool = False, progress: Callable[[Estimate], None] | None = None
                 ) -> RARun:
    """Estimate (or resume, or with ``reweight_from`` re-weight the stored samples of that
    exposure model) the RA of ``source`` under ``cfg`` and write ``ra.json``."""
    cfg.validate()
    source.check()
    engine, fps, described = source.engine(cfg.fmt)
    out_dir = source.out_dir()
    store = RAStore(out_dir / STORE_FILE, fps, fresh=fresh)
    try:
        if reweight_from is not None:
            result = reweighted_accuracy(engine, cfg, store, reweight_from)
        else:
            result = resiliency_accuracy(engine, cfg, store, progress=progress)
    finally:
        store.close()
    result["source"], result["fingerprints"] = described, fps
    return RARun(result, save_result(out_dir, result))
