"""The nouns of fleet that every other module shares.

These are fleet's own objects (`schema/v1.json`), held as frozen dataclasses:
`wire.py` turns them into fleet's JSON, `registry.py` stores them, `agent.py`
reports `UnitState`s. Job states are plain strings on purpose: fleet stores the
`desiredState` of an existing unit without validating it (fleet-api.md §4, 6c),
so a stored state can be any string and only these three have a meaning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

JOB_INACTIVE = "inactive"
JOB_LOADED = "loaded"
JOB_LAUNCHED = "launched"
JOB_STATES = frozenset({JOB_INACTIVE, JOB_LOADED, JOB_LAUNCHED})


@dataclasses.dataclass(frozen=True)
class UnitOption:
    """One `Name=Value` line of a unit file, in its `[Section]`."""

    section: str
    name: str
    value: str


@dataclasses.dataclass(frozen=True)
class Machine:
    """A fleet machine; localfleet presents several on one host."""

    id: str
    primary_ip: str
    metadata: Mapping[str, str]

    def short_id(self) -> str:
        return self.id[:8]

    def matches_id(self, wanted: str) -> bool:
        """fleet accepts the full id or its first 8 characters (`MachineState.MatchID`)."""
        return wanted in (self.id, self.short_id())


@dataclasses.dataclass(frozen=True)
class UnitState:
    """What the agent on one machine reports about one unit, as systemd names it."""

    name: str
    hash: str
    machine_id: str
    load_state: str
    active_state: str
    sub_state: str


@dataclasses.dataclass(frozen=True)
class DesiredInstance:
    """What the agent of one machine should do with one unit: have it loaded, and started or not."""

    unit_name: str
    machine_id: str
    options: tuple[UnitOption, ...]
    unit_hash: str
    launched: bool
