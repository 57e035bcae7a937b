"""The search driver: Optuna studies in ``OUT/nas.sqlite``, screening trials, resume.

Each study (the hardware-aware one, and with ``compare_uniform`` the uniform one) is an
Optuna study named ``<study>-<hardware>`` in the SQLite storage ``OUT/nas.sqlite``; every
finished trial is committed there. A trial samples an architecture, trains it at the
screening fidelity and measures its objectives (:func:`flipguard.nas.objectives.
evaluate_network`), cached per architecture in ``OUT/screen/<key>/`` — a network is
trained once even when both studies propose it, and RA is measured under every exposure of
the search, so rankings can be compared on the same networks.

*Resume*: the same command again. The driver holds ``OUT/nas.lock`` while it runs, so a
trial still marked RUNNING when it starts belongs to a killed process: it is marked FAIL and
its parameters are enqueued again, so it is re-run first (its screening result may even be
in the cache already). *Determinism*: the sampler of the trial that follows ``n`` complete
trials is seeded with ``(seed, n)`` and every evaluation is seeded, so with one worker an
interrupted and resumed search gives the same trials as an uninterrupted one. ``workers``
> 1 runs trials in that many spawned processes (one torch thread each) sharing the storage;
the order in which their trials finish, hence the sampler's history, is then not fixed.
"""

from __future__ import annotations

import fcntl
import json
import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flipguard.data import load_mvtec
from flipguard.errors import ConfigError, FlipguardError
from flipguard.fileio import atomic_write, json_clean
from flipguard.nas.config import NASConfig
from flipguard.nas.data import (
    SearchData,
    classification_data,
    detection_data,
    load_bundle,
    save_bundle,
)
from flipguard.nas.objectives import evaluate_network, objective_values
from flipguard.nas.space import SearchSpace, arch_key, load_space

__all__ = ["Context", "run_studies", "storage_url", "prepare", "screen", "lock"]

DATA_FILE, CONFIG_FILE, STORAGE_FILE = "data.pt", "search.json", "nas.sqlite"


def storage_url(out: str | Path) -> str:
    return f"sqlite:///{(Path(out) / STORAGE_FILE).resolve()}"


@contextmanager
def lock(out: Path) -> Iterator[None]:
    """Exclusive ``OUT/nas.lock`` for the duration (a second search of OUT is refused)."""
    out.mkdir(parents=True, exist_ok=True)
    fh = open(out / "nas.lock", "a+")  # noqa: SIM115 - held for the block
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"{out}: another search is running in this directory") from None
        yield
    finally:
        fh.close()


def prepare(cfg: NASConfig) -> SearchData:
    """Write (or check) ``OUT/search.json`` and the data bundle ``OUT/data.pt``; a resumed
    search must have the same search settings."""

    out = cfg.out_path
    ident = cfg.search_identity()
    cpath = out / CONFIG_FILE
    if cpath.is_file():
        old = json.loads(cpath.read_text()).get("identity")
        if old != json.loads(json.dumps(ident)):
            diff = sorted(k for k in set(old or {}) | set(ident)
                          if (old or {}).get(k) != json.loads(json.dumps(ident)).get(k))
            raise ConfigError(f"{out}: holds a search with other settings ({', '.join(diff)}); "
                              f"use another --out or the same settings")
    if not (out / DATA_FILE).is_file():
        save_bundle(_load_data(cfg), out / DATA_FILE)
    atomic_write(cpath, json.dumps({"identity": ident, "config": cfg.to_dict()}, indent=2,
                                   default=str) + "\n")
    return load_bundle(out / DATA_FILE)


def _load_data(cfg: NASConfig) -> SearchData:

    space = load_space(cfg.space)
    if space.task == "detection":

        ds = load_mvtec(cfg.data, category=cfg.category, size=cfg.size)
        # only train/good reaches the search: the test split is never an argument
        return detection_data(ds.train, cfg.val_fraction, cfg.seed, cfg.seed,
                              cfg.defect_strength)
    blob = _load_pt(cfg.data)
    return classification_data(blob["inputs"].float(), blob["labels"], cfg.val_fraction,
                               cfg.seed)


def _load_pt(path: str) -> dict[str, Any]:
    import torch

    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"{path}: data file not found") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one line
        raise ConfigError(f"{path}: cannot load ({type(exc).__name__})") from None
    if not isinstance(blob, dict) or not all(isinstance(blob.get(k), torch.Tensor)
                                             for k in ("inputs", "labels")):
        raise ConfigError(f"{path}: expected a dict with 'inputs' and 'labels' tensors")
    return blob


class Context:
    """What a process needs to evaluate trials: config, space, data."""

    def __init__(self, cfg: NASConfig, space: SearchSpace | None = None,
                 data: SearchData | None = None) -> None:
        self.cfg = cfg
        self.space = space if space is not None else load_space(cfg.space)
        self.data = data if data is not None else load_bundle(cfg.out_path / DATA_FILE)
        self.data_fp = self.data.fingerprint()

    def key(self, arch: dict[str, Any] | None, stage: str) -> str:
        fid = self.cfg.screen if stage == "screen" else self.cfg.full
        s = self.cfg.settings.to_dict()
        s.pop("hardware")
        a = arch if arch is not None else {"baseline": self.space.baseline_name()}
        return arch_key(a, self.space.name, fid.epochs, s, self.data_fp)

    def build(self, arch: dict[str, Any] | None) -> Any:
        shape = self.data.input_shape
        if arch is None:
            net = self.space.baseline(shape, seed=self.cfg.seed)
            if net is None:
                raise ConfigError(f"--space: {self.space.name!r} has no baseline network")
            return net
        return self.space.build(arch, shape, seed=self.cfg.seed)


@contextmanager
def _key_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def screen(ctx: Context, arch: dict[str, Any] | None, stage: str = "screen") -> dict[str, Any]:
    """Objectives of ``arch`` (None: the space's baseline) at the ``stage`` fidelity
    (``screen`` | ``full``), cached in ``OUT/<stage>/<key>/result.json``."""
    import torch


    key = ctx.key(arch, stage)
    work = ctx.cfg.out_path / stage / key
    rpath = work / "result.json"
    want = tuple(ctx.cfg.settings.hardware)
    with _key_lock(ctx.cfg.out_path / stage / f"{key}.lock"):
        res = json.loads(rpath.read_text()) if rpath.is_file() else None
        if res is not None and all(hw in res["ra"] for hw in want):
            return res
        fid = ctx.cfg.screen if stage == "screen" else ctx.cfg.full
        net = ctx.build(arch)
        if res is not None and (work / "model.pt").is_file():
            net.load_state_dict(torch.load(work / "model.pt", weights_only=True))
            missing = tuple(hw for hw in want if hw not in res["ra"])
            more = evaluate_network(net, ctx.space, ctx.data, ctx.cfg.settings, fid, work,
                                    trained=True, hardware=missing)
            res["ra"].update(more["ra"])
        else:
            res = evaluate_network(net, ctx.space, ctx.data, ctx.cfg.settings, fid, work)
            res.update(key=key, arch=arch, stage=stage, epochs=fid.epochs)
        atomic_write(rpath, json.dumps(json_clean(res), indent=1) + "\n")
    return res


def _sampler(cfg: NASConfig, n_complete: int) -> Any:
    import optuna

    seed = (cfg.seed * 1_000_003 + n_complete) % (2 ** 32)
    if cfg.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=cfg.population, seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                      n_startup_trials=cfg.startup_trials, constant_liar=True)


def _objective(ctx: Context, hardware: str) -> Any:
    def objective(trial: Any) -> list[float]:
        arch = ctx.space.sample(trial)
        res = screen(ctx, arch)
        trial.set_user_attr("key", res["key"])
        trial.set_user_attr("arch", arch)
        trial.set_user_attr("result", {k: res[k] for k in ("quality", "metrics", "memory_bits",
                                                            "macs", "parameters", "ra",
                                                            "seconds")})
        return objective_values(res, ctx.cfg.objectives, hardware)
    return objective


def _counts(study: Any) -> dict[str, int]:
    from optuna.trial import TrialState

    c = {s.name: 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        c[t.state.name] += 1
    return c


def _recover(study: Any) -> int:
    """Mark RUNNING trials (of killed processes) FAIL and enqueue their parameters."""
    from optuna.trial import TrialState

    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in stale:
        study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
    return len(stale)


def _create(cfg: NASConfig, name: str) -> Any:
    import optuna

    return optuna.create_study(storage=storage_url(cfg.out), study_name=name,
                               directions=cfg.directions(), load_if_exists=True)


def run_trials(cfg: NASConfig, name: str, hardware: str, deadline: float,
               ctx: Context | None = None) -> None:
    """Run trials of study ``name`` in this process until it has ``cfg.trials`` complete
    ones, the deadline passes, or ``3 * trials`` have failed."""
    import optuna
    import torch

    torch.set_num_threads(cfg.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    ctx = ctx or Context(cfg)
    objective = _objective(ctx, hardware)
    while time.time() < deadline:
        probe = optuna.load_study(study_name=name, storage=storage_url(cfg.out))
        c = _counts(probe)
        if c["COMPLETE"] + c["RUNNING"] >= cfg.trials or c["FAIL"] >= 3 * cfg.trials + 1:
            return
        study = optuna.load_study(study_name=name, storage=storage_url(cfg.out),
                                  sampler=_sampler(cfg, c["COMPLETE"]))
        study.optimize(objective, n_trials=1, catch=(FlipguardError, RuntimeError))


def _worker(cfg_dict: dict[str, Any], name: str, hardware: str, deadline: float) -> None:
    run_trials(NASConfig.from_dict(cfg_dict), name, hardware, deadline)


def run_studies(cfg: NASConfig, ctx: Context, progress: Any = None) -> dict[str, Any]:
    """Run every study of the search to ``cfg.trials`` complete trials (or the timeout);
    returns per study the counts and how many stale trials were recovered."""
    import multiprocessing as mp

    deadline = time.time() + (cfg.timeout if cfg.timeout is not None else math.inf)
    summary: dict[str, Any] = {}
    for name, hw in zip(cfg.study_names(), cfg.study_hardware(), strict=True):
        study = _create(cfg, name)
        recovered = _recover(study)
        for _ in range(3):  # a worker's last trial may fail after the others stopped
            if cfg.workers == 1:
                run_trials(cfg, name, hw, deadline, ctx)
            else:
                spawn = mp.get_context("spawn")
                procs = [spawn.Process(target=_worker, args=(cfg.to_dict(), name, hw, deadline))
                         for _ in range(cfg.workers)]
                for p in procs:
                    p.start()
                for p in procs:
                    p.join()
            c = _counts(study)
            if c["COMPLETE"] >= cfg.trials or time.time() >= deadline:
                break
        summary[name] = {"hardware": hw, "recovered": recovered, **_counts(study)}
        if progress is not None:
            progress(name, summary[name])
    return summary
