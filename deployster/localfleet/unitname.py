"""Unit names: fleet's validation rule and the parts systemd derives from a name.

fleet checks a name before it stores a unit (`api/units.go` `ValidateName`, a
copy of systemd's `unit_name_is_valid`), and both fleet and systemd split a
name into prefix, instance and suffix to expand specifiers such as `%i`.
The messages of `InvalidUnitNameError` are fleet's own, because the API returns
them verbatim in its 400 answers.

The instance is the text after the *first* `@` (systemd's `unit_name_to_instance`
and fleet's `NewUnitNameInfo` both use the first one), so `a@b@c.service` has
prefix `a` and instance `b@c`.
"""

from __future__ import annotations

import dataclasses
import string

UNIT_NAME_MAX = 256

_VALID_CHARS = frozenset(string.ascii_letters + string.digits + ":-_.\\@")

UNIT_TYPES = frozenset(
    {
        "automount",
        "busname",
        "device",
        "mount",
        "path",
        "scope",
        "service",
        "slice",
        "snapshot",
        "socket",
        "swap",
        "target",
        "timer",
    }
)
TEMPLATE_UNIT_TYPES = frozenset({"path", "service", "socket", "target", "timer"})


class InvalidUnitNameError(ValueError):
    """The name breaks fleet's naming rule; the message is fleet's."""


def validate_unit_name(name: str) -> None:
    """Raise `InvalidUnitNameError` with the first problem fleet would report."""
    length = len(name.encode())
    if length == 0:
        raise InvalidUnitNameError("unit name cannot be empty")
    if length > UNIT_NAME_MAX:
        raise InvalidUnitNameError(f"unit name exceeds maximum length ({UNIT_NAME_MAX})")
    dot = name.rfind(".")
    if dot == -1:
        raise InvalidUnitNameError('unit name must contain "."')
    if dot == len(name) - 1:
        raise InvalidUnitNameError('unit name cannot end in "."')
    suffix = name[dot + 1 :]
    if suffix not in UNIT_TYPES:
        raise InvalidUnitNameError(f'invalid unit type: "{suffix}"')
    if "@" in name and suffix not in TEMPLATE_UNIT_TYPES:
        raise InvalidUnitNameError(f'invalid unit type for template: "{suffix}"')
    for char in name[:dot]:
        if char not in _VALID_CHARS:
            raise InvalidUnitNameError(f"invalid character {char!r} in unit name")
    if name.startswith("@"):
        raise InvalidUnitNameError('unit name cannot start in "@"')


@dataclasses.dataclass(frozen=True)
class UnitNameInfo:
    """The parts of `foo@bar.service`: full name, name `foo@bar`, prefix `foo`, instance `bar`."""

    full_name: str
    name: str
    prefix: str
    template: str
    instance: str

    @property
    def is_template(self) -> bool:
        return bool(self.template) and not self.instance


def parse_unit_name(full_name: str) -> UnitNameInfo | None:
    """Split a name as fleet's `NewUnitNameInfo` does; None when it has no `.`."""
    dot = full_name.rfind(".")
    if dot == -1:
        return None
    name, suffix = full_name[:dot], full_name[dot:]
    at = name.find("@")
    if at == -1:
        return UnitNameInfo(full_name, name, prefix=name, template="", instance="")
    return UnitNameInfo(
        full_name,
        name,
        prefix=name[:at],
        template=f"{name[:at]}@{suffix}",
        instance=name[at + 1 :],
    )


def expand_specifiers(text: str, unit_name: str, machine_id: str, hostname: str) -> str:
    """Expand systemd's `%` specifiers in an Exec or Environment value.

    Supported: `%n` full name, `%N` name without suffix, `%p` prefix, `%i`
    instance, `%m` machine id, `%H` hostname, `%%` a literal `%`. An unknown
    specifier is kept as written, as the systemd of fleet's era (v2xx) did.
    """
    info = parse_unit_name(unit_name)
    values = {
        "n": unit_name,
        "N": info.name if info else unit_name,
        "p": info.prefix if info else unit_name,
        "i": info.instance if info else "",
        "m": machine_id,
        "H": hostname,
        "%": "%",
    }
    out: list[str] = []
    index = 0
    while index < len(text):
        char = text[index]
        if char == "%" and index + 1 < len(text):
            spec = text[index + 1]
            out.append(values.get(spec, "%" + spec))
            index += 2
            continue
        out.append(char)
        index += 1
    return "".join(out)
