"""RA sample store: ``RUN/ra.sqlite`` (separate from the campaign store).

Tables: ``meta`` (model/data/task fingerprints), ``site_acc`` (accuracy of every site ever
injected: a site drawn again, or by a resumed or re-weighted estimation, is never re-run),
``streams`` (one per estimation setting: hardware, estimator, proposal, seed, ...) and
``samples`` (per stream, in draw order: the site, its proposal probability ``q``, its
probability ``p`` under the stream's exposure model and its accuracy). Samples of one stream
can be re-weighted under another exposure model (``w' = P'(s)/q(s)``) without injecting.

>>> store = RAStore(tmp / "ra.sqlite", {"model": "m"})  # doctest: +SKIP
>>> evaluate = CachedEvaluator(engine_evaluate, store)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from flipguard.errors import FlipguardError
from flipguard.ra.distribution import Sites

__all__ = ["STORE_FILE", "RAStore", "RAStoreError", "CachedEvaluator"]

STORE_FILE = "ra.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS site_acc (
    target TEXT NOT NULL, layer TEXT NOT NULL, idx INTEGER NOT NULL, bit INTEGER NOT NULL,
    accuracy REAL NOT NULL, PRIMARY KEY (target, layer, idx, bit));
CREATE TABLE IF NOT EXISTS streams (
    stream TEXT PRIMARY KEY, info TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS samples (
    stream TEXT NOT NULL, seq INTEGER NOT NULL, target TEXT NOT NULL, layer TEXT NOT NULL,
    idx INTEGER NOT NULL, bit INTEGER NOT NULL, q REAL NOT NULL, p REAL NOT NULL,
    accuracy REAL NOT NULL, PRIMARY KEY (stream, seq));
"""


class RAStoreError(FlipguardError):
    """The RA store is corrupt or belongs to another model, dataset or task."""


class RAStore:
    """Handle on ``ra.sqlite``; ``fingerprints`` must match the stored ones (``fresh``:
    discard a store of something else)."""

    def __init__(self, path: str | Path, fingerprints: dict[str, str] | None = None,
                 fresh: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fresh:
            for suffix in ("", "-wal", "-shm"):
                Path(str(self.path) + suffix).unlink(missing_ok=True)
        try:
            self.con = sqlite3.connect(str(self.path), timeout=60.0, isolation_level=None)
            self.con.execute("PRAGMA journal_mode=WAL")
            self.con.execute("PRAGMA synchronous=NORMAL")  # WAL: safe against crashes
            self.con.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise RAStoreError(f"{self.path}: not a usable RA store ({exc})") from None
        self._cache: dict[tuple[str, str, int, int], float] | None = None
        if fingerprints:
            self._check(fingerprints)

    def _check(self, fps: dict[str, str]) -> None:
        have = dict(self.con.execute("SELECT key, value FROM meta").fetchall())
        for key, value in fps.items():
            old = have.get(f"fp_{key}")
            if old is not None and old != str(value):
                raise RAStoreError(f"{self.path}: recorded for another {key} (fingerprint "
                                   f"mismatch); use --fresh to start over")
        with self.con:
            self.con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                 [(f"fp_{k}", str(v)) for k, v in fps.items()])

    def close(self) -> None:
        self.con.close()

    # ------------------------------------------------------------------ site accuracies
    def cached(self, sites: Sites) -> np.ndarray:
        """Stored accuracy of each site (NaN where never injected)."""
        if self._cache is None:
            self._cache = {(t, ly, int(i), int(b)): float(a) for t, ly, i, b, a in
                           self.con.execute("SELECT * FROM site_acc")}
        return np.array([self._cache.get(r, np.nan) for r in sites.records()], dtype=float)

    def put(self, sites: Sites, acc: np.ndarray) -> None:
        rows = [(*r, float(a)) for r, a in zip(sites.records(), acc, strict=True)]
        with self.con:
            self.con.executemany("INSERT OR REPLACE INTO site_acc VALUES (?, ?, ?, ?, ?)", rows)
        if self._cache is not None:
            self._cache.update({r[:4]: r[4] for r in rows})

    # ------------------------------------------------------------------ sample streams
    def open_stream(self, stream: str, info: dict[str, Any]) -> int:
        """Register ``stream`` (idempotent); returns how many samples it already has."""
        with self.con:
            self.con.execute("INSERT OR IGNORE INTO streams VALUES (?, ?, ?)",
                             (stream, json.dumps(info, sort_keys=True), time.time()))
        return int(self.con.execute("SELECT COUNT(*) FROM samples WHERE stream = ?",
                                    (stream,)).fetchone()[0])

    def recorder(self, stream: str) -> Callable[[int, Sites, np.ndarray, np.ndarray,
                                                 np.ndarray], None]:
        """A ``record`` callback for :func:`~flipguard.ra.estimators.estimate_ra` that adds
        the samples not stored yet (resumed runs redraw the stored ones)."""

        def record(first: int, sites: Sites, q: np.ndarray, p: np.ndarray,
                   acc: np.ndarray) -> None:
            rows = [(stream, first + j, *r, float(q[j]), float(p[j]), float(acc[j]))
                    for j, r in enumerate(sites.records())]
            with self.con:
                self.con.executemany(
                    "INSERT OR IGNORE INTO samples VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

        return record

    def streams(self) -> list[dict[str, Any]]:
        """Every stream: its key, info and sample count."""
        rows = self.con.execute(
            "SELECT s.stream, s.info, s.created, COUNT(x.seq) FROM streams s LEFT JOIN "
            "samples x ON x.stream = s.stream GROUP BY s.stream ORDER BY s.created").fetchall()
        return [{"stream": k, "info": json.loads(i), "created": c, "samples": int(n)}
                for k, i, c, n in rows]

    def samples(self, stream: str) -> tuple[Sites, np.ndarray, np.ndarray, np.ndarray]:
        """``(sites, q, p, accuracy)`` of a stream in draw order."""
        rows = self.con.execute(
            "SELECT target, layer, idx, bit, q, p, accuracy FROM samples WHERE stream = ? "
            "ORDER BY seq", (stream,)).fetchall()
        sites = Sites.from_records([r[:4] for r in rows])
        cols = np.array([r[4:] for r in rows], dtype=float).reshape(-1, 3)
        return sites, cols[:, 0], cols[:, 1], cols[:, 2]


class CachedEvaluator:
    """Wrap an evaluator so every site is injected at most once per store; ``injected``
    counts the sites this wrapper actually evaluated.

    >>> acc = CachedEvaluator(evaluate, store)(sites)  # doctest: +SKIP
    """

    def __init__(self, evaluate: Callable[[Sites], np.ndarray], store: RAStore) -> None:
        self.evaluate, self.store, self.injected = evaluate, store, 0

    def __call__(self, sites: Sites) -> np.ndarray:
        acc = self.store.cached(sites)
        missing = np.flatnonzero(np.isnan(acc))
        if missing.size:
            recs = sites.records()
            first: dict[tuple, int] = {}
            for j in missing:
                first.setdefault(recs[j], int(j))
            todo = sites.take(np.array(sorted(first.values()), dtype=np.int64))
            new = np.asarray(self.evaluate(todo), dtype=float)
            self.store.put(todo, new)
            self.injected += len(todo)
            got = dict(zip(todo.records(), new.tolist(), strict=True))
            acc[missing] = [got[recs[j]] for j in missing]
        return acc
