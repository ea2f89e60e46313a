"""The state store: migrations, permissions, run and phase bookkeeping."""

from __future__ import annotations

import sqlite3
import stat
import time

import pytest

from runner.errors import EXIT_BAD_INPUT, NotFound, RunnerError, StateBusy
from runner.store import DB_NAME, MIGRATIONS, Run, Store

pytestmark = pytest.mark.unit


def make_run(run_id: str, created_at: float | None = None) -> Run:
    return Run(
        id=run_id,
        job_name="demo",
        spec_path="/jobs/demo.yaml",
        spec_sha256="0" * 64,
        provider="local",
        run_dir=f"/runs/{run_id}",
        status="running",
        created_at=created_at or time.time(),
    )


def test_empty_database_is_migrated_to_the_full_schema(tmp_path):
    with Store(tmp_path) as store:
        assert store.applied_migrations() == [m.__name__ for m in MIGRATIONS]
    db = sqlite3.connect(tmp_path / DB_NAME)
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"runs", "phases", "events", "_migrations"} <= tables
    columns = {row[1] for row in db.execute("PRAGMA table_info(phases)")}
    assert {"run_id", "name", "attempt", "status", "started_at", "ended_at", "detail"} <= columns
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_reopening_applies_nothing_twice(tmp_path):
    Store(tmp_path).close()
    with Store(tmp_path) as store:
        names = store.applied_migrations()
    assert len(names) == len(set(names)) == len(MIGRATIONS)


@pytest.mark.security
def test_state_folder_and_files_are_private(tmp_path):
    home = tmp_path / "home"
    with Store(home):
        pass
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert stat.S_IMODE((home / DB_NAME).stat().st_mode) == 0o600


def test_phase_attempts_are_counted_and_timed(tmp_path):
    with Store(tmp_path) as store:
        store.create_run(make_run("r1"))
        first = store.start_phase("r1", "stage")
        store.end_phase("r1", "stage", first, "failed", "lost connection")
        second = store.start_phase("r1", "stage")
        store.end_phase("r1", "stage", second, "succeeded")
        store.skip_phase("r1", "boot_gpu", "no GPU boot")
        phases = store.phases("r1")
    assert [(p.name, p.attempt, p.status) for p in phases] == [
        ("stage", 1, "failed"),
        ("stage", 2, "succeeded"),
        ("boot_gpu", 1, "skipped"),
    ]
    assert phases[0].detail == "lost connection"
    assert all(p.seconds is not None and p.seconds >= 0 for p in phases)


def test_finish_run_and_events(tmp_path):
    with Store(tmp_path) as store:
        store.create_run(make_run("r1"))
        store.add_event("r1", "container.exited", name="train", exit_code=3)
        store.finish_run("r1", "failed", 1, "train exited with code 3")
        run = store.get_run("r1")
        events = store.events("r1")
    assert (run.status, run.exit_code, run.error) == ("failed", 1, "train exited with code 3")
    assert run.ended_at is not None
    assert [e.kind for e in events] == ["run.created", "container.exited"]
    assert events[1].data == {"exit_code": 3, "name": "train"}


def test_runs_are_found_by_unique_prefix(tmp_path):
    with Store(tmp_path) as store:
        store.create_run(make_run("smoke-20260101-aaaa", 1.0))
        store.create_run(make_run("smoke-20260101-bbbb", 2.0))
        store.create_run(make_run("other_1", 3.0))
        assert store.get_run("smoke-20260101-b").id == "smoke-20260101-bbbb"
        assert [r.id for r in store.list_runs(10)] == [
            "other_1",
            "smoke-20260101-bbbb",
            "smoke-20260101-aaaa",
        ]
        with pytest.raises(RunnerError, match="matches several runs"):
            store.get_run("smoke-")
        with pytest.raises(NotFound) as missing:
            store.get_run("nope")
        assert missing.value.exit_code == EXIT_BAD_INPUT
        # '_' and '%' are literal characters in ids, not SQL wildcards
        with pytest.raises(NotFound):
            store.get_run("other%")
        assert store.get_run("@last").id == "other_1"  # the newest run


def test_the_last_run_of_an_empty_store_is_not_found(tmp_path):
    with Store(tmp_path) as store, pytest.raises(NotFound, match="there are no runs yet"):
        store.get_run("@last")


def test_unknown_run_cannot_get_phases(tmp_path):
    with Store(tmp_path) as store, pytest.raises(sqlite3.IntegrityError):
        store.start_phase("ghost", "plan")


def test_opening_a_second_store_keeps_the_first_ones_locks(tmp_path):
    """A process opens several stores (the run's, the SSH host's). Opening one must not drop the
    POSIX locks SQLite holds through another: without them, a second process that closes its
    connection believes it was the last one and checkpoints and deletes the WAL under the first
    (which then fails with "disk I/O error")."""
    import subprocess
    import sys

    with Store(tmp_path) as first:
        first.create_run(make_run("r1"))
        Store(tmp_path).close()
        script = "import sqlite3, sys; sqlite3.connect(sys.argv[1]).execute('SELECT 1 FROM runs').fetchall()"
        subprocess.run([sys.executable, "-c", script, str(tmp_path / DB_NAME)], check=True)
        assert (tmp_path / f"{DB_NAME}-wal").exists()  # still open here, so nobody checkpointed it away
        first.add_event("r1", "still.writable")


def test_phases_left_running_by_a_killed_process_are_marked_interrupted(tmp_path):
    with Store(tmp_path) as store:
        store.create_run(make_run("r1"))
        plan = store.start_phase("r1", "plan")
        store.end_phase("r1", "plan", plan, "succeeded")
        store.start_phase("r1", "stage")
        store.finish_run("r1", "failed", 3, "boom")
        store.abandon_phases("r1", "its process ended")
        store.reopen_run("r1")
        assert [(p.name, p.status, p.detail) for p in store.phases("r1")] == [
            ("plan", "succeeded", None),
            ("stage", "interrupted", "its process ended"),
        ]
        run = store.get_run("r1")
        assert (run.status, run.exit_code, run.error, run.ended_at) == ("running", None, None, None)


def test_concurrent_first_opens_migrate_once(tmp_path):
    import concurrent.futures

    with concurrent.futures.ProcessPoolExecutor(4) as pool:
        opened = list(pool.map(_open_and_list, [tmp_path] * 8))
    assert opened == [0] * 8
    with Store(tmp_path) as store:
        assert store.applied_migrations() == [m.__name__ for m in MIGRATIONS]


def _open_and_list(home) -> int:
    with Store(home) as store:
        return len(store.list_runs())


def hold_write_lock(path, seconds: float):
    """Another process that keeps a write transaction open on the database for `seconds`."""
    import subprocess
    import sys

    script = (
        "import sqlite3, sys, time; db = sqlite3.connect(sys.argv[1], isolation_level=None);"
        " db.execute('BEGIN IMMEDIATE'); print('held', flush=True); time.sleep(float(sys.argv[2]))"
    )
    holder = subprocess.Popen([sys.executable, "-c", script, str(path), str(seconds)], stdout=subprocess.PIPE)
    assert holder.stdout.readline() == b"held\n"
    return holder


def test_a_write_waits_for_another_process_then_fails_in_one_line_writing_nothing(tmp_path, monkeypatch):
    with Store(tmp_path) as store:
        store.create_run(make_run("r1"))
    holder = hold_write_lock(tmp_path / DB_NAME, 30)
    try:
        monkeypatch.setenv("RUNNER_STATE_WAIT_S", "0.5")
        with Store(tmp_path) as store:
            assert store.get_run("r1").status == "running"  # readers never wait (WAL)
            with pytest.raises(StateBusy) as raised:
                store.create_run(make_run("r2"), spec="/jobs/demo.yaml")
            assert raised.value.exit_code == 3
            assert "locked by another process (waited 0s)" in raised.value.message
            assert "\n" not in raised.value.message
    finally:
        holder.kill()
        holder.wait()
    with Store(tmp_path) as store:  # neither the run nor its event was half written
        assert [run.id for run in store.list_runs(10)] == ["r1"]
        assert store.events("r2") == []


def test_a_write_goes_through_once_a_short_lock_ends(tmp_path, monkeypatch):
    with Store(tmp_path) as store:
        store.create_run(make_run("r1"))
    holder = hold_write_lock(tmp_path / DB_NAME, 1.5)
    monkeypatch.setenv("RUNNER_STATE_WAIT_S", "20")
    with Store(tmp_path) as store:
        started = time.monotonic()
        store.add_event("r1", "after.the.lock")
        assert time.monotonic() - started >= 0.5  # it did wait for the other process
        assert [e.kind for e in store.events("r1")] == ["run.created", "after.the.lock"]
    holder.wait()
