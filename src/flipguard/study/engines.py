"""The engine of a run directory: its model evaluated on its test inputs for its task.

:class:`RunEngineFactory` is the one recipe every verb uses (campaigns, validation,
hardening, RA, the predictor): picklable, so worker processes and Ray actors build the engine
once each, and fingerprinted, so a store made for another model, dataset or task is refused.

>>> f = RunEngineFactory("runs/demo", images=16)
>>> f.images
16
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flipguard.errors import ConfigError
from flipguard.fingerprint import tensor_fingerprint
from flipguard.inject import ClassificationTask, DetectionTask, Engine, Task, ToleranceTask
from flipguard.layers import evenly_spaced
from flipguard.study.rundir import Run, load_run

__all__ = ["EngineParts", "RunEngineFactory", "task_fingerprint", "task_for"]


@dataclass(frozen=True)
class EngineParts:
    """A loaded run with the inputs and labels its engine evaluates."""

    run: Run
    inputs: torch.Tensor
    labels: np.ndarray


def task_for(run: Run, labels: np.ndarray) -> Task:
    """The task saying what "correct" means for ``run`` (``config.task``): the detector at
    its threshold, the top-1 label, or outputs within a tolerance of golden."""
    t = run.config.task
    if t.kind == "classification":
        return ClassificationTask(labels)
    if t.kind == "tolerance":
        return ToleranceTask(len(labels), atol=t.atol, rtol=t.rtol)
    return DetectionTask(run.scorer.scores, run.threshold, labels,
                         score_interval=run.scorer.score_interval,
                         input_side=run.scorer.input_side)


def task_fingerprint(run: Run, fmt: str) -> str:
    """sha256 of what "correct" means for ``run`` in number format ``fmt``. A detection
    run hashes exactly what it always did (threshold, score, fmt), so stores made before
    tasks existed still match."""
    t = run.config.task
    what: dict[str, Any] = {"fmt": fmt}
    if t.kind == "detection":
        what.update(threshold=run.threshold, score=run.config.score)
    else:
        what.update(task=t.model_dump())
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


_PARTS: dict[Any, EngineParts] = {}


def _certificates(factory: RunEngineFactory, eng: Engine) -> None:
    """Load the engine's certificates from ``RUN/certificates/<digest>.npz`` (keyed by the
    model, data and task fingerprints and the certifier's options, not the campaign's
    faults), or compute and save them: the first engine of a campaign computes (or adds the
    layers an earlier campaign skipped and this one repays), its workers load."""
    cert = eng.certifier
    if cert is None or cert.reason is not None:
        return
    if factory.certify_faults is not None:
        cert.faults = dict(factory.certify_faults)
    key = json.dumps({**factory.fingerprints(), **cert.options()}, sort_keys=True)
    path = Path(factory.run) / "certificates" / (
        hashlib.sha256(key.encode()).hexdigest()[:16] + ".npz")
    if path.exists():
        cert.load(path)
        if not cert.stale():  # another campaign's cache serves unless it skipped a layer
            return            # that this campaign's faults repay
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, os.cpu_count() or 1))  # before any worker starts
    try:
        if path.exists():
            cert.refresh()
        else:
            cert.compute_all()
        cert.save(path)
    finally:
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class RunEngineFactory:
    """Picklable recipe of the engine of a run directory: the run's model on its test inputs
    (``images``: that many, evenly spaced; None = all) in number format ``fmt``; with
    ``certify`` images whose decision a fault provably keeps are not simulated
    (``certify_faults``: the campaign's faults per layer, so only layers where certifying
    pays are certified).

    ``factory()`` builds the engine; ``factory.model()`` only loads the network (a fresh copy
    callers may modify); ``factory.parts()`` the run, inputs and labels (cached per process
    while the run's files are unchanged).
    """

    run: str
    images: int | None = None
    fmt: str = "fp32"
    data_dir: str | None = None
    certify: bool = False
    certify_faults: tuple[tuple[str, int], ...] | None = None

    def __post_init__(self) -> None:
        if self.images is not None and (not isinstance(self.images, int) or self.images < 1):
            raise ConfigError(f"images: expected a positive count, got {self.images!r}")

    def model(self) -> torch.nn.Module:
        return load_run(self.run).model

    def parts(self) -> EngineParts:
        files = [Path(self.run) / n for n in ("config.json", "model.pt")]
        key = (self, tuple(f.stat().st_mtime_ns if f.exists() else 0 for f in files))
        if key not in _PARTS:
            _PARTS.clear()
            _PARTS[key] = self._load()
        return _PARTS[key]

    def _load(self) -> EngineParts:
        run = load_run(self.run)
        ds = run.load_data(self.data_dir)
        idx = evenly_spaced(len(ds.test), self.images)
        return EngineParts(run, ds.test[torch.as_tensor(idx)], np.asarray(ds.test_labels)[idx])

    def fingerprints(self) -> dict[str, str]:
        """``model``, ``data`` (evaluated inputs + labels) and ``task`` (what "correct" means
        and the number format) fingerprints."""
        p = self.parts()
        return {"model": p.run.model_fingerprint(),
                "data": tensor_fingerprint(p.inputs, p.labels),
                "task": task_fingerprint(p.run, self.fmt)}

    def __call__(self) -> Engine:
        p = self.parts()
        eng = Engine(p.run.model, p.inputs, task_for(p.run, p.labels), fmt=self.fmt,
                     certify=self.certify)
        if self.certify:
            _certificates(self, eng.prepare())
        return eng
