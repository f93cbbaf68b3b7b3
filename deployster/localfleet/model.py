"""What the registry asks of the agent: `DesiredInstance`, localfleet's own noun.

fleet's nouns that travel as JSON (`UnitOption`, `UnitState`, `Machine`, the
job states) are defined once, in `deployster/fleet.py`, for the client and for
localfleet; `registry.py` stores them and `agent.py` reports `UnitState`s.
"""

from __future__ import annotations

import dataclasses

from deployster.fleet import UnitOption


@dataclasses.dataclass(frozen=True)
class DesiredInstance:
    """What the agent of one machine should do with one unit: have it loaded, and started or not."""

    unit_name: str
    machine_id: str
    options: tuple[UnitOption, ...]
    unit_hash: str
    launched: bool
