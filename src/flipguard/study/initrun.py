"""`flipguard init`: any PyTorch model as a run directory, so every verb works on it.

A run made here holds the user's factory spec (``pkg.module:fn`` or ``path/file.py:fn``,
stored with an absolute file path), the weights copied into ``RUN/model.pt``, the data (an
MVTec-layout root or a tensor file of inputs and labels, see
:mod:`flipguard.data.tensors`) and the task saying what "correct" means:

* ``detection``: the model reconstructs its input; the anomaly score of each image is the
  reduced anomaly map (:class:`flipguard.detect.ScoreConfig`) and the threshold comes from
  normal data only — every ``train/good`` image of an MVTec root, or the ``normal`` tensor of
  a tensor file — at the target false-positive rate ``fpr`` (:mod:`flipguard.threshold`);
* ``classification``: the top-1 label of the logits;
* ``tolerance``: every output within ``atol + rtol·|golden|`` of the fault-free output.

The spec is given on the command line, which is the user's consent to import it: the run is
signed for this user (:mod:`flipguard.study.trust`), so later verbs open it without flags
while a received copy is refused. Everything is checked and computed before anything is
written; an existing non-empty ``RUN`` is refused.

>>> InitOptions().task, InitOptions(task="tolerance", atol=0.1).atol
('detection', 0.1)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch

from flipguard.data import load_mvtec
from flipguard.data.tensors import TENSOR_SUFFIXES, load_tensor_dataset
from flipguard.detect import ScoreConfig, Scorer, evaluate_detector, reconstruct
from flipguard.errors import ConfigError
from flipguard.models import load_model
from flipguard.study.rundir import (
    DataSection,
    ModelSection,
    Run,
    RunConfig,
    TaskSection,
    ThresholdSection,
    load_run,
    save_metrics,
    save_run,
)
from flipguard.study.trust import sign
from flipguard.threshold import (
    calibrate_threshold,
    check_threshold_args,
    resolve_auto,
    score_stats,
)

__all__ = ["TASKS", "InitOptions", "init_run", "task_metrics"]

TASKS: tuple[str, ...] = get_args(TaskSection.model_fields["kind"].annotation)
"""What "correct" can mean (the values of ``task.kind``)."""


@dataclass(frozen=True)
class InitOptions:
    """How ``flipguard init`` reads the data and what "correct" means (module docstring).
    ``params``: keyword arguments of the factory; ``size``/``channels``/``resize``/
    ``category`` apply to an MVTec root; ``score``: keyword arguments of
    :class:`~flipguard.detect.ScoreConfig` for a detection task."""

    task: str = "detection"
    weights: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    category: str | None = None
    size: int = 128
    channels: int | None = None
    resize: str = "stretch"
    fpr: float = 0.05
    atol: float = 0.0
    rtol: float = 0.0
    score: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """One line for an option that cannot work, before anything is read."""
        if self.task not in TASKS:
            raise ConfigError(f"--task: expected one of {', '.join(TASKS)}, got {self.task!r}")
        TaskSection(kind=self.task, atol=self.atol, rtol=self.rtol)
        if self.task == "detection":
            check_threshold_args("auto", self.fpr, 0.99, 3.0)
            ScoreConfig(**self.score)


def _spec(spec: str) -> str:
    """``spec`` with a file path made absolute (the run works from any directory)."""
    mod, sep, fn = spec.rpartition(":")
    if sep and mod.endswith(".py"):
        return f"{Path(mod).resolve()}:{fn}"
    return spec


def _dataset(data: Path, opts: InitOptions) -> tuple[Any, DataSection]:
    if data.suffix.lower() in TENSOR_SUFFIXES:
        split = load_tensor_dataset(data, need_labels=opts.task != "tolerance").split()
        return split, DataSection(path=str(data.resolve()), format="tensors", size=split.size,
                                  channels=split.channels)
    ds = load_mvtec(data, category=opts.category, size=opts.size, channels=opts.channels,
                    resize=opts.resize)
    return ds, DataSection(path=str(data.resolve()), category=opts.category, size=opts.size,
                           channels=int(ds.train.shape[1]), resize=opts.resize)


def _outputs(net: torch.nn.Module, x: torch.Tensor, spec: str) -> torch.Tensor:
    try:
        with torch.no_grad():
            y = net(x)
    except Exception as exc:  # noqa: BLE001 - the user's model: one line naming it
        raise ConfigError(f"model {spec!r}: forward pass on the data failed "
                          f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                          ) from None
    if not isinstance(y, torch.Tensor):
        raise ConfigError(f"model {spec!r}: returned {type(y).__name__}, expected a tensor")
    return y


def task_metrics(net: torch.nn.Module, ds: Any, task: TaskSection) -> dict[str, Any]:
    """Test metrics of a classification (top-1 accuracy) or tolerance run (its golden
    outputs are correct by definition).

    >>> from flipguard.data.tensors import TensorDataset
    >>> ds = TensorDataset(Path("d.pt"), torch.eye(3), np.array([0, 1, 1])).split()
    >>> task_metrics(torch.nn.Identity(), ds, TaskSection(kind="classification"))["accuracy"]
    0.6666666666666666
    """
    n = int(ds.test.shape[0])
    out: dict[str, Any] = {"task": task.kind, "n_test": n}
    if task.kind == "classification":
        y = reconstruct(net, ds.test)
        if y.dim() != 2:
            raise ConfigError(f"task classification: expected logits (N, classes), got "
                              f"outputs of shape {tuple(y.shape)}")
        out["accuracy"] = float((y.argmax(1).numpy() == np.asarray(ds.test_labels)).mean())
        out["classes"] = int(y.shape[1])
    else:
        out.update(accuracy=1.0, atol=task.atol, rtol=task.rtol)
    return out


def _detector(net: torch.nn.Module, ds: Any, opts: InitOptions, spec: str
              ) -> tuple[ScoreConfig, ThresholdSection, dict[str, Any]]:
    normal = ds.train
    if normal.shape[0] < 2:
        raise ConfigError("task detection: need at least 2 normal images to set the "
                          "threshold (train/good, or a 'normal' tensor in the tensor file)")
    y = _outputs(net, normal[:1], spec)
    if y.shape != normal[:1].shape:
        raise ConfigError(f"task detection: the model must reconstruct its input (output "
                          f"{tuple(y.shape)} for input {tuple(normal[:1].shape)})")
    scfg = ScoreConfig(**{"standardize": False, **opts.score})
    scorer = Scorer(scfg)
    val = scorer.scores(normal, reconstruct(net, normal)).numpy()
    if not np.isfinite(val).all():
        raise ConfigError(f"model {spec!r}: non-finite anomaly scores on normal images")
    thr = calibrate_threshold(val, method="auto", fpr=opts.fpr)
    th = ThresholdSection(value=float(thr), method="auto", fpr=opts.fpr,
                          rule_used=resolve_auto(len(val), opts.fpr),
                          val_stats=score_stats(val))
    metrics = evaluate_detector(net, scorer, float(thr), ds.test, ds.test_labels,
                                ds.test_masks)
    metrics.update(task="detection", val_images=int(val.size),
                   val_fpr=float((val > thr).mean()))
    return scfg, th, metrics


def init_run(run: str | Path, model: str, data: str | Path,
             opts: InitOptions | None = None) -> Run:
    """Make run directory ``run`` for ``model`` (factory spec) on ``data``; returns it loaded.

    Example::

        init_run("runs/r20", "examples/resnet20.py:resnet20", "cifar_subset.pt",
                 InitOptions(task="classification", weights="r20.safetensors"))
    """
    opts = opts or InitOptions()
    opts.check()
    run, data = Path(run), Path(data)
    if run.exists() and (not run.is_dir() or any(run.iterdir())):
        raise ConfigError(f"{run}: exists and is not empty; choose a new run directory")
    if not data.exists():
        raise ConfigError(f"--data: {data} not found (an MVTec-layout root or a "
                          f"{'/'.join(TENSOR_SUFFIXES)} tensor file)")
    spec = _spec(model)
    net = load_model(spec, opts.weights, **opts.params).eval()
    ds, dsec = _dataset(data, opts)
    task = TaskSection(kind=opts.task, atol=opts.atol, rtol=opts.rtol)
    _outputs(net, ds.test[:1], spec)
    score: dict[str, Any] = {}
    threshold = None
    if opts.task == "detection":
        scfg, threshold, metrics = _detector(net, ds, opts, spec)
        score = scfg.model_dump()
    else:
        metrics = task_metrics(net, ds, task)
    metrics["n_parameters"] = sum(p.numel() for p in net.parameters())
    config = RunConfig(data=dsec, model=ModelSection(kind="factory", factory=spec,
                                                      params=dict(opts.params)),
                       task=task, score=score, threshold=threshold,
                       train={"weights": None if opts.weights is None
                              else str(Path(opts.weights).resolve())})
    save_run(run, config, net)
    sign(run, spec, dict(opts.params))
    save_metrics(run, metrics)
    return load_run(run)
