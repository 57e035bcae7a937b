"""One architecture search end to end: data bundle, screening studies, front retraining and
test evaluation, outputs (``flipguard nas``).

>>> cfg = NASConfig(data="data/synth", out="runs/nas", trials=30)   # doctest: +SKIP
>>> doc = run_nas(cfg)                                               # doctest: +SKIP
>>> doc["rankings"]["screen"]["ra"]["tau"]                           # doctest: +SKIP
0.93
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from flipguard.errors import ConfigError
from flipguard.nas.config import NASConfig
from flipguard.nas.front import final_stage
from flipguard.nas.output import SCHEMA, write_outputs
from flipguard.nas.search import Context, lock, prepare, run_studies

__all__ = ["run_nas"]

Progress = Callable[[str, dict[str, Any]], None]


def run_nas(cfg: NASConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Run (or resume) the search described by ``cfg``; returns the ``nas.json`` document
    (also written to ``cfg.out``). ``progress(stage, info)`` is called after each study and
    each retrained network."""

    cfg.validate()
    if cfg.workers > 1 and ":" not in cfg.space and cfg.space not in ("cae", "digits"):

        raise ConfigError("--space: worker processes need an importable 'pkg.module:name'")
    t0 = time.perf_counter()
    with lock(cfg.out_path):
        data = prepare(cfg)
        ctx = Context(cfg, data=data)
        studies = run_studies(cfg, ctx, progress)
        t_search = time.perf_counter() - t0
        doc = final_stage(cfg, ctx, progress)
        for name, s in studies.items():
            doc["studies"].setdefault(name, {}).update(
                {k: s[k] for k in ("recovered", "COMPLETE", "FAIL", "WAITING") if k in s})
        doc.update(config=cfg.to_dict(), data=data.info,
                   space={"name": ctx.space.name, "task": ctx.space.task,
                          "parameters": ctx.space.describe()},
                   seconds={"search": round(t_search, 1),
                            "total": round(time.perf_counter() - t0, 1)})
        doc["files"] = write_outputs(doc, cfg.out_path, list(cfg.settings.hardware))
    return {"schema": SCHEMA, **doc}
