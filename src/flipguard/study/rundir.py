"""Run directory: everything needed to rebuild a trained detector exactly.

Layout::

    RUN/config.json    RunConfig: data, model, task, score, train and threshold sections
    RUN/model.pt       state dict (loaded with ``torch.load(..., weights_only=True)``)
    RUN/metrics.json   test metrics written by ``flipguard train`` / ``init`` / ``evaluate``
    RUN/threshold_scores.json  the normal scores ``flipguard train`` calibrated its threshold on
    RUN/trust.json     this user's consent to import the run's model factory (study/trust.py)

A run made by ``flipguard train`` is a CAE detector on an MVTec-layout root; one made by
``flipguard init`` holds any model (``model.kind = "factory"``) on an MVTec root or a tensor
file (``data.format = "tensors"``) for a task saying what "correct" means (``task.kind``:
detection at a threshold, top-1 classification, or a tolerance on the outputs). Opening a run
never imports a non-flipguard factory it names unless this user trusted it (see
:func:`flipguard.study.trust.trusted`, ``flipguard --trust-code``).

Example::

    run = load_run("runs/demo")
    ds = run.load_data()
    recon = run.model(ds.test[:4])
    scores = run.scorer.scores(ds.test[:4], recon)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flipguard import __version__
from flipguard.data import load_mvtec
from flipguard.data.tensors import load_tensor_dataset
from flipguard.detect import ScoreConfig, Scorer
from flipguard.errors import FlipguardError
from flipguard.fileio import atomic_write, json_clean, save_torch
from flipguard.fingerprint import state_fingerprint
from flipguard.models import CAEConfig, build_cae, load_model
from flipguard.study.trust import sign, trusted

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.pt"
METRICS_FILE = "metrics.json"
SCORES_FILE = "threshold_scores.json"


class RunError(FlipguardError):
    """A run directory is missing, incomplete or corrupt."""


class DataSection(BaseModel):
    """Where the data comes from and how it is preprocessed."""

    model_config = ConfigDict(extra="forbid")
    path: str
    format: Literal["mvtec", "tensors"] = "mvtec"
    category: str | None = None
    size: int = 128
    channels: int = 1
    resize: str = "stretch"
    val_fraction: float = 0.1
    split_seed: int = 0
    cv_folds: int = 0  # >= 2: validation = fold 0 of data.split_folds(n, cv_folds, split_seed)


class ModelSection(BaseModel):
    """Which network: the built-in CAE (``kind="cae"``) or a user factory ``pkg.mod:fn``."""

    model_config = ConfigDict(extra="forbid")
    kind: str = "cae"
    params: dict[str, Any] = Field(default_factory=dict)
    factory: str | None = None


class TaskSection(BaseModel):
    """What "correct" means: the anomaly decision at the threshold (``detection``), the top-1
    label (``classification``) or every output within ``atol + rtol·|golden|`` of the golden
    output (``tolerance``)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["detection", "classification", "tolerance"] = "detection"
    atol: float = Field(0.0, ge=0.0, allow_inf_nan=False)
    rtol: float = Field(0.0, ge=0.0, allow_inf_nan=False)


class ThresholdSection(BaseModel):
    """The deployed decision threshold and the normal-validation statistics it came from.

    ``method`` is one of :data:`flipguard.threshold.THRESHOLD_METHODS`; ``fpr`` is the target
    false-positive rate of the ``auto``/``tail``/``empirical`` methods (None for the legacy
    methods and for runs written before it existed); ``rule_used`` is what ``auto`` chose.
    """

    model_config = ConfigDict(extra="forbid")
    value: float
    method: str = "quantile"
    fpr: float | None = None
    rule_used: str | None = None
    quantile: float = 0.99
    k: float = 3.0
    val_stats: dict[str, float] = Field(default_factory=dict)


class RunConfig(BaseModel):
    """Full configuration of a trained detector (``RUN/config.json``)."""

    model_config = ConfigDict(extra="forbid")
    flipguard_version: str = __version__
    data: DataSection
    model: ModelSection
    task: TaskSection = Field(default_factory=TaskSection)
    score: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    threshold: ThresholdSection | None = None


@dataclass
class Run:
    """A loaded run directory (see module docstring)."""

    path: Path
    config: RunConfig
    model: torch.nn.Module
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def task_kind(self) -> str:
        return self.config.task.kind

    @property
    def threshold(self) -> float:
        if self.config.threshold is None:
            raise RunError(f"{self.path / CONFIG_FILE}: no threshold (a "
                           f"{self.task_kind} run has no anomaly decision)")
        return float(self.config.threshold.value)

    @property
    def scorer(self):  # -> flipguard.detect.Scorer

        return Scorer(ScoreConfig(**self.config.score))

    def load_data(self, data_dir: str | Path | None = None):
        """Load the run's dataset (or ``data_dir`` instead) with the run's preprocessing."""

        d = self.config.data
        root = Path(data_dir) if data_dir is not None else Path(d.path)
        if d.format == "tensors":
            return load_tensor_dataset(root, need_labels=self.task_kind != "tolerance").split()
        return load_mvtec(root, category=d.category, size=d.size, channels=d.channels,
                          resize=d.resize)

    def model_fingerprint(self) -> str:
        """sha256 over the state dict (names, dtypes, shapes and raw bytes)."""
        return state_fingerprint(self.model.state_dict())


def build_model(section: ModelSection, run: str | Path | None = None) -> torch.nn.Module:
    """Instantiate the (untrained) network a model section describes. With ``run``, the code
    it names is first checked against this user's trust (:func:`check_model_trusted`)."""
    if run is not None:
        check_model_trusted(run, section)
    if section.kind == "cae":
        return build_cae(CAEConfig(**section.params))
    if section.kind == "factory" and section.factory:
        return load_model(section.factory, None, **section.params)
    raise RunError(
        f"model.kind: expected 'cae' or 'factory' with a factory spec, got {section.kind!r}"
    )


SAFE_FACTORIES = frozenset({"flipguard.models.cae:build_cae"})
"""flipguard's own model factories: a received run may name them freely."""
WRAPPERS = {"flipguard.study.hardening:build_hardened": "base",
            "flipguard.harden.module:build_hardened": "base"}
"""flipguard factories that build another model section (held in the named parameter): they
are as trusted as the section they wrap."""


def check_model_trusted(run: str | Path, section: ModelSection) -> None:
    """Refuse (one line) a model section naming code this user has not trusted for ``run``:
    any factory but :data:`SAFE_FACTORIES`, looking through :data:`WRAPPERS` to the section
    they wrap (see :func:`check_trusted`)."""
    if section.kind != "factory" or not section.factory:
        return
    spec = section.factory
    if spec in WRAPPERS:
        key = WRAPPERS[spec]
        try:
            inner = ModelSection(**dict(section.params.get(key) or {}))
        except (TypeError, ValueError):
            raise RunError(f"{Path(run) / CONFIG_FILE}: model.params.{key}: expected a model "
                           "section") from None
        return check_model_trusted(run, inner)
    if spec not in SAFE_FACTORIES:
        check_trusted(run, spec, section.params)


TRUST_ENV = "FLIPGUARD_TRUST_CODE"
"""Set to ``1`` (``flipguard --trust-code``) to trust the factories of the runs opened."""


def check_trusted(run: str | Path, spec: str, params: dict[str, Any]) -> None:
    """Refuse (one line) to import ``spec`` for ``run`` unless this user signed it
    (``flipguard init``) or ``$FLIPGUARD_TRUST_CODE=1`` — then the consent is recorded in
    ``RUN/trust.json`` for later verbs. (Every flipguard callable but a model factory counts
    as code too: ``flipguard.models.loading:load_model`` would import what its parameters
    name.)

    >>> try:
    ...     check_trusted("runs/received", "os:system", {"command": "echo hi"})
    ... except RunError as e:
    ...     print(str(e)[:60])
    runs/received/config.json: model.factory 'os:system' is code
    """
    if trusted(run, spec, params):
        return
    if os.environ.get(TRUST_ENV) == "1":
        sign(run, spec, params)
        return
    raise RunError(f"{Path(run) / CONFIG_FILE}: model.factory {spec!r} is code the run names; "
                   "flipguard runs it only with consent: pass --trust-code (flipguard "
                   "--trust-code VERB ...) if you trust where this run came from")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file + rename (never half-written)."""
    atomic_write(path, text)


def save_run(
    path: str | Path,
    config: RunConfig,
    model: torch.nn.Module,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write a run directory atomically file by file; returns its path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_torch(state, path / WEIGHTS_FILE)
    atomic_write_text(path / CONFIG_FILE, config.model_dump_json(indent=2) + "\n")
    if metrics is not None:
        save_metrics(path, metrics)
    return path


def save_metrics(path: str | Path, metrics: dict[str, Any]) -> None:
    """Write ``RUN/metrics.json`` atomically (NaN written as null)."""
    atomic_write_text(Path(path) / METRICS_FILE, json.dumps(json_clean(metrics), indent=2) + "\n")


class ThresholdScores(BaseModel):
    """``RUN/threshold_scores.json``: the held-out normal scores the threshold was calibrated on
    (validation split, or fold 0 then folds 1 .. K-1 of ``--cv-folds``), so another operating
    point can be chosen later without retraining."""

    model_config = ConfigDict(extra="forbid")
    scores: list[float]
    fold_sizes: list[int]

    @model_validator(mode="after")
    def _sizes_add_up(self) -> ThresholdScores:
        if sum(self.fold_sizes) != len(self.scores):
            raise ValueError(f"fold_sizes add up to {sum(self.fold_sizes)}, not to the "
                             f"{len(self.scores)} scores")
        return self


def _field_error(file: Path, exc: ValidationError) -> str:
    """The first error of a pydantic validation of ``file`` as one line."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    return f"{file}: field '{loc}': {err['msg']}"


def save_threshold_scores(path: str | Path, scores: Any, fold_sizes: list[int]) -> None:
    """Write :class:`ThresholdScores` to ``RUN/threshold_scores.json`` atomically."""
    kept = ThresholdScores(scores=[float(v) for v in scores], fold_sizes=list(fold_sizes))
    atomic_write_text(Path(path) / SCORES_FILE, kept.model_dump_json() + "\n")


def load_threshold_scores(path: str | Path) -> tuple[list[float], list[int]] | None:
    """The calibration scores and fold sizes of :func:`save_threshold_scores`; ``None`` for a
    run written before they were kept (one-line :class:`RunError` if the file is corrupt).

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> save_threshold_scores(d, [0.5, 1.5, 2.5], [2, 1])
    >>> load_threshold_scores(d)
    ([0.5, 1.5, 2.5], [2, 1])
    """
    f = Path(path) / SCORES_FILE
    if not f.is_file():
        return None
    try:
        kept = ThresholdScores.model_validate_json(f.read_text())
    except ValidationError as exc:
        raise RunError(_field_error(f, exc) + " (expected {'scores': [numbers], "
                       "'fold_sizes': [integers]})") from None
    return kept.scores, kept.fold_sizes


def load_run(path: str | Path) -> Run:
    """Load a run directory written by :func:`save_run` (weights via ``weights_only=True``)."""
    path = Path(path)
    cfg_file, w_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not path.is_dir():
        raise RunError(f"{path}: run directory not found")
    if not cfg_file.is_file():
        raise RunError(f"{cfg_file}: missing (not a flipguard run directory?)")
    try:
        config = RunConfig.model_validate_json(cfg_file.read_text())
    except ValidationError as exc:
        raise RunError(_field_error(cfg_file, exc)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RunError(f"{cfg_file}: unreadable ({exc})") from None
    if not w_file.is_file():
        raise RunError(f"{w_file}: missing model weights")
    model = build_model(config.model, path)
    try:
        state = torch.load(w_file, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - any load failure is one user-facing line
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RunError(f"{w_file}: cannot load weights ({msg})") from None
    model.eval()
    metrics: dict[str, Any] = {}
    m_file = path / METRICS_FILE
    if m_file.is_file():
        try:
            metrics = json.loads(m_file.read_text())
        except json.JSONDecodeError:
            raise RunError(f"{m_file}: not valid JSON") from None
    return Run(path=path, config=config, model=model, metrics=metrics)
