"""Unit output: localfleet's stand-in for the systemd journal.

Every process a unit starts writes stdout and stderr into one pipe; a task
copies it line by line to the unit's journal, together with localfleet's own
lines about the unit ("Main process exited, code=exited, status=1").

- With a state directory the journal is `<state_dir>/logs/<unit name>.log`
  (`journalctl -u` becomes `tail -f`), one line per record:
  `<UTC time> <machine id, 8 chars> <tag>[<pid>]: <text>`.
- Without one, lines go to localfleet's stderr prefixed by the unit name,
  `<unit name>[<machine id, 8 chars>] <tag>[<pid>]: <text>`, so that the
  output of `deployster up` and of test runs stays readable.

Writes are small, unbuffered appends (O_APPEND), so the instances of a global
unit can share one file without tearing lines. The file is opened for each
write and closed again, so ten thousand units do not hold ten thousand
descriptors (each running unit already holds one for its output pipe).

Each journal also keeps its last `TAIL_LINES` lines in memory (`tail`), with or
without a state directory: the API serves them as `GET /fleet/v1/journal/{unit}`,
so that a deploy whose unit failed can say why.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import os
import pathlib
import sys

_CHUNK = 65536
TAIL_LINES = 100
LOCALFLEET_TAG = "localfleet"


class UnitJournal:
    """The journal of one unit instance (one unit on one machine)."""

    def __init__(self, unit_name: str, machine_id: str, log_dir: pathlib.Path | None) -> None:
        self._unit_name = unit_name
        self._machine = machine_id[:8]
        self._path: pathlib.Path | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            self._path = log_dir / f"{unit_name}.log"
            self._path.touch()

    def write(self, tag: str, pid: int | None, text: str) -> None:
        source = f"{tag}[{pid}]" if pid is not None else tag
        self._tail.append(f"{source}: {text}")
        if self._path is not None:
            now = (
                datetime.datetime.now(datetime.UTC)
                .isoformat(timespec="milliseconds")
                .replace("+00:00", "Z")
            )
            fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, f"{now} {self._machine} {source}: {text}\n".encode())
            finally:
                os.close(fd)
        else:
            sys.stderr.write(f"{self._unit_name}[{self._machine}] {source}: {text}\n")
            sys.stderr.flush()

    def tail(self, lines: int) -> list[str]:
        """The last ``lines`` lines, oldest first, as ``<tag>[<pid>]: <text>``."""
        return list(self._tail)[-lines:] if lines > 0 else []

    def note(self, text: str) -> None:
        """A line from localfleet itself, as systemd writes its own lines about a unit."""
        self.write(LOCALFLEET_TAG, None, text)

    def follow(self, tag: str, pid: int, stream: asyncio.StreamReader) -> asyncio.Task[None]:
        """Copy a process's output into the journal until the pipe closes."""
        return asyncio.create_task(
            self._copy(tag, pid, stream), name=f"journal:{self._unit_name}:{pid}"
        )

    async def _copy(self, tag: str, pid: int, stream: asyncio.StreamReader) -> None:
        pending = b""
        while chunk := await stream.read(_CHUNK):
            *lines, pending = (pending + chunk).split(b"\n")
            if (
                len(pending) >= _CHUNK
            ):  # a line that never ends is cut, as the journal cuts long lines
                lines.append(pending)
                pending = b""
            for line in lines:
                self.write(tag, pid, line.decode(errors="replace"))
        if pending:
            self.write(tag, pid, pending.decode(errors="replace"))
