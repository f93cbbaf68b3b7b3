r"""Unit and container names: format, parse and validate.

Deploy state that fleet must be able to tell apart lives in the unit name, exactly as the
original Deployster encoded it::

    <service>:<version>:<timestamp>@<instance>.service

The timestamp is taken once per deploy (Go layout ``2006.01.02-15.04.05``, UTC) so unit names
never repeat (fleet bug #1131) and one version can be redeployed beside itself. Containers and
router ids use the same parts joined by ``-`` because ``:`` is not allowed there.

Service and version are checked here, before anything reaches fleet, against fleet's name
rules narrowed by the grammar itself: ``:`` and ``@`` are the delimiters, so neither may appear
inside a part. Digits are ASCII digits (``[0-9]``, never ``\d``, which matches any Unicode
digit such as the full-width digits of U+FF10..U+FF19). The whole name must fit the limit of the host's systemd, which
is stricter than fleet's: ``check_length`` lets the API refuse a deploy before anything is
locked or written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

TIMESTAMP_FORMAT = "%Y.%m.%d-%H.%M.%S"
UNIT_SUFFIX = ".service"
# fleet caps unit names at 256 characters (api/units.go ValidateName); systemd's UNIT_NAME_MAX
# of 256 counts the terminating NUL, so the host's systemd takes at most 255.
MAX_UNIT_NAME = 255

# At most 128 characters, like a version: with a version, a timestamp and an instance it must
# still fit a unit name (check_length), and it names etcd keys and router services.
_SERVICE_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,126}[A-Za-z0-9_])?")
# A version is a Docker tag: starts with a word character, at most 128 characters.
_VERSION_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_TIMESTAMP_RE = re.compile(r"[0-9]{4}\.[0-9]{2}\.[0-9]{2}-[0-9]{2}\.[0-9]{2}\.[0-9]{2}")
_INSTANCE_RE = re.compile(r"[0-9]+")
# The same rules as JSON Schema patterns, for the API's OpenAPI document.
SERVICE_PATTERN = f"^{_SERVICE_RE.pattern}$"
VERSION_PATTERN = f"^{_VERSION_RE.pattern}$"
TIMESTAMP_PATTERN = f"^{_TIMESTAMP_RE.pattern}$"


class InvalidNameError(ValueError):
    """A service, version, timestamp or instance that cannot become a fleet unit name."""


def validate_service(service: str) -> str:
    if not _SERVICE_RE.fullmatch(service):
        raise InvalidNameError(
            f"Service name {service[:140]!r} is not valid: use at most 128 letters, digits, "
            "'-', '_' and '.', starting with a letter or digit."
        )
    return service


def validate_version(version: str) -> str:
    if not _VERSION_RE.fullmatch(version):
        raise InvalidNameError(
            f"Version {version!r} is not valid: a version is a Docker tag of at most 128 "
            "letters, digits, '_', '.' and '-', not starting with '.' or '-'."
        )
    return version


def validate_timestamp(timestamp: str) -> str:
    try:
        parse_timestamp(timestamp)
    except ValueError:
        raise InvalidNameError(
            f"Timestamp {timestamp!r} is not valid: use the layout YYYY.MM.DD-HH.MM.SS in UTC."
        ) from None
    return timestamp


def check_length(service: str, version: str, timestamp: str, instance: int) -> None:
    """Refuse parts whose unit name (for instance number ``instance``) would be too long."""
    name = f"{service}:{version}:{timestamp}@{instance}{UNIT_SUFFIX}"
    if len(name) > MAX_UNIT_NAME:
        raise InvalidNameError(
            f"The unit name for service {service!r} and version {version!r} would be "
            f"{len(name)} characters (instance {instance}), longer than the limit of "
            f"{MAX_UNIT_NAME}; use a shorter service name or version."
        )


def format_timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime(TIMESTAMP_FORMAT)


def parse_timestamp(timestamp: str) -> datetime:
    if not _TIMESTAMP_RE.fullmatch(timestamp):
        raise ValueError(f"not a deploy timestamp: {timestamp!r}")
    return datetime.strptime(timestamp, TIMESTAMP_FORMAT).replace(tzinfo=UTC)


def now_timestamp() -> str:
    return format_timestamp(datetime.now(UTC))


@dataclass(frozen=True, order=True)
class UnitName:
    """The parts of one managed unit: one instance of one deploy of a service."""

    service: str
    version: str
    timestamp: str
    instance: int

    @classmethod
    def build(cls, service: str, version: str, timestamp: str, instance: int) -> UnitName:
        """Validated constructor: raises InvalidNameError with a sentence for the API to return."""
        validate_service(service)
        validate_version(version)
        validate_timestamp(timestamp)
        if instance < 1:
            raise InvalidNameError(f"Instance numbers start at 1, not {instance}.")
        check_length(service, version, timestamp, instance)
        return cls(service, version, timestamp, instance)

    @classmethod
    def parse(cls, name: str) -> UnitName | None:
        """Parse a fleet unit name; ``None`` for units Deployster does not manage.

        The rules are the original's: managed means exactly two ``:``; the instance (ASCII
        digits) is between the last ``@`` and the last ``.``.
        """
        if name.count(":") != 2 or not name.endswith(UNIT_SUFFIX):
            return None
        stem = name[: -len(UNIT_SUFFIX)]
        head, at, instance = stem.rpartition("@")
        if not at or not _INSTANCE_RE.fullmatch(instance):
            return None
        service, version_ts = head.split(":", 1)
        version, _, timestamp = version_ts.rpartition(":")
        if not (service and version and timestamp):
            return None
        return cls(service, version, timestamp, int(instance))

    @classmethod
    def parse_valid(cls, name: str) -> UnitName:
        """Parse a unit name Deployster wrote and check its parts as ``build`` does (a record
        written by an older server may hold one that no longer passes)."""
        parsed = cls.parse(name)
        if parsed is None:
            raise InvalidNameError(f"{name!r} is not a unit name of a Deployster deploy.")
        return cls.build(parsed.service, parsed.version, parsed.timestamp, parsed.instance)

    @property
    def release(self) -> str:
        """``<version>:<timestamp>``: what the original called one "version" of a service."""
        return f"{self.version}:{self.timestamp}"

    @property
    def description(self) -> str:
        return f"{self.service}-{self.version}-{self.timestamp}"

    @property
    def container(self) -> str:
        return f"{self.service}-{self.version}-{self.timestamp}-{self.instance}"

    def __str__(self) -> str:
        return f"{self.service}:{self.version}:{self.timestamp}@{self.instance}{UNIT_SUFFIX}"
