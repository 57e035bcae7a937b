"""Resumable campaign store: one SQLite file per run (``RUN/campaign.sqlite``).

Tables: ``meta`` (definition: plan config, model and data fingerprints, threshold, golden
facts, flipguard version), ``strata``, ``planned`` (fault_id, stratum, fault fields, kernel,
field) and ``results`` (one row per executed fault: the ``Outcome.to_dict()`` fields as JSON).
The file is created atomically (temp file + rename); afterwards it runs in WAL mode with
``synchronous=FULL`` and results are inserted with ``INSERT OR IGNORE`` on the fault id in one
transaction per batch, so a process killed at any moment loses at most the batch in flight and
never records a fault twice.

Example::

    store = CampaignStore.create("RUN/campaign.sqlite", {"model_fingerprint": "m"}, [], [])
    store.counts()                     # {'planned': 0, 'done': 0}
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flipguard.campaign.planner import PlannedFault, PlannedStratum
from flipguard.errors import FlipguardError
from flipguard.faults import fault_from_dict, get_format
from flipguard.fileio import replacing

__all__ = ["EXPORT_FORMATS", "STORE_FILE", "CampaignStore", "StoreError", "export",
           "store_path", "writer_lock"]

STORE_FILE = "campaign.sqlite"
SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE strata (pos INTEGER PRIMARY KEY, key TEXT UNIQUE NOT NULL, data TEXT NOT NULL);
CREATE TABLE planned (
    fault_id INTEGER PRIMARY KEY, stratum TEXT NOT NULL, k INTEGER NOT NULL,
    target TEXT NOT NULL, layer TEXT NOT NULL, idx INTEGER NOT NULL, bits TEXT NOT NULL,
    kind TEXT NOT NULL, bit INTEGER NOT NULL, field TEXT NOT NULL, kernel INTEGER NOT NULL,
    round INTEGER NOT NULL DEFAULT 0, UNIQUE (stratum, k));
CREATE TABLE results (
    fault_id INTEGER PRIMARY KEY REFERENCES planned(fault_id), outcome TEXT NOT NULL,
    seconds REAL, created REAL);
"""
EXPORT_FORMATS = ("csv", "parquet")
FAULT_COLUMNS = ("fault_id", "stratum", "k", "target", "layer", "idx", "bits", "kind", "bit",
                 "field", "kernel", "round")


class StoreError(FlipguardError):
    """A campaign store is missing, corrupt or belongs to another model/dataset/plan."""


def store_path(run_or_path: str | Path) -> Path:
    """``RUN/campaign.sqlite`` for a run directory; a ``.sqlite`` path is returned as is."""
    p = Path(run_or_path)
    return p if p.suffix in (".sqlite", ".db") else p / STORE_FILE


_HELD: dict[str, list[int]] = {}  # lock file -> [fd, depth] held by this process


@contextmanager
def writer_lock(store: str | Path) -> Iterator[None]:
    """Hold the one-writer lock of a campaign store (``<store>.lock``, an exclusive
    ``flock``) for the ``with`` block. Re-entrant within a process; a second process gets a
    one-line :class:`StoreError` naming the holder's pid instead of silently racing (a
    ``--fresh`` beside a live ``campaign run`` would otherwise replace the file under it).

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "campaign.sqlite"
    >>> with writer_lock(p), writer_lock(p):
    ...     (p.parent / "campaign.sqlite.lock").exists()
    True
    """
    lock = str(Path(store)) + ".lock"
    held = _HELD.get(lock)
    if held is not None:
        held[1] += 1
        try:
            yield
        finally:
            held[1] -= 1
        return
    try:
        Path(lock).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise StoreError(f"{lock}: cannot create the store's lock file ({exc.strerror})"
                         ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StoreError(f"{store}: another flipguard process (pid {pid}) is writing this "
                         f"campaign store; wait for it to finish or stop it") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[lock] = [fd, 1]
    try:
        yield
    finally:
        del _HELD[lock]
        os.close(fd)  # releases the flock; the file stays (unlinking a lock file races)


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)


def _connect(path: Path) -> sqlite3.Connection:
    """Read-write WAL connection; a store in a read-only place opens read-only (immutable:
    nobody can be writing it), so status/cfr/export/report work on a finished campaign
    shipped in a read-only directory."""
    if not _writable(path):
        wal = Path(str(path) + "-wal")
        live = wal.is_file() and wal.stat().st_size > 0  # un-checkpointed rows: read them too
        return sqlite3.connect(f"{path.resolve().as_uri()}?{'mode=ro' if live else 'immutable=1'}",
                               uri=True, isolation_level=None)
    con = sqlite3.connect(str(path), timeout=60.0, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.execute("PRAGMA foreign_keys=ON")
    return con


def _planned_row(pf: PlannedFault, fmt: Any) -> tuple:
    f = pf.fault
    return (pf.fault_id, pf.stratum, pf.k, f.target, f.layer, f.index,
            ",".join(map(str, f.bits)), f.kind, f.bits[0], fmt.field(f.bits[0]), pf.kernel,
            pf.round)


class CampaignStore:
    """Handle on a campaign SQLite file (see module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise StoreError(f"{self.path}: no campaign store (run `flipguard campaign run`)")
        try:
            self.con = _connect(self.path)
            self._meta = {k: json.loads(v) for k, v in
                          self.con.execute("SELECT key, value FROM meta")}
        except (sqlite3.DatabaseError, json.JSONDecodeError) as exc:
            raise StoreError(f"{self.path}: not a readable campaign store ({exc})") from None
        self.fmt = get_format(self.definition.get("plan", {}).get("fmt", "fp32"))

    # ---- creation -------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, definition: dict[str, Any],
               strata: Sequence[PlannedStratum], faults: Sequence[PlannedFault],
               replace: bool = False) -> CampaignStore:
        """Write a new store atomically; an existing file is an error unless ``replace``."""
        path = Path(path)
        if path.exists() and not replace:
            raise StoreError(f"{path}: a campaign store already exists (use --fresh)")
        with writer_lock(path), replacing(path, suffix=".tmp") as tmp:
            con = sqlite3.connect(tmp, isolation_level=None)
            con.executescript(SCHEMA)
            con.execute("BEGIN")
            definition = {**definition, "created": definition.get("created", time.time())}
            con.executemany("INSERT INTO meta VALUES (?, ?)",
                            [("definition", json.dumps(definition, sort_keys=True))])
            con.executemany("INSERT INTO strata VALUES (?, ?, ?)",
                            [(i, s.key, json.dumps(s.to_dict())) for i, s in enumerate(strata)])
            fmt = get_format(definition.get("plan", {}).get("fmt", "fp32"))
            con.executemany(f"INSERT INTO planned VALUES ({','.join('?' * 12)})",
                            [_planned_row(pf, fmt) for pf in faults])
            con.execute("COMMIT")
            con.close()
            for suffix in ("-wal", "-shm"):
                Path(str(path) + suffix).unlink(missing_ok=True)
        return cls(path)

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> CampaignStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- definition -----------------------------------------------------------------------
    @property
    def definition(self) -> dict[str, Any]:
        """The campaign definition dict written at creation (plus later meta updates)."""
        return self._meta.get("definition", {})

    def set_meta(self, key: str, value: Any) -> None:
        """Store a JSON-serialisable value under ``key`` (e.g. "golden")."""
        with self._tx():
            self.con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                             (key, json.dumps(value, sort_keys=True)))
        self._meta[key] = value

    def get_meta(self, key: str, default: Any = None) -> Any:
        return self._meta.get(key, default)

    def check(self, **expected: str | None) -> None:
        """Refuse a store made for another ``model``, ``data``, ``task`` or ``plan`` (compared
        with the recorded ``<name>_fingerprint`` / ``plan_digest``), in one line."""
        d = self.definition
        hints = {"model": "another model", "data": "another dataset",
                 "task": "another threshold/scorer/format", "plan": "a different plan"}
        for what, mine in expected.items():
            theirs = d.get("plan_digest" if what == "plan" else f"{what}_fingerprint")
            if mine is not None and theirs is not None and mine != theirs:
                detail = f"{what} fingerprint {str(theirs)[:12]} != {str(mine)[:12]}"
                if what == "plan" and isinstance(d.get("plan"), dict):
                    plan = {"t": "exact", **d["plan"]}
                    if plan.get("fault_model") == "stuck-at":
                        plan.setdefault("stuck_at", "all")
                    detail = "stored: " + " ".join(
                        f"--{k.replace('_', '-')} {v}" for k, v in plan.items()
                        if k in ("strata", "error", "confidence", "p", "fault_model", "seed",
                                 "t", "stuck_at", "rounding") and v is not None)
                raise StoreError(f"{self.path}: made for {hints.get(what, what)} ({detail}); "
                                 f"use --fresh to start over")

    # ---- plan ----------------------------------------------------------------------------
    def strata(self) -> list[PlannedStratum]:
        """Strata in plan order (``n`` = planned faults now, including top-ups)."""
        out = [PlannedStratum.from_dict(json.loads(d)) for (d,) in
               self.con.execute("SELECT data FROM strata ORDER BY pos")]
        counts = dict(self.con.execute("SELECT stratum, COUNT(*) FROM planned GROUP BY stratum"))
        for s in out:
            s.n = int(counts.get(s.key, 0))
        return out

    def add_planned(self, faults: Iterable[PlannedFault],
                    meta: dict[str, Any] | None = None) -> int:
        """Append planned faults (idempotent by fault id) and set ``meta`` entries in the same
        transaction; returns rows inserted."""
        rows = [_planned_row(pf, self.fmt) for pf in faults]
        items = [(k, json.dumps(v, sort_keys=True)) for k, v in (meta or {}).items()]
        with self._tx():
            before = self.con.total_changes
            self.con.executemany(f"INSERT OR IGNORE INTO planned VALUES ({','.join('?' * 12)})",
                                 rows)
            added = self.con.total_changes - before
            self.con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", items)
        self._meta.update(meta or {})
        return added

    def next_fault_id(self) -> int:
        (m,) = self.con.execute("SELECT COALESCE(MAX(fault_id), -1) FROM planned").fetchone()
        return int(m) + 1

    def planned(self, pending_only: bool = False, limit: int | None = None,
                ids: tuple[int, int] | None = None) -> list[PlannedFault]:
        """Planned faults by id; ``pending_only``: those without a result yet; ``ids``: only
        fault ids in ``[lo, hi)``."""
        where = ["r.fault_id IS NULL"] if pending_only else []
        if ids is not None:
            where.append(f"p.fault_id >= {int(ids[0])} AND p.fault_id < {int(ids[1])}")
        sql = (f"SELECT {', '.join('p.' + c for c in FAULT_COLUMNS)} FROM planned p"
               + (" LEFT JOIN results r USING (fault_id)" if pending_only else "")
               + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY p.fault_id")
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [_planned_fault(row) for row in self.con.execute(sql)]

    def pending_ids(self) -> list[int]:
        """Ids of the planned faults without a result, ascending."""
        return [int(i) for (i,) in self.con.execute(
            "SELECT p.fault_id FROM planned p LEFT JOIN results r USING (fault_id) "
            "WHERE r.fault_id IS NULL ORDER BY p.fault_id")]

    def faults_by_id(self, ids: Iterable[int]) -> list[PlannedFault]:
        """Planned faults with the given ids, by id."""
        wanted = sorted({int(i) for i in ids})
        out: list[PlannedFault] = []
        for a in range(0, len(wanted), 500):
            part = wanted[a:a + 500]
            out += [_planned_fault(r) for r in self.con.execute(
                f"SELECT {', '.join(FAULT_COLUMNS)} FROM planned WHERE fault_id IN "
                f"({','.join('?' * len(part))}) ORDER BY fault_id", part)]
        return out

    def pending_pages(self, page: int = 65536, limit: int | None = None
                      ) -> Iterator[list[PlannedFault]]:
        """Pending faults in windows of ``page`` fault ids (bounded memory), at most
        ``limit`` in all; each page is read completely before it is yielded."""
        left = limit
        for lo in range(0, self.next_fault_id(), page):
            if left is not None and left <= 0:
                return
            rows = self.planned(pending_only=True, limit=left, ids=(lo, lo + page))
            if left is not None:
                left -= len(rows)
            if rows:
                yield rows

    def pending(self, limit: int | None = None) -> list[PlannedFault]:
        """Planned faults not yet executed, by fault id."""
        return self.planned(pending_only=True, limit=limit)

    def done_ks(self) -> dict[str, list[int]]:
        """Stratum-local numbers ``k`` already planned, per stratum (for top-ups)."""
        out: dict[str, list[int]] = {}
        for key, k in self.con.execute("SELECT stratum, k FROM planned"):
            out.setdefault(key, []).append(int(k))
        return out

    # ---- results --------------------------------------------------------------------------
    def add_results(self, rows: Iterable[tuple[int, dict[str, Any]]],
                    seconds: float | None = None) -> int:
        """Record ``(fault_id, outcome_dict)`` rows in one transaction; faults already done
        are ignored. Returns rows inserted."""
        now = time.time()
        data = [(int(fid), json.dumps(out, sort_keys=True), seconds, now) for fid, out in rows]
        with self._tx():
            before = self.con.total_changes
            self.con.executemany("INSERT OR IGNORE INTO results VALUES (?, ?, ?, ?)", data)
            return self.con.total_changes - before

    def counts(self) -> dict[str, int]:
        """``{"planned": ..., "done": ...}``."""
        (p,) = self.con.execute("SELECT COUNT(*) FROM planned").fetchone()
        (d,) = self.con.execute("SELECT COUNT(*) FROM results").fetchone()
        return {"planned": int(p), "done": int(d)}

    def done_by_stratum(self) -> dict[str, int]:
        """Executed faults per stratum key."""
        return {k: int(c) for k, c in self.con.execute(
            "SELECT p.stratum, COUNT(*) FROM planned p JOIN results r USING (fault_id) "
            "GROUP BY p.stratum")}

    def results(self) -> list[tuple[PlannedFault, dict[str, Any]]]:
        """Executed faults with their outcome dicts, by fault id."""
        sql = (f"SELECT {', '.join('p.' + c for c in FAULT_COLUMNS)}, r.outcome FROM planned p "
               "JOIN results r USING (fault_id) ORDER BY p.fault_id")
        return [(_planned_fault(row[:-1]), json.loads(row[-1])) for row in self.con.execute(sql)]

    def compute_seconds(self) -> tuple[float, int]:
        """Summed per-process seconds of the executed faults that recorded a time, and how
        many did (older stores and parallel runs before timing existed hold none)."""
        total, n = self.con.execute("SELECT COALESCE(SUM(seconds), 0), COUNT(seconds) "
                                    "FROM results").fetchone()
        return float(total), int(n)

    def rows(self) -> list[dict[str, Any]]:
        """Flat rows (fault fields + outcome fields) for export, by fault id."""
        sql = (f"SELECT {', '.join('p.' + c for c in FAULT_COLUMNS)}, r.outcome, r.seconds "
               "FROM planned p JOIN results r USING (fault_id) ORDER BY p.fault_id")
        out = []
        for row in self.con.execute(sql):
            d = dict(zip(FAULT_COLUMNS, row[:-2], strict=True))
            d["index"] = d.pop("idx")
            for key, val in json.loads(row[-2]).items():
                col = key if key not in d else f"outcome_{key}"
                d[col] = json.dumps(val) if isinstance(val, (list, dict)) else val
            d["seconds"] = row[-1]
            out.append(d)
        return out

    def _tx(self):
        return _Transaction(self.con, self.path)


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error)."""

    def __init__(self, con: sqlite3.Connection, path: Path) -> None:
        self.con, self.path = con, path

    def __enter__(self) -> None:
        try:
            self.con.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise StoreError(f"{self.path}: cannot write the campaign store ({exc})") from None

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            try:
                self.con.execute("COMMIT")
                return
            except sqlite3.DatabaseError as err:
                exc = err
        try:
            self.con.execute("ROLLBACK")
        except sqlite3.DatabaseError:
            pass
        if isinstance(exc, sqlite3.OperationalError):  # read-only place, full disk, ...
            raise StoreError(f"{self.path}: cannot write the campaign store ({exc})") from None


def _planned_fault(row: Sequence[Any]) -> PlannedFault:
    d = dict(zip(FAULT_COLUMNS, row, strict=True))
    fault = fault_from_dict({"target": d["target"], "layer": d["layer"], "index": d["idx"],
                             "bits": d["bits"], "kind": d["kind"]})
    return PlannedFault(int(d["fault_id"]), d["stratum"], int(d["k"]), fault, int(d["kernel"]),
                        int(d["round"]))


def export(store: CampaignStore, out: str | Path, fmt: str = "csv") -> Path:
    """Write the executed faults (``store.rows()``) to ``out`` as CSV or Parquet, atomically.

    Example: ``export(store, "RUN/faults.parquet", "parquet")``.
    """
    if fmt not in EXPORT_FORMATS:
        raise StoreError(f"format: expected one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    out = Path(out)
    rows = store.rows()
    columns = list(dict.fromkeys(k for r in rows for k in r)) or list(FAULT_COLUMNS)
    with replacing(out, suffix=".tmp") as tmp:
        if fmt == "csv":
            import csv

            with open(tmp, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=columns, restval="")
                writer.writeheader()
                writer.writerows(rows)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows]) \
                if rows else pa.table({c: pa.array([], pa.string()) for c in columns})
            pq.write_table(table, tmp)
    return out
