"""Ray backend: shards (chunks of faults) run on a Ray cluster, results stream back.

Each Ray actor builds its engine (and golden cache) once from the picklable factory, then
runs chunks; the driver keeps two chunks in flight per actor and yields results as they
complete, so the single writer (the driver) records them while the cluster keeps working.
``address``: ``"local"`` starts a private local cluster (``workers`` CPUs, no dashboard),
``"auto"`` joins the running cluster, anything else is a cluster address
(``ray://host:10001`` or ``host:6379``). On a remote cluster the run directory must be
readable at the same path on every node and flipguard must be installed there.

Example::

    chunks = chunks_of(store.pending(), 32)
    for fault_ids, outcomes, seconds in ray_chunks(factory, chunks, address="local", workers=2):
        store.add_results(zip(fault_ids, outcomes), seconds=seconds / len(fault_ids))
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from flipguard.campaign.chunks import execute_chunk
from flipguard.campaign.planner import PlannedFault
from flipguard.errors import ConfigError, FlipguardError

__all__ = ["RayError", "ray_chunks", "ray_map"]


class RayError(FlipguardError):
    """Ray is missing or the cluster cannot be reached."""


class _Worker:
    """Actor body: one engine per actor process."""

    def __init__(self, factory: Any) -> None:
        import torch

        torch.set_num_threads(1)
        self.engine = factory()

    def run(self, chunk: list[PlannedFault]) -> tuple[list[int], list[dict[str, Any]]]:
        return execute_chunk(self.engine, chunk)


def _init(ray: Any, address: str, workers: int) -> bool:
    """Connect or start a cluster; True when this call started it (and must shut it down)."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                              "configure_logging": False}
    try:
        if address == "local":
            ray.init(num_cpus=max(1, workers), **kwargs)
        else:
            ray.init(address=address, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any connection failure is one line
        msg = " ".join(str(exc).split())[:200]
        raise RayError(f"--ray {address}: cannot start/connect to a Ray cluster ({msg})") \
            from None
    return True


def require_ray() -> Any:
    """The ``ray`` module, or one clear line saying how to install it (checked before a
    campaign opens its store, so a missing extra costs nothing)."""
    try:
        import ray
    except ImportError:
        raise RayError("--ray: Ray is not installed (pip install 'flipguard[ray]')") from None
    return ray


def ray_map(fn: Callable[..., Any], calls: Sequence[tuple], address: str = "local",
            workers: int = 1, poll: Callable[[], None] | None = None) -> list[Any]:
    """``[fn(*args) for args in calls]`` as Ray tasks (one CPU each, ``workers`` CPUs for a
    local cluster), calling ``poll()`` about once a second while they run."""
    ray = require_ray()
    if not address:
        raise ConfigError("--ray: expected auto, local or a cluster address")
    started = _init(ray, address, workers)
    try:
        task = ray.remote(num_cpus=1, max_retries=0)(fn)
        refs = [task.remote(*args) for args in calls]
        pending = list(refs)
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
            if poll is not None:
                poll()
        return ray.get(refs)
    finally:
        if started:
            ray.shutdown()


def ray_chunks(factory: Any, chunks: Iterable[list[PlannedFault]], address: str = "local",
               workers: int = 1) -> Iterator[tuple[list[int], list[dict[str, Any]]]]:
    """Run ``chunks`` (consumed lazily) on Ray actors (``workers`` of them; 1 with
    ``address="auto"`` or an address means one per cluster CPU) and yield
    ``(fault_ids, outcome_dicts)`` as they end."""
    ray = require_ray()
    if not address:
        raise ConfigError("--ray: expected auto, local or a cluster address")
    queue = iter(chunks)
    first = next(queue, None)
    if first is None:
        return
    queue = itertools.chain([first], queue)
    started = _init(ray, address, workers)
    actors: list[Any] = []
    try:
        n = workers
        if address != "local" and workers <= 1:
            n = max(1, int(ray.cluster_resources().get("CPU", 1)))
        remote = ray.remote(num_cpus=1, max_restarts=0)(_Worker)
        actors = [remote.remote(factory) for _ in range(n)]
        inflight: dict[Any, Any] = {}
        for actor in actors:
            for _ in range(2):
                nxt = next(queue, None)
                if nxt is not None:
                    inflight[actor.run.remote(nxt)] = actor
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            ref = ready[0]
            actor = inflight.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - worker failure -> one line
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
                raise RayError(f"--ray: a worker failed ({first[:200]})") from None
            nxt = next(queue, None)
            if nxt is not None:
                inflight[actor.run.remote(nxt)] = actor
            yield result
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()
