"""The results store: schema, one transaction per unit, clear errors on corrupted or foreign
files, concurrent writers, the Wilson interval."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from unmask.bench.suite.store import SCHEMA_VERSION, Store, StoreError, default_path, wilson


def _run(st: Store, **kw) -> int:
    args = dict(suite="s", config={"name": "s"}, config_hash="h", seed=0, quick=False,
                git_commit=None, versions={"torch": "x"}, device="cpu")
    args.update(kw)
    return st.start_run(**args)


def _cell(model="m", attack="worst-case", robust=3, n=10):
    lo, hi = wilson(robust, n)
    return {"model": model, "norm": "linf", "eps": 0.1, "attack": attack, "position": 0, "n": n,
            "clean_correct": 9, "robust": robust, "clean_accuracy": 0.9,
            "robust_accuracy": robust / n, "ci_low": lo, "ci_high": hi,
            "robust_accuracy_std": 0.0, "attacked": 9, "broken": 9 - robust, "forwards": 100,
            "backwards": 50, "wall_seconds": 0.1, "stochastic": 0, "checkpoint_sha256": "ab",
            "model_source": "zoo"}


def test_schema_and_round_trip(tmp_path):
    path = tmp_path / "r.sqlite"
    with Store(path) as st:
        run_id = _run(st)
        with st.unit(run_id, "attack/m/linf:0.1", 1.5) as tx:
            tx.add_cells([_cell()])
            tx.add_samples([{"model": "m", "norm": "linf", "eps": 0.1, "sample": 0, "label": 3,
                             "clean_correct": 1, "robust": 0, "broken_by": "pgd",
                             "margin": -0.5}])
        with st.unit(run_id, "masking/m/linf:0.1") as tx:
            tx.add_masking({"model": "m", "norm": "linf", "eps": 0.1, "verdict": "clean",
                            "failing": [], "next_attack": None, "robust_accuracy_before": None,
                            "robust_accuracy_after": None, "n": 10, "wall_seconds": 1.0,
                            "report": {"checks": []}})
        with st.unit(run_id, "backdoor/m") as tx:
            tx.add_backdoor("m", {"attack_success_rate": 0.97, "reference_accuracy": None,
                                  "nan": float("nan")})
        st.set_status(run_id, "finished")
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with Store(path, readonly=True) as st:
        assert st.schema_version() == SCHEMA_VERSION
        run = st.latest_run()
        assert run.status == "finished" and run.versions == {"torch": "x"}
        assert run.wall_seconds is not None and run.wall_seconds >= 0
        assert st.finished_units(run_id) == {"attack/m/linf:0.1", "masking/m/linf:0.1",
                                             "backdoor/m"}
        cell = st.rows("cells", run_id)[0]
        assert isinstance(cell["robust_accuracy"], float) and cell["robust"] == 3
        bd = {r["metric"]: r["value"] for r in st.rows("backdoor", run_id)}
        assert bd == {"attack_success_rate": 0.97, "reference_accuracy": None, "nan": None}
        with pytest.raises(StoreError, match="read-only"):
            _run(st)
        with pytest.raises(ValueError, match="no run 99"):
            st.run(99)


def test_a_failed_unit_leaves_nothing_behind(tmp_path):
    with Store(tmp_path / "r.sqlite") as st:
        run_id = _run(st)
        with pytest.raises(RuntimeError), st.unit(run_id, "attack/m/linf:0.1") as tx:
            tx.add_cells([_cell()])
            raise RuntimeError("interrupted mid-unit")
        assert st.rows("cells", run_id) == []
        assert st.finished_units(run_id) == set()


def test_default_path(tmp_path, monkeypatch):
    monkeypatch.delenv("UNMASK_STORE", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_path() == tmp_path / "results" / "unmask.sqlite"
    monkeypatch.setenv("UNMASK_STORE", str(tmp_path / "env.sqlite"))
    assert default_path() == tmp_path / "env.sqlite"
    assert default_path(tmp_path / "x.sqlite") == tmp_path / "x.sqlite"


def test_missing_store_for_reading(tmp_path):
    with pytest.raises(FileNotFoundError, match="unmask run"):
        Store(tmp_path / "none.sqlite", readonly=True)


def test_not_sqlite_is_a_clear_error(tmp_path):
    path = tmp_path / "r.sqlite"
    data = b"this is a CSV file, not a database\n" * 50
    path.write_bytes(data)
    for readonly in (False, True):
        with pytest.raises(StoreError, match="not an SQLite database"):
            Store(path, readonly=readonly)
    assert path.read_bytes() == data  # refused before anything was written


def test_a_file_sqlite_cannot_open_is_a_clear_error(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(sqlite3, "connect", refuse)
    with pytest.raises(StoreError, match="cannot open the results store .*permissions"):
        Store(tmp_path / "r.sqlite")


def _open_connections(path) -> list[sqlite3.Connection]:
    import gc

    found = []
    for obj in gc.get_objects():
        if type(obj) is sqlite3.Connection:
            try:
                files = [row[2] for row in obj.execute("PRAGMA database_list")]
            except sqlite3.ProgrammingError:  # closed
                continue
            if str(path) in files:
                found.append(obj)
    return found


class _InterruptAfter:
    """A connection that raises KeyboardInterrupt right after a given statement ran, the way a
    Ctrl-C lands between two statements."""

    def __init__(self, conn, statement):
        self._conn, self._statement = conn, statement

    def execute(self, sql, *args):
        out = self._conn.execute(sql, *args)
        if sql == self._statement:
            raise KeyboardInterrupt
        return out

    def __getattr__(self, name):
        return getattr(self._conn, name)


@pytest.mark.parametrize("statement", ["BEGIN IMMEDIATE", "COMMIT"])
def test_ctrl_c_between_statements_leaves_no_open_transaction(tmp_path, statement):
    path = tmp_path / "r.sqlite"
    with Store(path) as st:
        run_id = _run(st)
        real = st.conn
        st.conn = _InterruptAfter(real, statement)
        with pytest.raises(KeyboardInterrupt):
            with st.unit(run_id, "u") as tx:
                tx.add_cells([_cell()])
        st.conn = real
        assert not real.in_transaction
        st.set_status(run_id, "interrupted")  # what the runner writes next
    with Store(path, readonly=True) as st:
        assert st.run(run_id).status == "interrupted"
        # interrupted after COMMIT: the unit is saved; after BEGIN: nothing of it is
        assert st.finished_units(run_id) == ({"u"} if statement == "COMMIT" else set())
        assert len(st.rows("cells", run_id)) == (1 if statement == "COMMIT" else 0)


def test_a_refused_open_leaves_no_connection_open(tmp_path):
    """A Python sqlite3 connection sits in a reference cycle, so one dropped on an error stays
    open until the cyclic collector runs; every failed open must close its own."""
    path = tmp_path / "empty.sqlite"
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode = WAL")
    con.close()
    for _ in range(3):
        with pytest.raises(StoreError, match="empty database"):
            Store(path, readonly=True)
    foreign = tmp_path / "foreign.sqlite"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE users(name TEXT)")
    con.close()
    with pytest.raises(StoreError, match="another application"):
        Store(foreign)
    assert _open_connections(path) == [] and _open_connections(foreign) == []


_WRITER = textwrap.dedent("""
    import sys
    from unmask.bench.suite.store import Store, wilson
    lo, hi = wilson(3, 10)
    cell = {"model": "m", "norm": "linf", "eps": 0.1, "attack": "worst-case", "position": 0,
            "n": 10, "clean_correct": 9, "robust": 3, "clean_accuracy": 0.9,
            "robust_accuracy": 0.3, "ci_low": lo, "ci_high": hi, "robust_accuracy_std": 0.0,
            "attacked": 9, "broken": 6, "forwards": 100, "backwards": 50, "wall_seconds": 0.1,
            "stochastic": 0, "checkpoint_sha256": "ab" * 300, "model_source": "zoo"}
    with Store(sys.argv[1]) as st:
        run_id = st.start_run(suite="s", config={"name": "s"}, config_hash="h", seed=0,
                              quick=False, git_commit=None, versions={}, device="cpu")
        with st.unit(run_id, "u") as tx:
            tx.add_cells([{**cell, "model": f"m{i}"} for i in range(int(sys.argv[2]))])
""")


def test_a_store_held_open_survives_writers_in_other_processes(tmp_path):
    """The regression behind a CI failure: a notebook (or a test) keeps a store open while it
    opens and closes others on the same file, and runs write to it from other processes. An
    ``open()`` of the file in this process used to drop the held connection's POSIX locks, a
    writer then deleted the WAL and its index on closing, and the next reader here read the
    new WAL through the stale index: "database disk image is malformed" on a healthy file."""
    path = tmp_path / "r.sqlite"
    writes = [(path, 20), (path, 300), (path, 30)]
    subprocess.run([sys.executable, "-c", _WRITER, *map(str, writes[0])], check=True)
    with Store(path, readonly=True) as held:
        assert len(held.runs()) == 1
        with Store(path, readonly=True) as other:
            assert len(other.runs()) == 1
        for args in writes[1:]:
            subprocess.run([sys.executable, "-c", _WRITER, *map(str, args)], check=True)
        with Store(path, readonly=True) as fresh:
            assert [len(fresh.rows("cells", r.run_id)) for r in fresh.runs()] == [20, 300, 30]
        assert [len(held.rows("cells", r.run_id)) for r in held.runs()] == [20, 300, 30]


def test_corrupted_store_is_a_clear_error(tmp_path):
    path = tmp_path / "r.sqlite"
    with Store(path) as st:
        run_id = _run(st)
        with st.unit(run_id, "u") as tx:
            tx.add_cells([_cell(model=f"m{i}") for i in range(300)])
    con = sqlite3.connect(path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    blob = bytearray(path.read_bytes())
    assert len(blob) > 8192
    blob[4096:] = b"\xff" * (len(blob) - 4096)  # keep the header, destroy the pages
    path.write_bytes(bytes(blob))
    with pytest.raises(StoreError, match="damaged"):
        Store(path)
    with pytest.raises(StoreError, match="damaged"):
        Store(path, readonly=True)


def test_foreign_sqlite_file_is_refused(tmp_path):
    path = tmp_path / "other.sqlite"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE invoices (id INTEGER, total REAL)")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="another application.*invoices"):
        Store(path)
    assert sqlite3.connect(path).execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 1


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "r.sqlite"
    Store(path).close()
    con = sqlite3.connect(path)
    con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                (str(SCHEMA_VERSION + 1),))
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="newer unmask"):
        Store(path)


def test_concurrent_writers_do_not_corrupt_the_store(tmp_path):
    path = tmp_path / "r.sqlite"
    script = textwrap.dedent("""
        import sys
        from unmask.bench.suite.store import Store, wilson
        who = sys.argv[2]
        with Store(sys.argv[1]) as st:
            run_id = st.start_run(suite=who, config={}, config_hash="h", seed=0, quick=False,
                                  git_commit=None, versions={}, device="cpu")
            for i in range(40):
                with st.unit(run_id, f"u{i}") as tx:
                    tx.add_section(who, "s", "unavailable", str(i), detail=str(i))
            st.set_status(run_id, "finished")
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(path), f"w{i}"], env=env,
                              stderr=subprocess.PIPE, text=True) for i in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    with Store(path, readonly=True) as st:
        runs = st.runs()
        assert sorted(r.suite for r in runs) == ["w0", "w1", "w2"]
        for r in runs:
            assert r.status == "finished"
            assert len(st.finished_units(r.run_id)) == 40
            assert len(st.rows("sections", r.run_id)) == 40


@pytest.mark.parametrize("k, n", [(0, 10), (10, 10), (3, 10), (500, 1000), (1, 1)])
def test_wilson_interval(k, n):
    lo, hi = wilson(k, n)
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    assert hi - lo > 0
    if k == 0:
        assert lo == 0.0
    if k == n:
        assert hi == 1.0


def test_wilson_matches_a_known_value():
    lo, hi = wilson(81, 263)  # Wilson (1927) / Newcombe (1998) worked example
    assert lo == pytest.approx(0.2553, abs=1e-4) and hi == pytest.approx(0.3662, abs=1e-4)


def test_errors_are_recorded_outside_units_and_cleared_when_they_run(tmp_path):
    """A failed section is a row of ``sections`` but not a finished unit (resume runs it
    again); the unit that finally runs clears it. A resumed run can replace its suite."""
    with Store(tmp_path / "r.sqlite") as st:
        run_id = _run(st)
        st.add_section(run_id, "m", "masking", "error", "RuntimeError: boom", "linf:0.1")
        assert st.finished_units(run_id) == set()
        (row,) = st.rows("sections", run_id)
        assert (row["status"], row["reason"]) == ("error", "RuntimeError: boom")
        st.clear_section(run_id, "m", "masking", "linf:0.2")  # another cell: kept
        assert len(st.rows("sections", run_id)) == 1
        with st.unit(run_id, "masking/m/linf:0.1") as tx:
            tx.clear_section("m", "masking", "linf:0.1")
        assert st.rows("sections", run_id) == []
        st.add_section(run_id, "m", "model", "error", "ValueError: shape")
        st.clear_section(run_id, "m", "model")
        assert st.rows("sections", run_id) == []
        st.update_run_config(run_id, {"name": "s", "models": [{"name": "a"}]}, "h2")
        run = st.run(run_id)
        assert run.config["models"] == [{"name": "a"}] and run.config_hash == "h2"
