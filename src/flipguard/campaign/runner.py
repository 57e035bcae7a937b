"""Run a planned campaign: open/resume the store, probe the rate, execute pending faults.

The parent process is the only writer. Pending faults are grouped by layer (so the engine can
batch them) into chunks of at most ``chunk`` faults; each chunk is committed in one
transaction. Backends: in-process, ``workers`` local processes (spawn, one torch thread each,
each builds its engine once) or a Ray cluster (:mod:`flipguard.campaign.ray_backend`). The
same plan gives the same rows whichever backend runs it.

Example (``factory``: any picklable engine recipe with ``model()``, ``fingerprints()`` and
``__call__()``, e.g. :class:`flipguard.study.engines.RunEngineFactory`)::

    factory = RunEngineFactory("runs/demo", images=16)
    store = open_campaign("runs/demo", PlanConfig(error=0.05, confidence=0.95), factory)
    summary = run_campaign(store, factory, workers=2)   # resumes if interrupted
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from flipguard import __version__
from flipguard.campaign.chunks import Chunk, chunks_of, execute_chunk, first_faults
from flipguard.campaign.plan_types import sampling_type
from flipguard.campaign.planner import (
    PlanConfig,
    PlannedFault,
)
from flipguard.campaign.ray_backend import ray_chunks
from flipguard.campaign.store import CampaignStore, StoreError, store_path, writer_lock
from flipguard.errors import ConfigError
from flipguard.layers import evenly_spaced

__all__ = ["Chunk", "chunks_of", "ensure_golden", "execute_chunk",
           "first_faults",
           "open_campaign", "probe_rate", "refine", "run_campaign"]

Progress = Callable[[int, int], None]
"""progress(done, total)."""


def open_campaign(run: str | Path, config: PlanConfig, factory: Any, *, fresh: bool = False,
                  model: torch.nn.Module | None = None, path: str | Path | None = None,
                  predictor: Any = None) -> CampaignStore:
    """Open ``RUN/campaign.sqlite`` (or ``path``) for ``config`` (resume), or create it with
    the fault list of the config's plan type (``predictor``: the criticality predictor of a
    stratified plan). A store of another model/dataset/task/plan is refused unless
    ``fresh``."""
    path = Path(path) if path is not None else store_path(run)
    fps = factory.fingerprints()
    digest = config.digest()
    if path.exists() and not fresh:
        store = CampaignStore(path)
        try:
            store.check(model=fps["model"], data=fps["data"], task=fps["task"], plan=digest)
        except StoreError:
            store.close()
            raise
        return store
    with writer_lock(path):  # a --fresh beside a live `campaign run` fails here, in one line
        plan = sampling_type(config.sampling).make(
            model if model is not None else factory.model(), config, predictor)
        definition = {"plan": config.to_dict(), "plan_digest": digest,
                      "model_fingerprint": fps["model"], "data_fingerprint": fps["data"],
                      "task_fingerprint": fps["task"], "flipguard_version": __version__,
                      "population": plan.population, "engine": _describe(factory)}
        return CampaignStore.create(path, definition, plan.strata, plan.faults(), replace=fresh)


def _describe(factory: Any) -> dict[str, Any]:
    try:
        from dataclasses import asdict

        return {"factory": type(factory).__name__, **asdict(factory)}
    except TypeError:
        return {"factory": type(factory).__name__}


def _local(engine: Any, chunks: Iterable[list[PlannedFault]]) -> Iterator[Chunk]:
    for c in chunks:
        yield execute_chunk(engine, c)


_WORKER_ENGINE: Any = None


def _worker_init(factory: Any) -> None:
    global _WORKER_ENGINE
    torch.set_num_threads(1)
    _WORKER_ENGINE = factory()


def _worker_run(chunk: list[PlannedFault]) -> Chunk:
    return execute_chunk(_WORKER_ENGINE, chunk)


def _processes(factory: Any, pages: Iterable[list[list[PlannedFault]]], workers: int
               ) -> Iterator[Chunk]:
    """Pages are read by this (the writer's) thread; their chunks go to the pool."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_worker_init, initargs=(factory,)) as pool:
        for chunks in pages:
            yield from pool.imap_unordered(_worker_run, chunks)


def ensure_golden(store: CampaignStore, engine: Any) -> None:
    """Record the engine's golden facts once; later runs must reproduce them."""
    golden = engine.golden.to_dict()
    have = store.get_meta("golden")
    if have is None:
        store.set_meta("golden", golden)
    elif json.loads(json.dumps(golden, sort_keys=True)) != have:
        raise StoreError(f"{store.path}: the golden run differs from the recorded one "
                         f"(model, data or environment changed); use --fresh")


def probe_rate(store: CampaignStore, engine: Any, k: int = 4) -> float | None:
    """Time ``k`` pending faults spread evenly over the pending list (so early and late
    layers both count) with ``engine``; the results are kept. Returns s/fault."""
    ids = store.pending_ids()
    if not ids or k < 1:
        return None
    pending = store.faults_by_id(ids[int(j)] for j in evenly_spaced(len(ids), k))
    fids, outs, dt = execute_chunk(engine, pending)
    store.add_results(zip(fids, outs, strict=True), seconds=dt / len(fids))
    return dt / len(fids)


def run_campaign(store: CampaignStore, factory: Any, *, engine: Any = None, workers: int = 1,
                 ray: str | None = None, limit: int | None = None, chunk: int = 32,
                 progress: Progress | None = None,
                 faults: Sequence[PlannedFault] | None = None) -> dict[str, Any]:
    """Execute the pending faults of ``store`` (only those of ``faults`` when given; at most
    ``limit``, chosen by :func:`first_faults`, so a limited run is a fair partial campaign
    too); returns a summary ``{"ran", "planned", "done", "seconds", "rate"}``."""
    if workers < 1:
        raise ConfigError(f"workers: expected >= 1, got {workers}")
    with writer_lock(store.path):
        return _run_campaign(store, factory, engine, workers, ray, limit, chunk, progress,
                             faults)


def _run_campaign(store: CampaignStore, factory: Any, engine: Any, workers: int,
                  ray: str | None, limit: int | None, chunk: int, progress: Progress | None,
                  faults: Sequence[PlannedFault] | None) -> dict[str, Any]:
    seed = int(store.definition.get("plan", {}).get("seed", 0))
    if faults is not None or limit is not None:
        pending = store.pending() if faults is None else store.faults_by_id(
            sorted(set(store.pending_ids()) & {pf.fault_id for pf in faults}))
        if limit is not None:
            pending = first_faults(pending, limit, seed)
        pages: Iterable[list[list[PlannedFault]]] = [chunks_of(pending, chunk, seed)]
    else:  # lazily, one window of fault ids at a time (aligned on chunk boundaries)
        pages = (chunks_of(page, chunk, seed) for page in store.pending_pages(chunk * 2048))
    counts = store.counts()
    t0 = time.perf_counter()
    local = ray is None and workers == 1
    if engine is None and (local or store.get_meta("golden") is None):
        engine = factory()
    if engine is not None:
        ensure_golden(store, engine)
    if ray is not None:
        stream = ray_chunks(factory, (c for page in pages for c in page), address=ray,
                            workers=workers)
    elif workers > 1:
        stream = _processes(factory, pages, workers)
    else:
        stream = _local(engine, (c for page in pages for c in page))
    ran, done = 0, counts["done"]
    if progress:
        progress(done, counts["planned"])
    for fids, outs, sec in stream:
        ran += store.add_results(zip(fids, outs, strict=True), seconds=sec / max(len(fids), 1))
        done = counts["done"] + ran
        if progress:
            progress(done, counts["planned"])
    dt = time.perf_counter() - t0
    return {"ran": ran, "planned": counts["planned"], "done": done, "seconds": dt,
            "rate": ran / dt if dt > 0 else float("nan")}


def refine(store: CampaignStore, model: torch.nn.Module, criterion: str,
           predictor: Any = None, max_rounds: int = 3) -> int:
    """One refinement round of the store's plan type (at most ``max_rounds``; see
    :class:`~flipguard.campaign.plan_types.Sampling`), under the store's writer lock.
    Returns the number of faults added (0 when every stratum already meets its margin)."""
    config = PlanConfig.from_dict(store.definition["plan"])
    with writer_lock(store.path):
        return sampling_type(config.sampling).refine(store, model, criterion, predictor,
                                                     max_rounds)
