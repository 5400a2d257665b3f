"""The results store: one SQLite file (standard library ``sqlite3``, WAL mode) per project.

Where: ``--store PATH`` on the CLI, else ``$UNMASK_STORE``, else ``results/unmask.sqlite``
relative to the working directory (:func:`default_path`), so ``unmask run`` followed by
``unmask leaderboard`` in the same folder just works.

Tables (schema version :data:`SCHEMA_VERSION`, recorded in ``meta``):

* ``runs``         one row per suite run: suite name and its effective configuration, seed,
  git commit, library versions, device, world size, start/end, status;
* ``units``        the finished units of work of a run (an attacked model x threat, a masking
  diagnosis, an explanation, a backdoor evaluation): what ``--resume`` skips;
* ``cells``        model x threat x attack: n, clean and robust counts and accuracies, the
  95% Wilson interval, attacked/broken counts, forward/backward passes, wall time, the
  model's fingerprint (``checkpoint_sha256``: ``zoo.fingerprint``, weights and structure).
  ``attack`` is an ensemble member (robust accuracy after the cascade reached it) or
  ``worst-case`` (after the whole ensemble);
* ``samples``      per sample: label, clean correctness, robustness, which attack broke it and
  the best margin found;
* ``masking``      the masking diagnosis per model x threat (verdict, failing checks, report);
* ``explanations`` explanation metrics per model x method x metric (a number, or a status);
* ``explanation_maps`` a few attribution maps per model x method, for the report's figures;
* ``backdoor``     backdoor metrics per model;
* ``curves``       the security-curve search per model x norm (``[curves]`` of the suite): the
  eps grid and, per sample, the smallest grid eps at which an attack broke it (JSON lists; see
  :mod:`unmask.bench.suite.curves`). Added after schema 1 was released: a store without it gets it
  on the first writable open, and a read-only store without it reads as having no curves;
* ``certified``    per model x threat x certification method (``[certify]``): n, certified /
  broken / unknown counts, certified robust accuracy, seconds, status (``ok`` or ``not
  supported``/``unavailable``) and the reason;
* ``certified_samples`` per sample and method: ``certified`` / ``broken`` / ``unknown``, the
  proven lower bound of the margin, and whether the MILP found a counterexample (verified on
  the model in fp32; the leaderboard counts it as broken in the row's worst case);
* ``sections``     anything the suite asked for that did not run: status ``unavailable`` (a
  sibling feature not installed, an optional zoo entry missing) or ``error`` (it raised; the
  reason is the message; a resumed run tries it again and clears it when it succeeds).

Every unit is written in one transaction (``BEGIN IMMEDIATE``), so an interrupted run loses
nothing finished and concurrent writers serialise on SQLite's lock instead of corrupting the
file. A file that is not SQLite, is damaged, or belongs to another application raises
:class:`StoreError` with a message that says so.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Store", "StoreError", "unit_key", "SCHEMA_VERSION", "default_path", "wilson", "open_store",
           "WORST_CASE"]

SCHEMA_VERSION = 1
APPLICATION = "unmask"
WORST_CASE = "worst-case"
DEFAULT_RELATIVE = Path("results") / "unmask.sqlite"
# Seconds a writer waits for another writer's transaction before giving up.
BUSY_TIMEOUT_S = 120.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id INTEGER PRIMARY KEY AUTOINCREMENT,
    suite TEXT NOT NULL,
    config TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    seed INTEGER NOT NULL,
    quick INTEGER NOT NULL DEFAULT 0,
    git_commit TEXT,
    versions TEXT NOT NULL,
    device TEXT NOT NULL,
    world_size INTEGER NOT NULL DEFAULT 1,
    host TEXT,
    started REAL NOT NULL,
    finished REAL,
    status TEXT NOT NULL,
    paused REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS units (
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    unit TEXT NOT NULL,
    wall_seconds REAL NOT NULL,
    finished REAL NOT NULL,
    PRIMARY KEY (run_id, unit)
);
CREATE TABLE IF NOT EXISTS cells (
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    model TEXT NOT NULL,
    norm TEXT NOT NULL,
    eps REAL NOT NULL,
    attack TEXT NOT NULL,
    position INTEGER NOT NULL,
    n INTEGER NOT NULL,
    clean_correct INTEGER NOT NULL,
    robust INTEGER NOT NULL,
    clean_accuracy REAL NOT NULL,
    robust_accuracy REAL NOT NULL,
    ci_low REAL NOT NULL,
    ci_high REAL NOT NULL,
    robust_accuracy_std REAL NOT NULL DEFAULT 0,
    attacked INTEGER NOT NULL,
    broken INTEGER NOT NULL,
    forwards INTEGER NOT NULL,
    backwards INTEGER NOT NULL,
    wall_seconds REAL NOT NULL,
    stochastic INTEGER NOT NULL DEFAULT 0,
    checkpoint_sha256 TEXT,
    model_source TEXT,
    PRIMARY KEY (run_id, model, norm, eps, attack)
);
CREATE TABLE IF NOT EXISTS samples (
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    model TEXT NOT NULL,
    norm TEXT NOT NULL,
    eps REAL NOT NULL,
    sample INTEGER NOT NULL,
    label INTEGER NOT NULL,
    clean_correct INTEGER NOT NULL,
    robust INTEGER NOT NULL,
    broken_by TEXT,
    margin REAL NOT NULL,
    PRIMARY KEY (run_id, model, norm, eps, sample)
);
CREATE TABLE IF NOT EXISTS masking (
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    model TEXT NOT NULL,
    norm TEXT NOT NULL,
    eps REAL NOT NULL,
    verdict TEXT NOT NULL,
    failing TEXT NOT NULL,
    next_attack TEXT,
    robust_accuracy_before REAL,
    robust_accuracy_after REAL,
    n INTEGER NOT NULL,
    wall_seconds REAL NOT NULL,
    report TEXT NOT NULL,
    PRIMARY KEY (run_id, model, norm, eps)
);
CREATE TABLE IF NOT EXISTS explanations (
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    model TEXT NOT NULL,
    method TEXT NOT NULL,
    metric TEXT NOT NULL,
    value REAL,
    n INTEGER NOT NULL,
    details TEXT NOT NULL,
    PRIMARY KEY (run_id, model, method, metric)
);
CREATE TABLE IF NOT EXISTS explanation_maps (
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    model TEXT NOT NULL,
    method TEXT NOT NULL,
    inputs TEXT NOT NULL,
    maps TEXT NOT NULL,
    PRIMARY KEY (run_id, model, method)
);
CREATE TABLE IF NOT EXISTS backdoor (
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    model TEXT NOT NULL,
    metric TEXT NOT NULL,
    value REAL,
    PRIMARY KEY (run_id, model, metric)
);
CREATE TABLE IF NOT EXISTS curves (
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    model TEXT NOT NULL,
    norm TEXT NOT NULL,
    grid TEXT NOT NULL,
    broken_at TEXT NOT NULL,
    n INTEGER NOT NULL,
    attacks TEXT NOT NULL,
    forwards INTEGER NOT NULL,
    backwards INTEGER NOT NULL,
    wall_seconds REAL NOT NULL,
    PRIMARY KEY (run_id, model, norm)
);
CREATE TABLE IF NOT EXISTS certified (
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    model TEXT NOT NULL,
    norm TEXT NOT NULL,
    eps REAL NOT NULL,
    method TEXT NOT NULL,
    n INTEGER NOT NULL,
    certified INTEGER,
    broken INTEGER,
    unknown INTEGER,
    certified_accuracy REAL,
    seconds REAL NOT NULL DEFAULT 0,
    status TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (run_id, model, norm, eps, method)
);
CREATE TABLE IF NOT EXISTS certified_samples (
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    model TEXT NOT NULL,
    norm TEXT NOT NULL,
    eps REAL NOT NULL,
    method TEXT NOT NULL,
    sample INTEGER NOT NULL,
    status TEXT NOT NULL,
    lower REAL,
    counterexample INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, model, norm, eps, method, sample)
);
CREATE TABLE IF NOT EXISTS sections (
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    model TEXT NOT NULL,
    section TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (run_id, model, section, detail)
);
"""

_TABLES = {"meta", "runs", "units", "cells", "samples", "masking", "explanations",
           "explanation_maps", "backdoor", "sections"}
# Tables added within schema 1 (additive: older unmask versions ignore them). A writable open
# creates a missing one; a read-only store without one reads it as empty.
_ADDED_TABLES = {"curves", "certified", "certified_samples"}


def _when_unlocked(fn, timeout: float | None = None):
    """``fn()``, retried while SQLite says the database is locked or busy (up to the busy
    timeout)."""
    deadline = time.monotonic() + (BUSY_TIMEOUT_S if timeout is None else timeout)
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as err:
            text = str(err).lower()
            if ("locked" not in text and "busy" not in text) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)



def unit_key(section: str, model: str, part: str | None = None) -> str:
    """The key of a unit of work in the store's ``units`` table (what ``--resume`` skips):
    ``"<section>/<model>"`` or ``"<section>/<model>/<part>"``, where ``part`` is a threat
    key (:func:`unmask.bench.core.threat_key`, ``"linf:0.3"``) or, for a curve, a norm."""
    return f"{section}/{model}" if part is None else f"{section}/{model}/{part}"

class StoreError(Exception):
    """The store file cannot be used: not SQLite, damaged, another application's, or newer."""


def default_path(explicit: str | os.PathLike | None = None) -> Path:
    """``explicit``, else ``$UNMASK_STORE``, else ``results/unmask.sqlite`` under the cwd."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("UNMASK_STORE")
    return Path(env) if env else Path.cwd() / DEFAULT_RELATIVE


def wilson(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% by default).

    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0 or n
    successes, which is where robust accuracies of broken or perfect models live.
    """
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # The interval contains p exactly; rounding may put an end a hair inside it at 0 or n.
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=_json_default)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "value"):  # enums
        return obj.value
    return str(obj)


@dataclass
class Run:
    """A row of ``runs`` with its JSON fields decoded."""

    run_id: int
    suite: str
    config: dict[str, Any]
    config_hash: str
    seed: int
    quick: bool
    git_commit: str | None
    versions: dict[str, str]
    device: str
    world_size: int
    host: str | None
    started: float
    finished: float | None
    status: str
    paused: float = 0.0  # seconds between an interruption and its --resume

    @property
    def wall_seconds(self) -> float | None:
        """Seconds the run ran: start to finish, less the pauses before its resumes."""
        return None if self.finished is None else self.finished - self.started - self.paused


class Store:
    """A results store at ``path`` (created on first use).

    Usage::

        with Store.open("results/unmask.sqlite") as store:
            run_id = store.start_run(...)
            with store.unit(run_id, "attack/mnist-cnn/linf:0.3") as tx:
                tx.add_cells(...)

    ``readonly`` opens an existing file without creating or migrating anything.
    """

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        _check_path(self.path, must_exist=readonly)
        if not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # Readers open the file normally and switch to query_only: a mode=ro connection
        # cannot take part in WAL recovery. The file is never opened outside SQLite (see
        # _check_path), and a connection is closed on every failed open (see below).
        try:
            self.conn = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_S,
                                        isolation_level=None)
        except sqlite3.Error as err:
            raise StoreError(f"cannot open the results store {self.path} ({err}); check the "
                             "path and its permissions, or pass another --store PATH") from None
        try:
            self.conn.row_factory = sqlite3.Row
            self.conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            # A read first: a file that is not SQLite fails here, before anything is written.
            self.conn.execute("PRAGMA schema_version").fetchone()
            if readonly:
                self.conn.execute("PRAGMA query_only = ON")
            else:
                # Switching to WAL needs an exclusive lock, and SQLite does not always call
                # the busy handler for it: several processes opening a new store at once get
                # "database is locked" at once. Wait for it like any other lock.
                _when_unlocked(lambda: self.conn.execute("PRAGMA journal_mode = WAL"))
                self.conn.execute("PRAGMA synchronous = NORMAL")
            self._check_integrity()
            if not readonly:
                self._init_schema()
            self._check_owner()
        except BaseException as err:
            # Close on every failure, not only SQLite's: a Python sqlite3 connection sits in a
            # reference cycle (its statement cache), so a dropped one stays open until the
            # cyclic collector runs, and an open, forgotten connection is what let another
            # process delete the WAL under this one (see _check_path).
            with contextlib.suppress(Exception):
                self.conn.close()
            if isinstance(err, sqlite3.DatabaseError):
                raise StoreError(self._damaged_message(err)) from None
            raise

    def _damaged_message(self, err: sqlite3.DatabaseError) -> str:
        if getattr(err, "sqlite_errorcode", None) == sqlite3.SQLITE_NOTADB or \
                "not a database" in str(err):
            return (f"{self.path} is not an unmask results store: it is not an SQLite database "
                    "(wrong file header). Move it away or pass another --store PATH.")
        return (f"{self.path} is not a usable unmask results store: the file is damaged "
                f"({err}). Move it away or pass another --store PATH.")

    @classmethod
    def open(cls, path: str | os.PathLike | None = None, *, readonly: bool = False) -> Store:
        """The store at ``path`` (default: ``$UNMASK_STORE``, else ``results/unmask.sqlite``),
        created on first use unless ``readonly``.
        """
        return cls(default_path(path), readonly=readonly)

    def close(self) -> None:
        """Close the database connection."""
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- opening checks -----------------------------------------------------------------

    def _check_integrity(self) -> None:
        row = self.conn.execute("PRAGMA quick_check").fetchone()
        if row is None or row[0] != "ok":
            raise StoreError(f"{self.path} is damaged (SQLite quick_check: "
                             f"{row[0] if row else 'no answer'}); move it away or pass another "
                             "--store PATH")

    def _tables(self) -> set[str]:
        rows = self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {r[0] for r in rows if not r[0].startswith("sqlite_")}

    def _init_schema(self) -> None:
        tables = self._tables()
        if tables and "meta" not in tables:
            raise StoreError(self._foreign_message(tables))
        if "meta" in tables:
            missing = _ADDED_TABLES - tables
            if missing:
                self._add_tables(missing)
            return
        with self._transaction():
            if self._tables():  # another process created it while we waited
                return
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self.conn.execute(statement)
            self.conn.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                                  [("application", APPLICATION),
                                   ("schema_version", str(SCHEMA_VERSION)),
                                   ("created", str(time.time()))])

    def _add_tables(self, names: set[str]) -> None:
        """Create the tables of ``names`` from the schema (a store written before they were
        added), in one transaction; another process doing the same is harmless."""
        with self._transaction():
            for statement in _SCHEMA.split(";"):
                head = statement.strip().split("(")[0].split()
                if head and head[-1] in names:
                    self.conn.execute(statement)

    def _foreign_message(self, tables: Iterable[str]) -> str:
        return (f"{self.path} is an SQLite database of another application (tables: "
                f"{', '.join(sorted(tables))}), not an unmask results store; pass another "
                "--store PATH")

    def _check_owner(self) -> None:
        tables = self._tables()
        if not tables:
            if self.readonly:
                raise StoreError(f"{self.path} is an empty database, not an unmask results "
                                 "store")
            return
        if "meta" not in tables:
            raise StoreError(self._foreign_message(tables))
        meta = dict(self.conn.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("application") != APPLICATION:
            raise StoreError(self._foreign_message(tables))
        version = int(meta.get("schema_version", "0"))
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path} was written by a newer unmask (store schema "
                             f"{version}, this version reads {SCHEMA_VERSION}); upgrade unmask")
        if version < SCHEMA_VERSION:  # pragma: no cover - no older schema exists yet
            raise StoreError(f"{self.path} has the old store schema {version}; this unmask "
                             f"writes schema {SCHEMA_VERSION}")
        missing = _TABLES - tables
        if missing:
            raise StoreError(f"{self.path} is an incomplete unmask store (missing tables: "
                             f"{', '.join(sorted(missing))})")
        columns = {r[1] for r in self.conn.execute("PRAGMA table_info(runs)")}
        if "paused" not in columns and not self.readonly:  # a store of before the column
            with self._transaction() as conn:
                conn.execute("ALTER TABLE runs ADD COLUMN paused REAL NOT NULL DEFAULT 0")

    # --- transactions ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        if self.readonly:
            raise StoreError(f"{self.path} was opened read-only")
        # BEGIN and COMMIT inside the try, and the rollback keyed on the connection's own
        # state: a Ctrl-C can land between any two statements here (right after BEGIN, or
        # right after COMMIT), and must leave neither an open transaction behind (the run's
        # "interrupted" status could then not be written) nor a rollback of a committed unit.
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            yield self.conn
            self.conn.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def unit(self, run_id: int, unit: str, wall_seconds: float = 0.0) -> Iterator[UnitWriter]:
        """Write everything of one finished unit of work atomically, and mark it finished."""
        with self._transaction() as conn:
            writer = UnitWriter(conn, run_id)
            yield writer
            conn.execute("INSERT OR REPLACE INTO units(run_id, unit, wall_seconds, finished) "
                         "VALUES (?, ?, ?, ?)", (run_id, unit, float(wall_seconds), time.time()))

    # --- runs -------------------------------------------------------------------------------

    def start_run(self, *, suite: str, config: Mapping[str, Any], config_hash: str, seed: int,
                  quick: bool, git_commit: str | None, versions: Mapping[str, str], device: str,
                  world_size: int = 1, host: str | None = None) -> int:
        """Record a new run (status ``running``) with its provenance; returns its id."""
        with self._transaction() as conn:
            cur = conn.execute(
                "INSERT INTO runs(suite, config, config_hash, seed, quick, git_commit, versions,"
                " device, world_size, host, started, status) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'running')",
                (suite, _json(config), config_hash, int(seed), int(bool(quick)), git_commit,
                 _json(dict(versions)), device, int(world_size), host, time.time()))
            return int(cur.lastrowid)

    def set_status(self, run_id: int, status: str, *, finished: bool = True) -> None:
        """Set a run's status (``finished``, ``failed``, ...), stamping the finish time if
        ``finished``.
        """
        with self._transaction() as conn:
            conn.execute("UPDATE runs SET status = ?, finished = ? WHERE run_id = ?",
                         (status, time.time() if finished else None, run_id))

    def reopen_run(self, run_id: int, *, device: str, world_size: int) -> Run:
        """Mark an interrupted (or failed) run as running again, for ``--resume``."""
        run = self.run(run_id)
        with self._transaction() as conn:
            # The time since the interruption is a pause, not part of the run's wall time.
            pause = max(0.0, time.time() - run.finished) if run.finished is not None else 0.0
            conn.execute("UPDATE runs SET status = 'running', finished = NULL, device = ?, "
                         "world_size = ?, paused = paused + ? WHERE run_id = ?",
                         (device, world_size, pause, run_id))
        return run

    def _run_from_row(self, row: sqlite3.Row) -> Run:
        return Run(run_id=row["run_id"], suite=row["suite"], config=json.loads(row["config"]),
                   config_hash=row["config_hash"], seed=row["seed"], quick=bool(row["quick"]),
                   git_commit=row["git_commit"], versions=json.loads(row["versions"]),
                   device=row["device"], world_size=row["world_size"], host=row["host"],
                   started=row["started"], finished=row["finished"], status=row["status"],
                   paused=row["paused"] if "paused" in row.keys() else 0.0)

    def run(self, run_id: int) -> Run:
        """The :class:`Run` with id ``run_id``; ``ValueError`` naming the latest runs."""
        row = self.conn.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            known = [str(r.run_id) for r in self.runs()[-10:]]
            raise ValueError(f"no run {run_id} in {self.path}; latest runs: "
                             f"{', '.join(known) or '(none)'}")
        return self._run_from_row(row)

    def runs(self) -> list[Run]:
        """Every run, oldest first."""
        rows = self.conn.execute("SELECT * FROM runs ORDER BY run_id").fetchall()
        return [self._run_from_row(r) for r in rows]

    def latest_run(self, *, finished_only: bool = False) -> Run:
        """The newest run (or newest finished one); ``ValueError`` when there is none."""
        where = "WHERE status = 'finished'" if finished_only else ""
        row = self.conn.execute(f"SELECT * FROM runs {where} ORDER BY run_id DESC LIMIT 1"
                                ).fetchone()
        if row is None:
            raise ValueError(f"no {'finished ' if finished_only else ''}run in {self.path}; "
                             "run a suite first: unmask run")
        return self._run_from_row(row)

    def update_run_config(self, run_id: int, config: Mapping[str, Any],
                          config_hash: str) -> None:
        """Replace a run's stored suite (a resumed run that dropped or replaced models)."""
        with self._transaction() as conn:
            conn.execute("UPDATE runs SET config = ?, config_hash = ? WHERE run_id = ?",
                         (_json(config), config_hash, run_id))

    def add_section(self, run_id: int, model: str, section: str, status: str, reason: str,
                    detail: str = "") -> None:
        """Record a section that failed, in its own transaction and without finishing a unit:
        a resumed run tries it again."""
        with self._transaction() as conn:
            UnitWriter(conn, run_id).add_section(model, section, status, reason, detail)

    def clear_section(self, run_id: int, model: str, section: str, detail: str = "") -> None:
        """Forget the error an earlier attempt of a section recorded (it has now run)."""
        if self.conn.execute("SELECT 1 FROM sections WHERE run_id = ? AND model = ? AND "
                             "section = ? AND detail = ?",
                             (run_id, model, section, detail)).fetchone() is None:
            return
        with self._transaction() as conn:
            UnitWriter(conn, run_id).clear_section(model, section, detail)

    def finished_units(self, run_id: int) -> set[str]:
        """The units of a run already committed (a resumed run skips them)."""
        rows = self.conn.execute("SELECT unit FROM units WHERE run_id = ?", (run_id,))
        return {r[0] for r in rows}

    # --- reading tables -------------------------------------------------------------------

    def rows(self, table: str, run_id: int) -> list[dict[str, Any]]:
        """The rows of ``table`` for a run, as dicts in a stable order; ``ValueError`` for an
        unknown table.
        """
        if table not in (_TABLES | _ADDED_TABLES) - {"meta"}:
            raise ValueError(f"unknown table {table!r}")
        if table in _ADDED_TABLES and table not in self._tables():
            return []  # a read-only store written before the table was added
        order = {"cells": "model, norm, eps, position", "samples": "model, norm, eps, sample",
                 "certified": "model, norm, eps, method",
                 "certified_samples": "model, norm, eps, method, sample",
                 "units": "unit"}.get(table, "rowid")
        cur = self.conn.execute(f"SELECT * FROM {table} WHERE run_id = ? ORDER BY {order}",
                                (run_id,))
        return [dict(r) for r in cur.fetchall()]

    def schema_version(self) -> int:
        """The schema version the store file was written with."""
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return int(row[0]) if row else SCHEMA_VERSION


class UnitWriter:
    """Inserts the rows of one unit inside its transaction (see :meth:`Store.unit`)."""

    def __init__(self, conn: sqlite3.Connection, run_id: int) -> None:
        self.conn = conn
        self.run_id = run_id

    def add_cells(self, cells: Sequence[Mapping[str, Any]]) -> None:
        """Insert leaderboard cells (one per model x threat x attack position)."""
        cols = ("model", "norm", "eps", "attack", "position", "n", "clean_correct", "robust",
                "clean_accuracy", "robust_accuracy", "ci_low", "ci_high", "robust_accuracy_std",
                "attacked", "broken", "forwards", "backwards", "wall_seconds", "stochastic",
                "checkpoint_sha256", "model_source")
        self._insert("cells", cols, cells)

    def add_samples(self, samples: Sequence[Mapping[str, Any]]) -> None:
        """Insert per-sample outcomes (label, clean/robust, who broke it, margin)."""
        cols = ("model", "norm", "eps", "sample", "label", "clean_correct", "robust",
                "broken_by", "margin")
        self._insert("samples", cols, samples)

    def add_masking(self, row: Mapping[str, Any]) -> None:
        """Insert one masking diagnosis (verdict, failing checks, next attack, report JSON)."""
        row = {**row, "failing": _json(list(row.get("failing", []))),
               "report": row["report"] if isinstance(row["report"], str) else _json(row["report"])}
        cols = ("model", "norm", "eps", "verdict", "failing", "next_attack",
                "robust_accuracy_before", "robust_accuracy_after", "n", "wall_seconds", "report")
        self._insert("masking", cols, [row])

    def add_explanations(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Insert explanation metric values (model x method x metric)."""
        rows = [{**r, "details": _json(r.get("details", {}))} for r in rows]
        self._insert("explanations", ("model", "method", "metric", "value", "n", "details"), rows)

    def add_explanation_map(self, model: str, method: str, inputs: Any, maps: Any) -> None:
        """Insert the inputs and attribution maps kept for the report's figures."""
        self._insert("explanation_maps", ("model", "method", "inputs", "maps"),
                     [{"model": model, "method": method, "inputs": _json(inputs),
                       "maps": _json(maps)}])

    def add_backdoor(self, model: str, metrics: Mapping[str, Any]) -> None:
        """Insert a backdoored model's metrics, one row per metric."""
        rows = [{"model": model, "metric": k, "value": _number(v)} for k, v in metrics.items()]
        self._insert("backdoor", ("model", "metric", "value"), rows)

    def add_curve(self, row: Mapping[str, Any]) -> None:
        """One security-curve search (model x norm): ``grid`` and ``broken_at`` as lists."""
        row = {**row, "grid": _json(list(row["grid"])), "broken_at": _json(list(row["broken_at"])),
               "attacks": _json(row.get("attacks", []))}
        cols = ("model", "norm", "grid", "broken_at", "n", "attacks", "forwards", "backwards",
                "wall_seconds")
        self._insert("curves", cols, [row])
    def add_certified(self, rows: Sequence[Mapping[str, Any]],
                      samples: Sequence[Mapping[str, Any]] = ()) -> None:
        """Rows of ``certified`` (one per model x threat x method) and their per-sample rows
        (``lower``: -inf and NaN are stored as NULL)."""
        self._insert("certified", ("model", "norm", "eps", "method", "n", "certified", "broken",
                                   "unknown", "certified_accuracy", "seconds", "status",
                                   "reason"), rows)
        self._insert("certified_samples", ("model", "norm", "eps", "method", "sample", "status",
                                           "lower", "counterexample"),
                     [{**r, "lower": _number(r.get("lower"))} for r in samples])

    def add_section(self, model: str, section: str, status: str, reason: str,
                    detail: str = "") -> None:
        """Insert the status of a section of a model's evaluation (e.g. a failure and its
        reason).
        """
        self._insert("sections", ("model", "section", "detail", "status", "reason"),
                     [{"model": model, "section": section, "detail": detail, "status": status,
                       "reason": reason}])

    def clear_section(self, model: str, section: str, detail: str = "") -> None:
        """Delete a section's recorded status."""
        self.conn.execute("DELETE FROM sections WHERE run_id = ? AND model = ? AND section = ? "
                          "AND detail = ?", (self.run_id, model, section, detail))

    def _insert(self, table: str, cols: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
        sql = (f"INSERT OR REPLACE INTO {table}(run_id, {', '.join(cols)}) "
               f"VALUES (?, {', '.join('?' for _ in cols)})")
        self.conn.executemany(sql, [(self.run_id, *(r.get(c) for c in cols)) for r in rows])


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None if value is None else float(value)
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _check_path(path: Path, *, must_exist: bool) -> None:
    """Refuse a missing store (for reading) or a directory, without opening the file.

    The file itself is only ever opened through SQLite. POSIX advisory locks belong to the
    process, and closing *any* descriptor of a file drops all of them: a header check with
    ``open()`` here silently released the locks of another connection this process still had
    open, so a writer in another process took the database for unused on closing, deleted
    the WAL and its index, and this process's next connection read through the stale index
    and called a healthy store "malformed" (tests/test_store.py reproduces it).
    """
    if not path.exists():
        if must_exist:
            raise FileNotFoundError(f"no results store at {path}; run a suite first "
                                    "(unmask run) or pass --store PATH")
        return
    if path.is_dir():
        raise StoreError(f"{path} is a directory, not a results store file")


def open_store(path: str | os.PathLike | None = None, *, readonly: bool = False) -> Store:
    """Open (or create) the store at ``path`` / ``$UNMASK_STORE`` / ``results/unmask.sqlite``."""
    return Store.open(path, readonly=readonly)
