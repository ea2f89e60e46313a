"""The state store: runs, their phases and events, in one SQLite file under RUNNER_HOME.

All SQL lives here. WAL mode lets `runner status` read while a run writes. The schema
grows only by appending migrations to MIGRATIONS; applied names are recorded, so an old
database is brought up to date on open and a migrated one is never touched twice.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from runner.cost import Interval
from runner.errors import BadInput, NotFound, StateBusy
from runner.home import private_dir, private_file

DB_NAME = "state.db"


def _execute_all(db: sqlite3.Connection, script: str) -> None:
    """Run several statements inside the caller's transaction (executescript would commit)."""
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


def _m001_runs_phases_events(db: sqlite3.Connection) -> None:
    _execute_all(
        db,
        """
        CREATE TABLE runs (
            id TEXT PRIMARY KEY,
            job_name TEXT NOT NULL,
            spec_path TEXT NOT NULL,
            spec_sha256 TEXT NOT NULL,
            provider TEXT NOT NULL,
            run_dir TEXT NOT NULL,
            status TEXT NOT NULL,
            created_at REAL NOT NULL,
            ended_at REAL,
            exit_code INTEGER,
            error TEXT
        );
        CREATE INDEX runs_created ON runs(created_at);
        CREATE TABLE phases (
            run_id TEXT NOT NULL REFERENCES runs(id),
            name TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            status TEXT NOT NULL,
            started_at REAL,
            ended_at REAL,
            detail TEXT,
            PRIMARY KEY (run_id, name, attempt)
        );
        CREATE TABLE events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id TEXT NOT NULL REFERENCES runs(id),
            ts REAL NOT NULL,
            kind TEXT NOT NULL,
            data TEXT NOT NULL
        );
        CREATE INDEX events_run ON events(run_id, id);
        """,
    )


def _m002_host_keys(db: sqlite3.Connection) -> None:
    """One pinned SSH host key per host and port (trust on first use)."""
    _execute_all(
        db,
        """
        CREATE TABLE host_keys (
            host TEXT NOT NULL,
            port INTEGER NOT NULL,
            key_type TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            pinned_at REAL NOT NULL,
            PRIMARY KEY (host, port)
        );
        """,
    )


def _m003_ledger(db: sqlite3.Connection) -> None:
    """Billed intervals per instance and power mode (runner.cost)."""
    _execute_all(
        db,
        """
        CREATE TABLE ledger (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            instance_id TEXT NOT NULL,
            mode TEXT NOT NULL,
            started_at REAL NOT NULL,
            ended_at REAL,
            rate_per_hour REAL NOT NULL,
            currency TEXT NOT NULL,
            source TEXT NOT NULL,
            run_id TEXT REFERENCES runs(id),
            phase TEXT
        );
        CREATE INDEX ledger_instance ON ledger(instance_id, started_at);
        CREATE INDEX ledger_run ON ledger(run_id);
        """,
    )


def _m004_manifests(db: sqlite3.Connection) -> None:
    """Each run's manifest (runner.manifest), so it outlives a deleted run folder."""
    _execute_all(
        db,
        """
        CREATE TABLE manifests (
            run_id TEXT PRIMARY KEY REFERENCES runs(id),
            body TEXT NOT NULL,
            written_at REAL NOT NULL
        );
        """,
    )


LAST_RUN = "@last"  # a run reference meaning the newest run

MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    _m001_runs_phases_events,
    _m002_host_keys,
    _m003_ledger,
    _m004_manifests,
]


@dataclass(frozen=True)
class Run:
    id: str
    job_name: str
    spec_path: str
    spec_sha256: str
    provider: str
    run_dir: str
    status: str
    created_at: float
    ended_at: float | None = None
    exit_code: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class Phase:
    run_id: str
    name: str
    attempt: int
    status: str
    started_at: float | None
    ended_at: float | None
    detail: str | None

    @property
    def seconds(self) -> float | None:
        if self.started_at is None or self.ended_at is None:
            return None
        return round(self.ended_at - self.started_at, 3)


@dataclass(frozen=True)
class Event:
    run_id: str
    ts: float
    kind: str
    data: dict


@dataclass(frozen=True)
class HostKey:
    """The SSH host key trusted for host:port; fingerprint as OpenSSH prints it (SHA256:...)."""

    host: str
    port: int
    key_type: str
    fingerprint: str
    pinned_at: float


class Store:
    """A connection to the state database; use as a context manager or call close()."""

    def __init__(self, home: Path) -> None:
        private_dir(home)
        path = private_file(home / DB_NAME)
        self.path = path
        self._db = _connect(path)
        self._migrate()
        for suffix in ("-wal", "-shm"):
            sidecar = path.with_name(path.name + suffix)
            if sidecar.exists():
                sidecar.chmod(0o600)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    # -- schema -----------------------------------------------------------------

    def _migrate(self) -> None:
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)"
        )
        applied = {row["name"] for row in self._db.execute("SELECT name FROM _migrations")}
        for migration in MIGRATIONS:
            if migration.__name__ in applied:
                continue
            with self._transaction():  # looked at again inside: another process may have just applied it
                done = "SELECT 1 FROM _migrations WHERE name = ?"
                if self._db.execute(done, (migration.__name__,)).fetchone():
                    continue
                migration(self._db)
                self._db.execute(
                    "INSERT INTO _migrations (name, applied_at) VALUES (?, ?)",
                    (migration.__name__, time.time()),
                )

    def applied_migrations(self) -> list[str]:
        return [row["name"] for row in self._db.execute("SELECT name FROM _migrations ORDER BY rowid")]

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- runs -------------------------------------------------------------------

    def create_run(self, run: Run, **created: object) -> None:
        """Record a new run with its run.created event (data: created), both or neither."""
        with self._transaction():
            self._db.execute(
                "INSERT INTO runs (id, job_name, spec_path, spec_sha256, provider, run_dir, status,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run.id,
                    run.job_name,
                    run.spec_path,
                    run.spec_sha256,
                    run.provider,
                    run.run_dir,
                    run.status,
                    run.created_at,
                ),
            )
            self._insert_event(run.id, "run.created", created)

    def finish_run(self, run_id: str, status: str, exit_code: int, error: str | None = None) -> None:
        with self._transaction():
            self._db.execute(
                "UPDATE runs SET status = ?, exit_code = ?, error = ?, ended_at = ? WHERE id = ?",
                (status, exit_code, error, time.time(), run_id),
            )

    def reopen_run(self, run_id: str) -> None:
        """A resumed run is running again: its earlier end is forgotten (its events keep it)."""
        with self._transaction():
            self._db.execute(
                "UPDATE runs SET status = 'running', exit_code = NULL, error = NULL, ended_at = NULL"
                " WHERE id = ?",
                (run_id,),
            )

    def get_run(self, ref: str) -> Run:
        """Find a run by its id, a unique prefix of it, or LAST_RUN (the newest run)."""
        if ref == LAST_RUN:
            newest = self.list_runs(1)
            if not newest:
                raise NotFound("there are no runs yet (see `runner submit`)")
            return newest[0]
        rows = self._db.execute(
            "SELECT * FROM runs WHERE id = ? OR id LIKE ? ESCAPE '\\' ORDER BY id LIMIT 3",
            (ref, _like_prefix(ref)),
        ).fetchall()
        exact = [row for row in rows if row["id"] == ref]
        if exact:
            return Run(**dict(exact[0]))
        if not rows:
            raise NotFound(f"no run matches {ref!r} (see `runner runs`)")
        if len(rows) > 1:
            names = ", ".join(row["id"] for row in rows)
            raise BadInput(f"{ref!r} matches several runs ({names}, ...): give more of the id")
        return Run(**dict(rows[0]))

    def list_runs(self, limit: int = 50) -> list[Run]:
        rows = self._db.execute("SELECT * FROM runs ORDER BY created_at DESC, id DESC LIMIT ?", (limit,))
        return [Run(**dict(row)) for row in rows]

    # -- phases -----------------------------------------------------------------

    def start_phase(self, run_id: str, name: str) -> int:
        """Record that a phase begins; returns its attempt number (1 for the first try)."""
        with self._transaction():
            (last,) = self._db.execute(
                "SELECT COALESCE(MAX(attempt), 0) FROM phases WHERE run_id = ? AND name = ?",
                (run_id, name),
            ).fetchone()
            attempt = last + 1
            self._db.execute(
                "INSERT INTO phases (run_id, name, attempt, status, started_at) VALUES (?, ?, ?, ?, ?)",
                (run_id, name, attempt, "running", time.time()),
            )
        return attempt

    def end_phase(self, run_id: str, name: str, attempt: int, status: str, detail: str | None = None) -> None:
        with self._transaction():
            self._db.execute(
                "UPDATE phases SET status = ?, ended_at = ?, detail = ?"
                " WHERE run_id = ? AND name = ? AND attempt = ?",
                (status, time.time(), detail, run_id, name, attempt),
            )

    def abandon_phases(self, run_id: str, detail: str) -> None:
        """Mark phases still recorded as running as interrupted: their process is gone."""
        with self._transaction():
            self._db.execute(
                "UPDATE phases SET status = 'interrupted', detail = ?"
                " WHERE run_id = ? AND status = 'running'",
                (detail, run_id),
            )

    def skip_phase(self, run_id: str, name: str, reason: str) -> None:
        now = time.time()
        with self._transaction():
            self._db.execute(
                "INSERT INTO phases (run_id, name, attempt, status, started_at, ended_at, detail)"
                " VALUES (?, ?, 1, 'skipped', ?, ?, ?)",
                (run_id, name, now, now, reason),
            )

    def phases(self, run_id: str) -> list[Phase]:
        rows = self._db.execute("SELECT * FROM phases WHERE run_id = ? ORDER BY started_at, rowid", (run_id,))
        return [Phase(**dict(row)) for row in rows]

    # -- events -----------------------------------------------------------------

    def add_event(self, run_id: str, kind: str, **data: object) -> None:
        with self._transaction():
            self._insert_event(run_id, kind, data)

    def _insert_event(self, run_id: str, kind: str, data: dict) -> None:
        self._db.execute(
            "INSERT INTO events (run_id, ts, kind, data) VALUES (?, ?, ?, ?)",
            (run_id, time.time(), kind, json.dumps(data, sort_keys=True, default=str)),
        )

    def events(self, run_id: str) -> list[Event]:
        rows = self._db.execute(
            "SELECT run_id, ts, kind, data FROM events WHERE run_id = ? ORDER BY id", (run_id,)
        )
        return [Event(row["run_id"], row["ts"], row["kind"], json.loads(row["data"])) for row in rows]

    # -- the cost ledger ----------------------------------------------------------

    def open_interval(self, interval: Interval) -> None:
        """Record an interval (open when its ended_at is None)."""
        with self._transaction():
            self._db.execute(
                "INSERT INTO ledger (instance_id, mode, started_at, ended_at, rate_per_hour, currency,"
                " source, run_id, phase) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                tuple(getattr(interval, name) for name in _LEDGER_FIELDS),
            )

    def open_interval_of(self, instance_id: str) -> Interval | None:
        """The instance's interval still open (at most one: boots open, power-offs close)."""
        row = self._db.execute(
            "SELECT * FROM ledger WHERE instance_id = ? AND ended_at IS NULL ORDER BY id DESC LIMIT 1",
            (instance_id,),
        ).fetchone()
        return None if row is None else _interval(row)

    def open_intervals(self) -> list[Interval]:
        """Every interval still open: instances the ledger believes billed now."""
        rows = self._db.execute("SELECT * FROM ledger WHERE ended_at IS NULL ORDER BY started_at, id")
        return [_interval(row) for row in rows]

    def close_interval(self, instance_id: str, ended_at: float, source: str) -> Interval | None:
        """Close the instance's open interval at ended_at; the interval closed, or None."""
        with self._transaction():
            row = self._db.execute(
                "SELECT * FROM ledger WHERE instance_id = ? AND ended_at IS NULL ORDER BY id DESC LIMIT 1",
                (instance_id,),
            ).fetchone()
            if row is None:
                return None
            ended_at = max(ended_at, row["started_at"])
            self._db.execute(
                "UPDATE ledger SET ended_at = ?, source = ? WHERE id = ?", (ended_at, source, row["id"])
            )
        return replace(_interval(row), ended_at=ended_at, source=source)

    def correct_end(self, instance_id: str, started_at: float, ended_at: float, source: str) -> None:
        """Move the end of the instance's interval that started at started_at earlier, to a
        more direct witness's time (the watchdog's power-off); never later, never before its start."""
        with self._transaction():
            self._db.execute(
                "UPDATE ledger SET ended_at = MAX(started_at, ?), source = ?"
                " WHERE instance_id = ? AND started_at = ? AND ended_at > ?",
                (ended_at, source, instance_id, started_at, ended_at),
            )

    def ledger(self, run_id: str | None = None) -> list[Interval]:
        """The intervals of one run, or all of them."""
        if run_id is None:
            rows = self._db.execute("SELECT * FROM ledger ORDER BY started_at, id")
        else:
            rows = self._db.execute(
                "SELECT * FROM ledger WHERE run_id = ? ORDER BY started_at, id", (run_id,)
            )
        return [_interval(row) for row in rows]

    # -- manifests --------------------------------------------------------------

    def put_manifest(self, run_id: str, manifest: dict) -> None:
        with self._transaction():
            self._db.execute(
                "INSERT INTO manifests (run_id, body, written_at) VALUES (?, ?, ?)"
                " ON CONFLICT(run_id) DO UPDATE SET body = excluded.body, written_at = excluded.written_at",
                (run_id, json.dumps(manifest, sort_keys=True), time.time()),
            )

    def manifest(self, run_id: str) -> dict | None:
        """The run's manifest as last written, or None."""
        row = self._db.execute("SELECT body FROM manifests WHERE run_id = ?", (run_id,)).fetchone()
        return None if row is None else json.loads(row["body"])

    # -- host keys --------------------------------------------------------------

    def host_key(self, host: str, port: int) -> HostKey | None:
        """The key pinned for host:port, or None before the first connection."""
        row = self._db.execute("SELECT * FROM host_keys WHERE host = ? AND port = ?", (host, port)).fetchone()
        return HostKey(**dict(row)) if row else None

    def pin_host_key(self, host: str, port: int, key_type: str, fingerprint: str) -> None:
        """Trust this key for host:port from now on, replacing any key pinned before."""
        with self._transaction():
            self._db.execute(
                "INSERT INTO host_keys (host, port, key_type, fingerprint, pinned_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (host, port) DO UPDATE SET key_type = excluded.key_type,"
                " fingerprint = excluded.fingerprint, pinned_at = excluded.pinned_at",
                (host, port, key_type, fingerprint, time.time()),
            )


_LEDGER_FIELDS = (
    "instance_id",
    "mode",
    "started_at",
    "ended_at",
    "rate_per_hour",
    "currency",
    "source",
    "run_id",
    "phase",
)


def _interval(row: sqlite3.Row) -> Interval:
    return Interval(**{name: row[name] for name in _LEDGER_FIELDS})


WAIT_ENV = "RUNNER_STATE_WAIT_S"
DEFAULT_WAIT_S = 60.0  # a write waits this long for another process's transaction to end


def wait_s() -> float:
    """How long a write waits for a database another process holds ($RUNNER_STATE_WAIT_S)."""
    try:
        return max(0.0, float(os.environ.get(WAIT_ENV, DEFAULT_WAIT_S)))
    except ValueError:
        raise BadInput(f"{WAIT_ENV} must be a number of seconds") from None


class _Connection(sqlite3.Connection):
    """A connection whose 'database is locked' (another process kept its write transaction
    open past the wait) is StateBusy, a one-line error, wherever in the store it happens."""

    def execute(self, sql: str, parameters=(), /) -> sqlite3.Cursor:
        try:
            return super().execute(sql, parameters)
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            raise StateBusy(
                f"the state database is locked by another process (waited {self.wait_s:.0f}s):"
                f" close whatever holds it open (a sqlite3 shell?) and run the command again,"
                f" or wait longer with {WAIT_ENV}"
            ) from None


def _connect(path: Path, attempts: int = 5) -> sqlite3.Connection:
    """A connection in WAL mode (readers never wait for a writer). WAL is a property of the file,
    so it is set only when missing (switching modes needs an exclusive lock, which SQLite may
    refuse at once rather than wait for: tried a few times)."""
    waiting = wait_s()
    attempt = 1
    while True:
        db = sqlite3.connect(path, timeout=waiting, isolation_level=None, factory=_Connection)
        db.wait_s = waiting
        try:
            db.row_factory = sqlite3.Row
            db.execute(f"PRAGMA busy_timeout={int(waiting * 1000)}")
            if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA foreign_keys=ON")
            return db
        except StateBusy:
            db.close()
            if attempt == attempts:
                raise
            time.sleep(0.05 * 2**attempt)
            attempt += 1


def _like_prefix(ref: str) -> str:
    escaped = ref.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"


def open_store(home: Path | None = None) -> Store:
    from runner.home import runner_home

    return Store(home or runner_home())
