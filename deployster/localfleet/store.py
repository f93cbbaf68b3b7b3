"""The registry on disk: what fleet keeps in etcd, in one SQLite database.

With a state directory, the registry lives in `<state_dir>/registry.sqlite3`
(SQLite from the standard library, write-ahead log): one row per unit and one
per machine metadata key, and each change to the registry is one transaction
that writes only the rows it changed, so a PUT costs the same with ten units
or ten thousand. SQLite's journal makes every transaction atomic and durable:
a localfleet killed in the middle of a write restarts with the registry as
it was after the last committed change. A restart reads it back: unit names,
options, desired states, the machine each unit was placed on, and machine
metadata set through the API.

The agent also notes here which process runs each launched unit (`runs`), so
that a localfleet that restarts after being killed finds its units still
running and adopts them instead of starting copies (`agent.py`). A row that
does not read as a run (a damaged or hand-edited database) is logged and
deleted, never trusted: its pid or groups could name anybody's processes. The
database also holds the registry's `identity`, a random id made once, with
which the agent marks the processes it starts (`service.ProcessMark`).

A `registry.json` left by an older localfleet (the whole registry rewritten
on every change) is imported once and renamed `registry.json.imported`.

A database that cannot be read is an error, never silently replaced: it
holds the user's units.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import secrets
import sqlite3
from collections.abc import Iterator, Mapping

import pydantic
import structlog

from deployster.fleet import UnitOption

FILE_NAME = "registry.sqlite3"
LEGACY_FILE_NAME = "registry.json"
FORMAT_VERSION = 2  # 1 was the JSON file

log = structlog.get_logger()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS units (
    name TEXT PRIMARY KEY,
    options TEXT NOT NULL,
    desired_state TEXT NOT NULL,
    target TEXT
);
CREATE TABLE IF NOT EXISTS machine_metadata (
    machine_id TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (machine_id, key)
);
CREATE TABLE IF NOT EXISTS runs (
    unit TEXT NOT NULL,
    machine_id TEXT NOT NULL,
    unit_hash TEXT NOT NULL,
    pid INTEGER NOT NULL,
    start_time INTEGER NOT NULL,
    groups TEXT NOT NULL,
    PRIMARY KEY (unit, machine_id)
);
"""


class StateFileError(RuntimeError):
    """The registry database exists but cannot be used."""


class StoredUnit(pydantic.BaseModel):
    name: str
    options: tuple[UnitOption, ...]
    desired_state: str
    target: str | None = None


class StoredRegistry(pydantic.BaseModel):
    version: int = FORMAT_VERSION
    units: list[StoredUnit] = []
    machine_metadata: dict[str, dict[str, str]] = {}


@pydantic.dataclasses.dataclass(frozen=True, config=pydantic.ConfigDict(strict=True))
class StoredRun:
    """The main process of one launched unit on one machine, as the agent started it.

    ``start_time`` is the process's start time in clock ticks since boot
    (`/proc/<pid>/stat`), so that a pid the kernel reused for another process
    is never mistaken for the unit's. Pids and groups are positive: signalling
    group 0 would reach localfleet's own."""

    unit: str
    machine_id: str
    unit_hash: str
    pid: pydantic.PositiveInt
    start_time: pydantic.NonNegativeInt
    groups: tuple[pydantic.PositiveInt, ...]


def _options_json(options: tuple[UnitOption, ...]) -> str:
    return json.dumps([option.model_dump() for option in options])


class RegistryStore:
    def __init__(self, state_dir: pathlib.Path) -> None:
        self.path = state_dir / FILE_NAME
        self._legacy = state_dir / LEGACY_FILE_NAME
        self._db: sqlite3.Connection | None = None
        self._runs_db: sqlite3.Connection | None = None
        self._identity: str | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                db = sqlite3.connect(self.path, isolation_level=None)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")  # a committed change survives a power cut
                db.executescript(_SCHEMA)
                row = db.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
                if row is None:
                    db.execute("INSERT INTO meta VALUES ('version', ?)", (str(FORMAT_VERSION),))
                elif row[0] != str(FORMAT_VERSION):
                    raise StateFileError(
                        f"{self.path} has format version {row[0]}, "
                        f"this localfleet reads {FORMAT_VERSION}"
                    )
                db.execute(
                    "INSERT OR IGNORE INTO meta VALUES ('identity', ?)", (secrets.token_hex(16),)
                )
            except sqlite3.DatabaseError as exc:
                raise StateFileError(
                    f"{self.path} is not a localfleet registry; move it away to start empty: {exc}"
                ) from exc
            self._db = db
        return self._db

    def _runs_connection(self) -> sqlite3.Connection:
        """The runs are written without waiting for the disk: they are atomic all the same, and
        after a power cut, the only loss they can suffer, no process they name still runs. Ten
        thousand units starting or stopping cost ten thousand writes, not ten thousand fsyncs."""
        if self._runs_db is None:
            self._connection()  # creates and checks the database
            self._runs_db = sqlite3.connect(self.path, isolation_level=None)
            self._runs_db.execute("PRAGMA synchronous=OFF")
            # Never a checkpoint from here: one made without syncing could leave the database
            # file torn after a power cut once the WAL restarts. The registry's own connection
            # (synchronous=FULL) checkpoints the runs' pages with its own.
            self._runs_db.execute("PRAGMA wal_autocheckpoint=0")
        return self._runs_db

    @contextlib.contextmanager
    def _transaction(self, runs: bool = False) -> Iterator[sqlite3.Connection]:
        db = self._runs_connection() if runs else self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def load(self) -> StoredRegistry | None:
        """The saved registry, or None when there is none yet."""
        db = self._connection()
        if self._legacy.exists():
            self._import_legacy()
        units = [
            StoredUnit(
                name=name,
                options=tuple(UnitOption.model_validate(o) for o in json.loads(options)),
                desired_state=desired_state,
                target=target,
            )
            for name, options, desired_state, target in db.execute(
                "SELECT name, options, desired_state, target FROM units ORDER BY name"
            )
        ]
        metadata: dict[str, dict[str, str]] = {}
        for machine_id, key, value in db.execute("SELECT * FROM machine_metadata"):
            metadata.setdefault(machine_id, {})[key] = value
        if not units and not metadata:
            return None
        return StoredRegistry(units=units, machine_metadata=metadata)

    def write(
        self,
        units: Mapping[str, StoredUnit | None],
        metadata: Mapping[tuple[str, str], str | None] | None = None,
    ) -> None:
        """One transaction: put each unit (None deletes it) and each metadata key (None removes
        it)."""
        with self._transaction() as db:
            for name, unit in units.items():
                if unit is None:
                    db.execute("DELETE FROM units WHERE name = ?", (name,))
                else:
                    db.execute(
                        "INSERT OR REPLACE INTO units VALUES (?, ?, ?, ?)",
                        (name, _options_json(unit.options), unit.desired_state, unit.target),
                    )
            for (machine_id, key), value in (metadata or {}).items():
                if value is None:
                    db.execute(
                        "DELETE FROM machine_metadata WHERE machine_id = ? AND key = ?",
                        (machine_id, key),
                    )
                else:
                    db.execute(
                        "INSERT OR REPLACE INTO machine_metadata VALUES (?, ?, ?)",
                        (machine_id, key, value),
                    )

    # The agent's runs

    def identity(self) -> str:
        """This registry's random id, made once with the database."""
        if self._identity is None:
            row = self._connection().execute("SELECT value FROM meta WHERE key = 'identity'")
            self._identity = str(row.fetchone()[0])
        return self._identity

    def runs(self) -> dict[tuple[str, str], StoredRun]:
        """The noted runs; a row that does not read as one is logged and deleted."""
        found = {}
        rows = self._connection().execute("SELECT rowid, * FROM runs").fetchall()
        for rowid, unit, machine_id, unit_hash, pid, start_time, groups in rows:
            try:
                run = StoredRun(
                    unit, machine_id, unit_hash, pid, start_time, tuple(json.loads(groups))
                )
            except (ValueError, TypeError) as exc:  # pydantic's and json's errors are ValueErrors
                log.warning("run_record_unreadable", row=rowid, error=str(exc).splitlines()[0])
                with self._transaction(runs=True) as db:
                    db.execute("DELETE FROM runs WHERE rowid = ?", (rowid,))
                continue
            found[(run.unit, run.machine_id)] = run
        return found

    def save_run(self, run: StoredRun) -> None:
        with self._transaction(runs=True) as db:
            db.execute(
                "INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?)",
                (
                    run.unit,
                    run.machine_id,
                    run.unit_hash,
                    run.pid,
                    run.start_time,
                    json.dumps(run.groups),
                ),
            )

    def forget_run(self, unit: str, machine_id: str) -> None:
        with self._transaction(runs=True) as db:
            db.execute("DELETE FROM runs WHERE unit = ? AND machine_id = ?", (unit, machine_id))

    def close(self) -> None:
        for db in (self._runs_db, self._db):
            if db is not None:
                db.close()
        self._db = self._runs_db = None

    def _import_legacy(self) -> None:
        try:
            stored = StoredRegistry.model_validate_json(self._legacy.read_text())
        except (OSError, pydantic.ValidationError) as exc:
            raise StateFileError(
                f"{self._legacy} is not a localfleet registry file; move it away to start "
                f"empty: {exc}"
            ) from exc
        self.write(
            {unit.name: unit for unit in stored.units},
            {
                (machine_id, key): value
                for machine_id, values in stored.machine_metadata.items()
                for key, value in values.items()
            },
        )
        self._legacy.rename(self._legacy.with_name(LEGACY_FILE_NAME + ".imported"))
