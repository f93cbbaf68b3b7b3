"""Unit files: fleet's rendering and hash, and the `[Service]` settings localfleet runs.

fleet never stores a unit file as text. It stores the options a client sent and
renders them with go-systemd's `Serialize` whenever it needs the text: the
`hash` of a UnitState is the hex SHA1 of that rendering, and two PUTs are "the
same unit" when their renderings hash the same (`unit.MatchUnitFiles`).
`render_unit_file` reproduces that rendering byte for byte.

`parse_unit_file` reads unit file text as systemd's `config_parse` does, and
`build_service_spec` runs the options through that rendering and parsing, so a
machine sees what a fleet host's systemd would see in the file fleet wrote: an
option value holding a line break becomes further lines there as well. Lines end
at `\n`, `\r\n`, a lone `\r` or NUL (systemd since v240; older versions cut
the line at `\r` or NUL instead), never at the other characters Python's
`str.splitlines` breaks at (VT, FF, FS, GS, RS, NEL, U+2028, U+2029): systemd
keeps those inside the line.

`build_service_spec` reads the `[Service]` section into a `ServiceSpec` for one
machine, with systemd's rules: specifiers are expanded when the unit is loaded,
an empty assignment (`ExecStartPre=`) resets a list, a setting that does not
parse is ignored with a warning (as systemd logs "ignoring"), and a unit
systemd would refuse to load raises `UnitLoadError`.

Supported: `Type=simple` (the default), `ExecStartPre`, `ExecStart`,
`ExecStartPost`, `ExecStop`, `ExecStopPost` with the `-` (ignore failure), `@`
(separate argv[0]) and `:` (no variable substitution) prefixes, `+`, `!` and
`!!` accepted and without effect; `Environment`, `EnvironmentFile` (`-` =
optional, globs allowed), `TimeoutStartSec`, `TimeoutStopSec`, `TimeoutSec`,
`SuccessExitStatus`. Not supported, and reported as ignored in the log:
`Restart=` (a failed unit stays failed, as fleet's agent never restarts one
either), `KillMode=`/`KillSignal=` (the whole process group always gets
SIGTERM then SIGKILL), `WorkingDirectory=` (always `/`), and every other
setting. `[Unit]` dependencies (`Requires=`, `BindsTo=`, `After=`) are not
enforced: each unit runs on its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import shlex
import signal
from collections.abc import Iterable, Sequence

from deployster.fleet import UnitOption

from .environ import parse_environment_assignments, split_words
from .unitname import expand_specifiers

# go-systemd's deserializer refuses lines this long (systemd's LINE_MAX); a line of its
# check ends at \r or \n.
_LINE_MAX = 2048
_GO_SYSTEMD_LINE_END = re.compile(r"[\r\n]")
# Where systemd (v240 and later, read_line) ends a line of a unit file.
_SYSTEMD_LINE_END = re.compile(r"\r\n|[\n\r\0]")
# systemd's WHITESPACE and COMMENTS.
_WHITESPACE = " \t\n\r"
_COMMENTS = "#;"

DEFAULT_TIMEOUT_START = 90.0  # systemd's DefaultTimeoutStartSec
# systemd's default is 90 s; 10 s keeps a stuck `docker stop` from holding a
# deploy or a test run for minutes. Units that need longer say so.
DEFAULT_TIMEOUT_STOP = 10.0

_UNSUPPORTED_TYPES = frozenset({"exec", "forking", "oneshot", "dbus", "notify", "idle"})
# Accepted without effect. User= and Group= are ignored because localfleet runs
# every unit as the user that started it: switching users needs root, and on
# `deployster up` the units drive the invoking user's Docker or podman anyway.
_IGNORED_SILENTLY = frozenset({"User", "Group"})
_EXEC_LISTS = ("ExecStartPre", "ExecStart", "ExecStartPost", "ExecStop", "ExecStopPost")
_EXEC_PREFIX_CHARS = "-@:+!"

_TIME_UNITS = {
    "us": 1e-6, "usec": 1e-6, "µs": 1e-6,
    "ms": 1e-3, "msec": 1e-3,
    "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "hours": 3600.0,
    "d": 86400.0, "day": 86400.0, "days": 86400.0,
    "w": 604800.0, "week": 604800.0, "weeks": 604800.0,
    "M": 2629800.0, "month": 2629800.0, "months": 2629800.0,
    "y": 31557600.0, "year": 31557600.0, "years": 31557600.0,
}  # fmt: skip
_TIME_PART = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-zµ]*)")


class UnitLoadError(ValueError):
    """systemd would refuse to load this unit, or localfleet cannot run it."""


class InvalidUnitOptionsError(ValueError):
    """The options do not survive go-systemd's serialize/deserialize check (API answers 400)."""


def render_unit_file(options: Iterable[UnitOption]) -> str:
    """The unit file text, as go-systemd's `Serialize`: options grouped by section in first-seen order."""
    sections: dict[str, list[UnitOption]] = {}
    for option in options:
        sections.setdefault(option.section, []).append(option)
    blocks = [
        f"[{section}]\n" + "".join(f"{option.name}={option.value}\n" for option in section_options)
        for section, section_options in sections.items()
    ]
    return "\n".join(blocks)


def unit_hash(options: Iterable[UnitOption]) -> str:
    """Hex SHA1 of the rendered unit file: fleet's unit hash."""
    return hashlib.sha1(render_unit_file(options).encode()).hexdigest()


def check_serializable(options: Sequence[UnitOption]) -> None:
    """Raise `InvalidUnitOptionsError` where go-systemd's round trip in `ValidateOptions` fails.

    This covers its failures that a client can actually cause: a line of 2048
    bytes or more, a `]` inside a section name, a newline inside an option name.
    """
    for option in options:
        if "]" in option.section:
            raise InvalidUnitOptionsError(f"found garbage after section name {option.section}")
        if "\n" in option.name or "\r" in option.name:
            raise InvalidUnitOptionsError(
                "unexpected newline encountered while parsing option name"
            )
    for line in _GO_SYSTEMD_LINE_END.split(render_unit_file(options)):
        if len(line.encode()) >= _LINE_MAX:
            raise InvalidUnitOptionsError(f"line too long (max {_LINE_MAX} bytes)")


def parse_unit_file(text: str) -> tuple[list[UnitOption], list[str]]:
    """The options systemd reads from unit file text, and the lines it ignores (as warnings).

    systemd's `config_parse`: a line whose first non-blank character is `#` or `;` is a
    comment, also inside a continuation; a line ending in an unescaped backslash goes on
    in the next one, the backslash becoming a space; `[Section]` starts a section;
    `Name=Value` with blanks around both stripped. A line outside any section, without
    `=` or without a name is ignored; a `[` line without its `]` makes the unit fail to
    load (`UnitLoadError`).
    """
    options: list[UnitOption] = []
    ignored: list[str] = []
    section: str | None = None
    continuation: str | None = None
    for line in _SYSTEMD_LINE_END.split(text):
        if line.lstrip(_WHITESPACE).startswith(tuple(_COMMENTS)):
            continue
        joined = line if continuation is None else continuation + line
        if _ends_escaped(joined):
            continuation = joined[:-1] + " "
            continue
        continuation = None
        section = _parse_line(joined, section, options, ignored)
    if continuation is not None:
        _parse_line(continuation, section, options, ignored)
    return options, ignored


def _ends_escaped(text: str) -> bool:
    trailing = len(text) - len(text.rstrip("\\"))
    return trailing % 2 == 1


def _parse_line(
    line: str, section: str | None, options: list[UnitOption], ignored: list[str]
) -> str | None:
    stripped = line.strip(_WHITESPACE)
    if not stripped:
        return section
    if stripped.startswith("["):
        if not stripped.endswith("]"):
            raise UnitLoadError(f"Invalid section header {stripped!r}")
        return stripped[1:-1]
    name, equals, value = stripped.partition("=")
    name = name.strip(_WHITESPACE)
    if section is None:
        ignored.append(f"assignment outside of section {stripped!r}, ignoring")
    elif not equals:
        ignored.append(f"missing '=' in {stripped!r}, ignoring line")
    elif not name:
        ignored.append(f"missing key name before '=' in {stripped!r}, ignoring line")
    else:
        options.append(UnitOption(section=section, name=name, value=value.strip(_WHITESPACE)))
    return section


def parse_timespan(text: str) -> float | None:
    """Seconds in a systemd time span (`90`, `90s`, `5min`, `1min 30s`, `500ms`); None for `infinity`."""
    stripped = text.strip()
    if stripped == "infinity":
        return None
    if not stripped:
        raise ValueError("empty time span")
    total = 0.0
    position = 0
    while position < len(stripped):
        match = _TIME_PART.match(stripped, position)
        if match is None or match.end() == position:
            raise ValueError(f"invalid time span: {text!r}")
        number, unit = match.groups()
        if unit not in _TIME_UNITS and unit != "":
            raise ValueError(f"unknown time unit {unit!r} in {text!r}")
        total += float(number) * _TIME_UNITS.get(unit, 1.0)
        position = match.end()
    return total


def parse_timeout(text: str) -> float | None:
    """A TimeoutStartSec/TimeoutStopSec value: None means no limit (`0` or `infinity`)."""
    seconds = parse_timespan(text)
    return None if seconds == 0 else seconds


@dataclasses.dataclass(frozen=True)
class ExecCommand:
    """One Exec line, specifiers expanded; variables are substituted when it runs."""

    path: str
    argv: tuple[str, ...]
    ignore_failure: bool = False
    expand_variables: bool = True


class ExecLineError(ValueError):
    """An Exec line that systemd would ignore."""


def parse_exec_line(line: str) -> ExecCommand:
    """Split an Exec line with shell-like quoting and read its prefixes."""
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise ExecLineError(f"cannot split command line: {exc}") from exc
    if not words:
        raise ExecLineError("empty command line")
    first = words[0]
    prefixes = first[: len(first) - len(first.lstrip(_EXEC_PREFIX_CHARS))]
    path = first[len(prefixes) :]
    if not path:
        raise ExecLineError("empty executable name")
    rest = words[1:]
    if "@" in prefixes:
        if not rest:
            raise ExecLineError("the @ prefix needs an argv[0] after the executable")
        argv = tuple(rest)
    else:
        argv = (path, *rest)
    return ExecCommand(
        path=path,
        argv=argv,
        ignore_failure="-" in prefixes,
        expand_variables=":" not in prefixes,
    )


@dataclasses.dataclass(frozen=True)
class EnvironmentFileRef:
    path: str
    optional: bool


@dataclasses.dataclass(frozen=True)
class ServiceSpec:
    """What the agent needs to run one `.service` unit on one machine."""

    exec_start: ExecCommand
    exec_start_pre: tuple[ExecCommand, ...] = ()
    exec_start_post: tuple[ExecCommand, ...] = ()
    exec_stop: tuple[ExecCommand, ...] = ()
    exec_stop_post: tuple[ExecCommand, ...] = ()
    environment: tuple[tuple[str, str], ...] = ()
    environment_files: tuple[EnvironmentFileRef, ...] = ()
    timeout_start: float | None = DEFAULT_TIMEOUT_START
    timeout_stop: float | None = DEFAULT_TIMEOUT_STOP
    success_exit_codes: frozenset[int] = frozenset()
    success_signals: frozenset[int] = frozenset()
    warnings: tuple[str, ...] = ()


def build_service_spec(
    options: Iterable[UnitOption], unit_name: str, machine_id: str, hostname: str
) -> ServiceSpec:
    """Read the `[Service]` section of `unit_name` as loaded on `machine_id`: from the
    unit file fleet would write for `options`, as systemd reads it."""
    if not unit_name.endswith(".service"):
        raise UnitLoadError("localfleet runs only .service units")
    builder = _SpecBuilder(unit_name, machine_id, hostname)
    parsed, ignored = parse_unit_file(render_unit_file(options))
    builder.warn(ignored)
    for option in parsed:
        if option.section == "Service":
            builder.apply(option.name, option.value)
    return builder.build()


class _SpecBuilder:
    def __init__(self, unit_name: str, machine_id: str, hostname: str) -> None:
        self._unit_name = unit_name
        self._machine_id = machine_id
        self._hostname = hostname
        self._exec: dict[str, list[ExecCommand]] = {name: [] for name in _EXEC_LISTS}
        self._environment: dict[str, str] = {}
        self._environment_files: list[EnvironmentFileRef] = []
        # None: no limit (a timeout of 0 or infinity).
        self._timeout_start: float | None = DEFAULT_TIMEOUT_START
        self._timeout_stop: float | None = DEFAULT_TIMEOUT_STOP
        self._success_exit_codes: set[int] = set()
        self._success_signals: set[int] = set()
        self._warnings: list[str] = []
        self._ignored: list[str] = []

    def warn(self, warnings: Iterable[str]) -> None:
        self._warnings.extend(warnings)

    def _expand(self, text: str) -> str:
        return expand_specifiers(text, self._unit_name, self._machine_id, self._hostname)

    def apply(self, name: str, value: str) -> None:
        if name in self._exec:
            self._apply_exec(name, value)
        elif name == "Type":
            self._apply_type(value.strip())
        elif name == "Environment":
            self._apply_environment(value)
        elif name == "EnvironmentFile":
            self._apply_environment_file(value.strip())
        elif name in ("TimeoutStartSec", "TimeoutStopSec", "TimeoutSec"):
            self._apply_timeout(name, value)
        elif name == "SuccessExitStatus":
            self._apply_success_exit_status(value)
        elif name not in _IGNORED_SILENTLY and name not in self._ignored:
            self._ignored.append(name)

    def _apply_exec(self, name: str, value: str) -> None:
        if not value.strip():
            self._exec[name].clear()
            return
        try:
            self._exec[name].append(parse_exec_line(self._expand(value)))
        except ExecLineError as exc:
            self._warnings.append(f"{name}={value}: {exc}, ignoring")

    def _apply_type(self, value: str) -> None:
        if value in ("", "simple"):
            return
        if value in _UNSUPPORTED_TYPES:
            raise UnitLoadError(f"Type={value} is not supported by localfleet, only Type=simple")
        self._warnings.append(f"unknown Type={value}, ignoring")

    def _apply_environment(self, value: str) -> None:
        if not value.strip():
            self._environment.clear()
            return
        words = [self._expand(word) for word in split_words(value)]
        assignments, ignored = parse_environment_assignments(words)
        self._environment.update(assignments)
        self._warnings.extend(
            f"invalid environment assignment {word!r}, ignoring" for word in ignored
        )

    def _apply_environment_file(self, value: str) -> None:
        if not value:
            self._environment_files.clear()
            return
        optional = value.startswith("-")
        path = self._expand(value[1:] if optional else value)
        if not path.startswith("/"):
            self._warnings.append(f"EnvironmentFile={value}: path is not absolute, ignoring")
            return
        self._environment_files.append(EnvironmentFileRef(path, optional))

    def _apply_timeout(self, name: str, value: str) -> None:
        try:
            timeout = parse_timeout(value)
        except ValueError as exc:
            self._warnings.append(f"{name}={value}: {exc}, ignoring")
            return
        if name in ("TimeoutStartSec", "TimeoutSec"):
            self._timeout_start = timeout
        if name in ("TimeoutStopSec", "TimeoutSec"):
            self._timeout_stop = timeout

    def _apply_success_exit_status(self, value: str) -> None:
        if not value.strip():
            self._success_exit_codes.clear()
            self._success_signals.clear()
            return
        for word in value.split():
            if word.isascii() and word.isdigit() and int(word) <= 255:
                self._success_exit_codes.add(int(word))
                continue
            signal_name = word if word.startswith("SIG") else f"SIG{word}"
            try:
                self._success_signals.add(signal.Signals[signal_name].value)
            except KeyError:
                self._warnings.append(f"SuccessExitStatus: invalid status {word!r}, ignoring")

    def build(self) -> ServiceSpec:
        starts = self._exec["ExecStart"]
        if not starts:
            raise UnitLoadError("Service has no ExecStart= setting. Refusing.")
        if len(starts) > 1:
            raise UnitLoadError(
                "Service has more than one ExecStart= setting, which is only allowed for Type=oneshot services. Refusing."
            )
        warnings = list(self._warnings)
        if self._ignored:
            warnings.append(
                "settings not supported by localfleet, ignoring: " + ", ".join(self._ignored)
            )
        return ServiceSpec(
            exec_start=starts[0],
            exec_start_pre=tuple(self._exec["ExecStartPre"]),
            exec_start_post=tuple(self._exec["ExecStartPost"]),
            exec_stop=tuple(self._exec["ExecStop"]),
            exec_stop_post=tuple(self._exec["ExecStopPost"]),
            environment=tuple(self._environment.items()),
            environment_files=tuple(self._environment_files),
            timeout_start=self._timeout_start,
            timeout_stop=self._timeout_stop,
            success_exit_codes=frozenset(self._success_exit_codes),
            success_signals=frozenset(self._success_signals),
            warnings=tuple(warnings),
        )
