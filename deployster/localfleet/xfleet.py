"""The `[X-Fleet]` section: where a unit may run, read as fleet reads it (`job/job.go`).

`fleet_requirements` turns the options into `Requirements`; the scheduler and
the agent use nothing else. fleet's reading rules, kept here:

- A value that starts and ends with `"` holds several quoted values
  (`MachineMetadata="a=b" "c=d"`); other values are one value.
- `Conflicts` values are further split on whitespace; `Global` is truthy
  when its last value is `true|yes|1|on|t` (any case).
- `%n %N %p %i` are expanded with the unit's name; when the API validates a
  new unit it reads them *without* expansion, as fleet does (its check builds
  a job with no name), so `MachineOf=app@%i.service` is compared to conflict
  globs literally.
- Deprecated spellings are read too: `X-ConditionMachineID`,
  `X-ConditionMachineBootID`, `X-ConditionMachineOf`,
  `X-ConditionMachineMetadata`, `X-Conflicts`. Unknown keys are ignored:
  fleet's API does not reject them, only fleetctl does.

Globs follow Go's `path.Match` (`*`, `?`, `[a-z]`, `[^a]`, `\\` escapes);
a malformed glob matches nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterable, Mapping

from deployster.fleet import UnitOption

from .unitname import parse_unit_name

_TRUTHY = frozenset({"true", "yes", "1", "on", "t"})


class InvalidRequirementsError(ValueError):
    """An X-Fleet combination fleet's API refuses with 400; the message is fleet's."""


@dataclasses.dataclass(frozen=True)
class Requirements:
    machine_id: str | None = None
    peers: tuple[str, ...] = ()
    metadata: Mapping[str, frozenset[str]] = dataclasses.field(default_factory=dict)
    conflicts: tuple[str, ...] = ()
    replaces: tuple[str, ...] = ()
    is_global: bool = False


def parse_multivalue(value: str) -> list[str]:
    """fleet's `parseMultivalueLine`: `"a" "b c"` is two values, anything else one."""
    if not (value.startswith('"') and value.endswith('"')):
        return [value]
    values: list[str] = []
    current: list[str] = []
    quoted = False
    for char in value:
        if char == '"':
            quoted = not quoted
        elif char == " " and not quoted:
            values.append("".join(current))
            current = []
        else:
            current.append(char)
    values.append("".join(current))
    return values


def _fleet_printf(value: str, unit_name: str) -> str:
    """fleet's `unitPrintf`: only `%n %N %p %i`, replaced one after the other."""
    info = parse_unit_name(unit_name)
    if info is None:
        return value
    out = value.replace("%n", info.full_name)
    out = out.replace("%N", info.name)
    out = out.replace("%p", info.prefix)
    return out.replace("%i", info.instance)


def _x_fleet_values(options: Iterable[UnitOption], unit_name: str | None) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for option in options:
        if option.section != "X-Fleet":
            continue
        parsed = parse_multivalue(option.value)
        if unit_name is not None:
            parsed = [_fleet_printf(value, unit_name) for value in parsed]
        values.setdefault(option.name, []).extend(parsed)
    return values


def fleet_requirements(options: Iterable[UnitOption], unit_name: str | None) -> Requirements:
    """Read X-Fleet options; `unit_name=None` reads them unexpanded, as fleet's validation does."""
    values = _x_fleet_values(options, unit_name)

    machine_id = None
    for key in ("MachineID", "X-ConditionMachineID", "X-ConditionMachineBootID"):
        if values.get(key):
            machine_id = values[key][0]
            break

    metadata: dict[str, set[str]] = {}
    for key in ("X-ConditionMachineMetadata", "MachineMetadata"):
        for pair in values.get(key, []):
            parts = pair.split("=")
            if len(parts) == 2 and parts[0] and parts[1]:
                metadata.setdefault(parts[0], set()).add(parts[1])

    conflicts = [
        glob
        for key in ("X-Conflicts", "Conflicts")
        for value in values.get(key, [])
        for glob in value.split()
    ]
    peers = values.get("X-ConditionMachineOf", []) + values.get("MachineOf", [])
    global_values = values.get("Global", [])
    return Requirements(
        machine_id=machine_id,
        peers=tuple(dict.fromkeys(peers)),
        metadata={key: frozenset(wanted) for key, wanted in metadata.items()},
        conflicts=tuple(conflicts),
        replaces=tuple(values.get("Replaces", [])),
        is_global=bool(global_values) and global_values[-1].lower() in _TRUTHY,
    )


def validate_requirements(options: Iterable[UnitOption]) -> None:
    """Raise `InvalidRequirementsError` for the X-Fleet combinations fleet's API refuses (`ValidateOptions`)."""
    requirements = fleet_requirements(options, unit_name=None)
    conflicts = sorted(set(requirements.conflicts))
    replaces = sorted(set(requirements.replaces))
    for peer in sorted(set(requirements.peers)):
        for conflict in conflicts:
            if glob_match(conflict, peer):
                raise InvalidRequirementsError(
                    f'unresolvable requirements: peer "{peer}" matches conflict "{conflict}"'
                )
        for replace in replaces:
            if glob_match(replace, peer):
                raise InvalidRequirementsError(
                    f'unresolvable requirements: peer "{peer}" matches replace "{replace}"'
                )
    has_target = requirements.machine_id is not None
    rules = (
        (has_target and bool(requirements.peers), "MachineID cannot be used with Peers"),
        (has_target and bool(conflicts), "MachineID cannot be used with Conflicts"),
        (has_target and requirements.is_global, "MachineID cannot be used with Global"),
        (has_target and bool(replaces), "MachineID cannot be used with Replaces"),
        (requirements.is_global and bool(requirements.peers), "Global cannot be used with Peers"),
        (requirements.is_global and bool(replaces), "Global cannot be used with Replaces"),
        (bool(conflicts) and bool(replaces), "Conflicts cannot be used with Replaces"),
    )
    for broken, message in rules:
        if broken:
            raise InvalidRequirementsError(message)


def glob_match(pattern: str, name: str) -> bool:
    """Go's `path.Match(pattern, name)`; a malformed pattern matches nothing."""
    if not any(special in pattern for special in "?[\\"):
        head, star, tail = pattern.partition("*")
        if not star:
            return pattern == name
        if "*" not in tail:  # `app@*.service`, the common case, without a regular expression
            return (
                len(name) >= len(head) + len(tail)
                and name.startswith(head)
                and name.endswith(tail)
                and "/" not in name[len(head) : len(name) - len(tail)]
            )
    compiled = _compile_glob(pattern)
    return compiled is not None and compiled.fullmatch(name) is not None


@functools.lru_cache(maxsize=1024)
def _compile_glob(pattern: str) -> re.Pattern[str] | None:
    try:
        return re.compile(_glob_to_regex(pattern), re.DOTALL)
    except _BadGlobError:
        return None


class _BadGlobError(Exception):
    pass


def _glob_to_regex(pattern: str) -> str:
    out: list[str] = []
    index = 0
    while index < len(pattern):
        char = pattern[index]
        if char == "*":
            out.append("[^/]*")
            index += 1
        elif char == "?":
            out.append("[^/]")
            index += 1
        elif char == "\\":
            if index + 1 >= len(pattern):
                raise _BadGlobError
            out.append(re.escape(pattern[index + 1]))
            index += 2
        elif char == "[":
            regex, index = _class_to_regex(pattern, index + 1)
            out.append(regex)
        else:
            out.append(re.escape(char))
            index += 1
    return "".join(out)


def _class_to_regex(pattern: str, index: int) -> tuple[str, int]:
    """A `[...]` class starting after its `[`; returns the regex and the index after `]`."""
    negated = pattern.startswith("^", index)
    if negated:
        index += 1
    ranges: list[tuple[str, str]] = []
    count = 0
    while True:
        if pattern.startswith("]", index) and count > 0:
            index += 1
            break
        low, index = _class_char(pattern, index)
        high = low
        if pattern.startswith("-", index):
            high, index = _class_char(pattern, index + 1)
        count += 1
        if low <= high:  # Go accepts an empty range; it simply never matches.
            ranges.append((low, high))
    body = "".join(
        re.escape(low) if low == high else f"{re.escape(low)}-{re.escape(high)}"
        for low, high in ranges
    )
    if not body:
        return ("." if negated else "(?!)"), index
    return (f"[^{body}]" if negated else f"[{body}]"), index


def _class_char(pattern: str, index: int) -> tuple[str, int]:
    if index >= len(pattern) or pattern[index] in "-]":
        raise _BadGlobError
    if pattern[index] == "\\":
        index += 1
        if index >= len(pattern):
            raise _BadGlobError
    return pattern[index], index + 1
