"""Unit templates: the systemd unit each instance runs, rendered to fleet's option list.

fleet does not take unit files: it takes an ordered list of ``{"section", "name", "value"}``
options (`reference/fleet-api.md` §3). Deployster keeps the unit as what operators know, a
systemd unit file, with Jinja2 placeholders for the deploy's parts, and turns the rendered
text into that list here, with systemd's own file syntax (sections, ``Name=Value``, comments,
trailing-backslash continuations).

Two templates ship in ``deployster/templates/``:

``docker``
    The original's unit (`reference/original-deployster.md` §4) minus its weaknesses (§11):
    the instance is announced as soon as Docker has published the port instead of after a
    fixed sleep, the container port and the environment come from the deploy, and the
    instances of one deploy are spread over machines.
``workload``
    Runs ``deployster.testing.workload`` instead of a container, for tests, benchmarks and
    the demo; the workload announces and withdraws itself.

Operators can pass a path to their own file instead (the original's issue #7).

Three layers of substitution meet in a unit and must not be confused:

* Jinja2 (``{{ name }}``, ``{% ... %}``) runs here, once per instance, with
  ``StrictUndefined``: a placeholder that is not in :class:`UnitContext` is an error, and
  :func:`load_template` renders a sample context so that the error shows at start-up,
  not at the first deploy. Jinja reads the whole file, comments included, so ``{{``,
  ``{%`` and ``{#`` (the shell's ``${#VAR}`` too) may appear only as Jinja syntax or
  inside ``{% raw %}``.
* systemd (or localfleet) expands specifiers (``%i %n %m``..., ``%%`` for ``%``) and, in
  Exec lines, ``$VAR`` and ``${VAR}``; ``$$`` is its escape for a ``$`` the shell must see.
* ``/bin/sh`` then runs the scripts of the Exec lines.

Everything a template interpolates is either validated to contain no character that one
of those layers would interpret (names, image, endpoints, keys), or quoted for systemd
(environment values, see :func:`environment_line`).

An instance announces itself in etcd under :func:`announce_key` with an
:class:`Announcement`; the instances watch reads that layout back with
:func:`parse_announce_key`, so the layout lives in this module only.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
import jinja2.nodes
from pydantic import BaseModel

from deployster.fleet import UnitOption
from deployster.naming import UnitName

BUILTIN_TEMPLATES = ("docker", "workload")
DEFAULT_CONTAINER_PORT = 3000
# The programs a unit calls where CoreOS keeps them; `deployster up` passes what it finds.
DEFAULT_DOCKER = "/usr/bin/docker"
DEFAULT_ETCDCTL = "/usr/bin/etcdctl"
# Every address of the machine, where routers on other machines reach the instances.
DEFAULT_PUBLISH_ADDRESS = "0.0.0.0"
# Kubernetes' names: pull before every start, only when the image is missing, or never.
PULL_POLICIES = ("always", "missing", "never")

#: The names a template can use; anything else is an error at load time.
TEMPLATE_VARIABLES = frozenset(
    {
        "service",
        "version",
        "timestamp",
        "instance",
        "unit_name",
        "description",
        "container",
        "image",
        "env",
        "etcd_endpoints",
        "announce_key",
        "container_port",
        "python",
        "environment",
        "docker",
        "etcdctl",
        "pull_policy",
        "publish_address",
    }
)

# Option names fleet itself acts on (reference/fleet-api.md §10). The HTTP API accepts any
# name in [X-Fleet] and silently ignores a misspelt one, so the check has to happen here.
X_FLEET_OPTIONS = frozenset(
    {
        "MachineID",
        "MachineOf",
        "MachineMetadata",
        "Conflicts",
        "Global",
        "Replaces",
        "X-ConditionMachineID",
        "X-ConditionMachineBootID",
        "X-ConditionMachineOf",
        "X-ConditionMachineMetadata",
        "X-Conflicts",
    }
)

# go-systemd, which fleet uses to check every unit it accepts, refuses lines this long.
LINE_MAX = 2048

_ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Values interpolated bare into Exec lines and shell scripts: nothing that systemd (%, $,
# quotes, backslash) or sh (quotes, ;, &, |, <, >, spaces, globs) would interpret.
_PLAIN_WORD_RE = re.compile(r"[A-Za-z0-9_@+=:,./~-]+")
_SECTION_RE = re.compile(r"\[([^\[\]]+)\]")


class TemplateError(ValueError):
    """A unit template that cannot be loaded or rendered; the message names file and problem."""


class Announcement(BaseModel):
    """The value an instance writes under its announce key: where it answers, and who it is.

    Both writers produce exactly this JSON: the docker template's ``ExecStartPost`` script
    and the test workload.
    """

    url: str
    machine: str
    unit: str


def announce_key(prefix: str, unit: UnitName) -> str:
    """``<prefix>/instances/<service>/<version>:<timestamp>/<n>``: where ``unit`` announces."""
    return f"{instances_prefix(prefix, unit.service)}{unit.release}/{unit.instance}"


def instances_prefix(prefix: str, service: str | None = None) -> str:
    """The etcd prefix of every announcement, or of one service's, ending with ``/``."""
    base = f"{prefix.rstrip('/')}/instances/"
    return f"{base}{service}/" if service is not None else base


def parse_announce_key(prefix: str, key: str) -> UnitName | None:
    """The unit behind an announce key; ``None`` for a key outside the layout."""
    base = instances_prefix(prefix)
    if not key.startswith(base):
        return None
    parts = key[len(base) :].split("/")
    if len(parts) != 3 or not parts[2].isdigit():
        return None
    service, release, instance = parts
    version, colon, timestamp = release.rpartition(":")
    if not (service and colon and version and timestamp):
        return None
    return UnitName(service, version, timestamp, int(instance))


def image_name(prefix: str, service: str, version: str) -> str:
    """``<prefix>/<service>:<version>``; prefix is ``-registry-url`` if set, else the hub user."""
    return f"{prefix.rstrip('/')}/{service}:{version}"


def service_of_repository(prefix: str, repository: str) -> str | None:
    """The service whose images are ``repository`` by the convention of :func:`image_name`,
    else None. ``repository`` is a registry path without host or tag (``acme/hello``); the
    host part of ``prefix`` (``-registry-url`` ``host:port[/path]``) is not in it."""
    first, _, rest = prefix.strip("/").partition("/")
    if "." in first or ":" in first or first == "localhost":
        first, rest = rest, ""  # a registry host, not a namespace
    namespace = "/".join(p for p in (first, rest) if p)
    if namespace:
        if not repository.startswith(namespace + "/"):
            return None
        repository = repository[len(namespace) + 1 :]
    return repository if repository and "/" not in repository else None


def validate_env(env: Mapping[str, str]) -> dict[str, str]:
    """Check a deploy's environment; raise ValueError with a sentence the API can return."""
    checked: dict[str, str] = {}
    for key, value in env.items():
        if not isinstance(key, str) or not _ENV_KEY_RE.fullmatch(key):
            raise ValueError(
                f"Environment variable name {key!r} is not valid: use letters, digits and "
                "'_', not starting with a digit."
            )
        if not isinstance(value, str):
            raise ValueError(f"The value of environment variable {key} must be a string.")
        if "\n" in value or "\r" in value or "\0" in value:
            raise ValueError(
                f"The value of environment variable {key} contains a line break or a NUL "
                "character, which a unit file cannot carry; encode it (base64, for example)."
            )
        if len(environment_line(key, value).encode()) >= LINE_MAX:
            raise ValueError(
                f"The value of environment variable {key} is too long: fleet takes unit file "
                f"lines of less than {LINE_MAX} bytes; pass a reference (a file, a secret "
                "store) instead."
            )
        checked[key] = value
    return checked


def environment_line(key: str, value: str) -> str:
    """One ``Environment=`` line with systemd's quoting.

    Inside double quotes systemd unescapes ``\\`` and ``"``; ``%`` is doubled because
    fleet's systemd expands specifiers in Environment= values too.
    """
    quoted = value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'Environment="{key}={quoted}"'


def _check_plain(what: str, value: str) -> str:
    if not _PLAIN_WORD_RE.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} cannot go into a unit: use letters, digits and "
            "'_@+=:,./~-' only (no spaces, quotes, '%' or '$')."
        )
    return value


@dataclass(frozen=True)
class UnitContext:
    """Everything a template may use to describe one instance of one deploy."""

    unit: UnitName
    image: str
    etcd_endpoints: str
    announce_key: str
    env: Mapping[str, str] = field(default_factory=dict)
    container_port: int = DEFAULT_CONTAINER_PORT
    python: str = field(default_factory=lambda: sys.executable)
    docker: str = DEFAULT_DOCKER
    etcdctl: str = DEFAULT_ETCDCTL
    pull_policy: str = "missing"
    publish_address: str = DEFAULT_PUBLISH_ADDRESS

    def __post_init__(self) -> None:
        # Frozen: a validated copy replaces the caller's mapping, so later changes to the
        # caller's dict cannot reach a rendered unit.
        object.__setattr__(self, "env", validate_env(self.env))
        _check_plain("Image", self.image)
        _check_plain("etcd endpoint list", self.etcd_endpoints)
        _check_plain("Announce key", self.announce_key)
        _check_plain("Python interpreter path", self.python)
        _check_plain("docker program", self.docker)
        _check_plain("etcdctl program", self.etcdctl)
        _check_plain("Publish address", self.publish_address)
        if self.pull_policy not in PULL_POLICIES:
            raise ValueError(
                f"Pull policy {self.pull_policy!r} is not one of {', '.join(PULL_POLICIES)}."
            )
        if not 1 <= self.container_port <= 65535:
            raise ValueError(f"Container port {self.container_port} is not between 1 and 65535.")

    def variables(self) -> dict[str, Any]:
        """The template's namespace (see TEMPLATE_VARIABLES)."""
        unit = self.unit
        return {
            "service": unit.service,
            "version": unit.version,
            "timestamp": unit.timestamp,
            "instance": unit.instance,
            "unit_name": str(unit),
            "description": unit.description,
            "container": unit.container,
            "image": self.image,
            "env": dict(self.env),
            "etcd_endpoints": self.etcd_endpoints,
            "announce_key": self.announce_key,
            "container_port": self.container_port,
            "python": self.python,
            "docker": self.docker,
            "etcdctl": self.etcdctl,
            "pull_policy": self.pull_policy,
            "publish_address": self.publish_address,
            "environment": "\n".join(environment_line(k, v) for k, v in self.env.items()),
        }


def sample_context() -> UnitContext:
    """The context load_template renders to check a template before any deploy uses it."""
    unit = UnitName.build("sample", "0.0.0", "2015.03.02-00.31.45", 1)
    return UnitContext(
        unit=unit,
        image=image_name("deployster", unit.service, unit.version),
        etcd_endpoints="http://127.0.0.1:2379",
        announce_key=announce_key("/deployster", unit),
        env={"SAMPLE": "value"},
    )


@dataclass(frozen=True)
class UnitTemplate:
    """A loaded, checked template. ``name`` is ``docker``, ``workload`` or the file's path."""

    name: str
    source: str
    compiled: jinja2.Template = field(repr=False, compare=False)


_JINJA = jinja2.Environment(
    undefined=jinja2.StrictUndefined,
    autoescape=False,
    keep_trailing_newline=True,
    # {% if %} / {% for %} on lines of their own leave no blank lines or indentation.
    trim_blocks=True,
    lstrip_blocks=True,
)


def load_template(spec: str) -> UnitTemplate:
    """Load ``docker``, ``workload`` or a template file, and check it renders to a unit.

    Raises TemplateError for a missing or unreadable file, a Jinja syntax error, a
    placeholder that is not a template variable, or a result that is not a fleet unit.
    """
    if spec in BUILTIN_TEMPLATES:
        name = spec
        source = (resources.files("deployster") / "templates" / f"{spec}.service").read_text()
    else:
        path = Path(spec).expanduser()
        name = str(path)
        try:
            source = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise TemplateError(
                f"Unit template {name} does not exist: pass 'docker', 'workload' or the path "
                "of a unit file."
            ) from None
        except (OSError, UnicodeDecodeError) as error:
            raise TemplateError(f"Unit template {name} cannot be read: {error}.") from None
    return compile_template(name, source)


def compile_template(name: str, source: str) -> UnitTemplate:
    """Compile template text (already read) and check it as load_template does."""
    try:
        ast = _JINJA.parse(source)
    except jinja2.TemplateSyntaxError as error:
        raise TemplateError(
            f"Unit template {name} has a syntax error on line {error.lineno}: {error.message}."
        ) from None
    unknown = jinja2.meta.find_undeclared_variables(ast) - TEMPLATE_VARIABLES - set(_JINJA.globals)
    if unknown:
        first = min(
            (node for node in ast.find_all(jinja2.nodes.Name) if node.name in unknown),
            key=lambda node: node.lineno,
        )
        raise TemplateError(
            f"Unit template {name} uses unknown placeholder '{first.name}' on line "
            f"{first.lineno}; the placeholders are: {', '.join(sorted(TEMPLATE_VARIABLES))}."
        )
    template = UnitTemplate(name, source, _JINJA.from_string(source))
    options = render_unit(template, sample_context())
    _check_unit(name, options)
    return template


def _check_unit(name: str, options: list[UnitOption]) -> None:
    if not any(o.section == "Service" and o.name == "ExecStart" for o in options):
        raise TemplateError(
            f"Unit template {name} has no ExecStart= in its [Service] section: "
            "a unit must say what to run."
        )
    for option in options:
        if option.section == "X-Fleet" and option.name not in X_FLEET_OPTIONS:
            raise TemplateError(
                f"Unit template {name} sets unknown fleet option {option.name}= in [X-Fleet]; "
                f"fleet knows: {', '.join(sorted(X_FLEET_OPTIONS))}."
            )


def render_unit(template: UnitTemplate, context: UnitContext) -> list[UnitOption]:
    """Render ``template`` for one instance and return fleet's ordered option list."""
    try:
        text = template.compiled.render(context.variables())
    except jinja2.TemplateError as error:
        raise TemplateError(f"Unit template {template.name} failed to render: {error}.") from None
    options = parse_unit(text, template.name)
    for option in options:
        length = len(f"{option.name}={option.value}".encode())
        if length >= LINE_MAX:
            raise TemplateError(
                f"Unit template {template.name} renders {option.name}= in [{option.section}] "
                f"as a line of {length} bytes for {context.unit}; fleet takes lines of less "
                f"than {LINE_MAX} bytes."
            )
    return options


def parse_unit(text: str, name: str = "unit") -> list[UnitOption]:
    """Parse systemd unit file text into fleet options, in file order.

    Follows systemd's syntax: ``[Section]`` headers; ``Name=Value`` with whitespace around
    both stripped; repeated names kept in order (fleet and systemd give them meaning); lines
    starting with ``#`` or ``;`` and blank lines dropped, also inside a continuation; a
    trailing backslash continues the value on the next line. systemd replaces the backslash
    with a space and keeps the next line's indentation; here the whitespace around the join
    collapses to one space, so that indented continuations stay readable in fleet's option
    list. Lines are numbered in the rendered text.
    """
    options: list[UnitOption] = []
    section: str | None = None
    pending: str | None = None
    pending_line = 0

    def add(line: str, number: int) -> None:
        nonlocal section
        header = _SECTION_RE.fullmatch(line)
        if header:
            section = header.group(1).strip()
            return
        key, equals, value = line.partition("=")
        key = key.strip()
        if not equals or not key:
            raise TemplateError(
                f"Unit template {name}, line {number}: {line!r} is neither a [Section] header "
                "nor a Name=Value line."
            )
        if section is None:
            raise TemplateError(
                f"Unit template {name}, line {number}: {key}= comes before any [Section] header."
            )
        options.append(UnitOption(section=section, name=key, value=value.strip()))

    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            # As in systemd, a blank line ends a continuation.
            if pending is not None:
                add(pending, pending_line)
                pending = None
            continue
        if line[0] in "#;":
            continue
        continued = _ends_with_continuation(line)
        if continued:
            line = line[:-1].rstrip()
        if pending is None:
            pending, pending_line = line, number
        else:
            pending = f"{pending} {line}"
        if not continued:
            add(pending, pending_line)
            pending = None
    if pending is not None:
        add(pending, pending_line)
    return options


def _ends_with_continuation(line: str) -> bool:
    # An odd run of trailing backslashes: the last one is not itself escaped.
    stripped = line.rstrip("\\")
    return (len(line) - len(stripped)) % 2 == 1
