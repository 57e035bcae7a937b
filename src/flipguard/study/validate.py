"""`flipguard validate RUN --layer L`: statistical fault injection against exhaustive injection.

Every fault of the chosen population (one layer's weights × the chosen bits, one bit flip
each) is injected once into ``RUN/validate/<layer>.sqlite`` — an ordinary campaign store, so
the run is resumable, kill-safe and can use ``--workers``. Then SFI samples are drawn from
those results at several margins (:func:`flipguard.campaign.validation.validate_sfi`) and
``RUN/validate/<layer>.json`` records the exhaustive CFR per layer and bit, one SFI estimate
and interval per design and margin, and the coverage of the intervals against the nominal
confidence; ``<layer>.png`` / ``.svg`` show them (:mod:`flipguard.report.figures_validate`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flipguard.campaign import PlanConfig, open_campaign, run_campaign
from flipguard.campaign.classify import golden_of
from flipguard.campaign.stats import DEFAULT_METHOD
from flipguard.campaign.store import CampaignStore
from flipguard.campaign.validation import validate_sfi
from flipguard.errors import ConfigError
from flipguard.faults import SiteSpace, get_format
from flipguard.fileio import atomic_write, json_clean
from flipguard.inject import CRITICAL, Outcome, parse_criterion
from flipguard.report.figures import render
from flipguard.report.figures_validate import validation_figure

__all__ = ["VALIDATE_DIR", "ValidateOptions", "validate_run"]

VALIDATE_DIR = "validate"
SCHEMA = "flipguard.validate/1"


@dataclass(frozen=True)
class ValidateOptions:
    """What to validate: ``layer``'s ``target`` values, ``bits`` (None: every bit of
    ``fmt``), over ``images`` evenly spaced test images (None: all); SFI at ``margins`` and
    ``confidence`` with ``replications`` draws per design, under ``criterion``."""

    layer: str
    bits: tuple[int, ...] | None = None
    target: str = "weight"
    images: int | None = None
    fmt: str = "fp32"
    margins: tuple[float, ...] = (0.01, 0.02, 0.05)
    confidence: float = 0.95
    replications: int = 2000
    criterion: str = "accuracy-drop:0.01"
    method: str = DEFAULT_METHOD
    seed: int = 0
    workers: int = 1
    chunk: int = 32
    extra: dict[str, Any] = field(default_factory=dict)

    def plan(self, model: Any) -> PlanConfig:
        """The exhaustive plan: one stratum per bit with ``n = N``."""
        space = SiteSpace(model, targets=(self.target,), fmt=self.fmt)
        ls = space.layer(self.layer, self.target)
        fmt_bits = get_format(self.fmt).bits
        bits = self.bits if self.bits is not None else tuple(range(fmt_bits))
        bad = [b for b in bits if not 0 <= b < fmt_bits]
        if bad or not bits:
            raise ConfigError(f"--bits: expected bit positions 0..{fmt_bits - 1}, got {bad}")
        strata = tuple({"layer": ls.name, "target": self.target, "bit": int(b),
                        "n": int(ls.numel)} for b in sorted(set(bits)))
        return PlanConfig(user_strata=strata, targets=(self.target,), fmt=self.fmt,
                          seed=self.seed, error=0.5, confidence=self.confidence)


def store_file(run: str | Path, layer: str) -> Path:
    """``RUN/validate/<layer>.sqlite``."""
    return Path(run) / VALIDATE_DIR / f"{layer}.sqlite"


def validate_run(run: str | Path, factory: Any, opts: ValidateOptions,
                 progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Run (or resume) the exhaustive campaign of ``opts.layer`` and validate SFI on it;
    writes and returns the ``RUN/validate/<layer>.json`` record."""
    crit = parse_criterion(opts.criterion)
    cfg = opts.plan(factory.model())
    path = store_file(run, opts.layer)
    t0 = time.perf_counter()
    with open_campaign(run, cfg, factory, path=path) as store:
        summary = run_campaign(store, factory, workers=opts.workers, chunk=opts.chunk,
                               progress=progress)
        critical, bits = _classes(store, crit)
        cpu_seconds, timed = store.compute_seconds()
    rows = validate_sfi(critical, bits, margins=opts.margins, confidence=opts.confidence,
                        replications=opts.replications, seed=opts.seed, method=opts.method)
    record = {
        "schema": SCHEMA, "run": str(run), "layer": opts.layer, "target": opts.target,
        "bits": sorted({int(b) for b in bits}), "images": opts.images, "fmt": opts.fmt,
        "criterion": crit.text, "method": opts.method, "confidence": opts.confidence,
        "replications": opts.replications, "population": int(critical.size),
        "critical": int(critical.sum()), "cfr": float(critical.mean()),
        "cost": {"faults": int(critical.size), "ran_now": summary["ran"],
                 "seconds_now": summary["seconds"], "rate_now": summary["rate"],
                 "wall_seconds_now": time.perf_counter() - t0,
                 "process_seconds": cpu_seconds, "timed_faults": timed,
                 "seconds_per_fault": cpu_seconds / timed if timed else None},
        "rows": [r.to_dict() for r in rows],
    }
    fig = render(validation_figure(record), f"validate_{opts.layer}",
                 f"{opts.layer}: exhaustive CFR vs SFI")
    atomic_write(path.with_suffix(".png"), fig.png)
    atomic_write(path.with_suffix(".svg"), fig.svg)
    record["figure"] = str(path.with_suffix(".png"))
    atomic_write(path.with_suffix(".json"), json.dumps(json_clean(record), indent=1) + "\n")
    return record


def _classes(store: CampaignStore, crit: Any) -> tuple[np.ndarray, np.ndarray]:
    counts = store.counts()
    if counts["done"] < counts["planned"]:
        raise ConfigError(f"{store.path}: exhaustive campaign incomplete "
                          f"({counts['done']}/{counts['planned']}); run validate again")
    golden = golden_of(store)
    res = store.results()
    critical = np.array([crit.classify(Outcome.from_dict(d), golden) in CRITICAL
                         for _, d in res], dtype=bool)
    bits = np.array([pf.fault.bits[0] for pf, _ in res], dtype=np.int64)
    return critical, bits


def load_validations(run: str | Path) -> list[dict[str, Any]]:
    """Every ``RUN/validate/*.json`` record (for the report), by layer name."""
    out = []
    for p in sorted((Path(run) / VALIDATE_DIR).glob("*.json")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and rec.get("schema") == SCHEMA:
            out.append(rec)
    return out


def coverage_table(record: dict[str, Any], scopes: Sequence[str] = ("layer", "layer×bit")
                   ) -> list[dict[str, Any]]:
    """The rows of ``record`` for ``scopes`` (designs), by margin."""
    return [r for r in record["rows"] if r["scope"] in scopes]
