r"""Unit templates: the systemd unit each instance runs, rendered to fleet's option list.

fleet does not take unit files: it takes an ordered list of ``{"section", "name", "value"}``
options (`docs/fleet.md` §3). Deployster keeps the unit as what operators know, a
systemd unit file, with Jinja2 placeholders for the deploy's parts, and turns the rendered
text into that list here, with systemd's own file syntax (sections, ``Name=Value``, comments,
trailing-backslash continuations).

Two templates ship in ``deployster/templates/``:

``docker``
    The original's unit (`docs/compatibility.md` §4) minus its weaknesses (§11):
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

What goes into a unit
---------------------

Every value a template prints passes :func:`unit_value`, the one gate between a value and
a unit file. It is the template environment's ``finalize`` hook, so a template cannot
forget it, and :class:`UnitContext` runs every variable through it when it is built, so
that the error names the variable. The rule:

* No value may hold a character that some reader of the unit takes for the end of a line
  or refuses: the C0 and C1 control characters (``\n``, ``\r``, NUL, VT, FF, FS, GS, RS,
  NEL U+0085 among them; a tab only inside an environment value), U+2028 and U+2029,
  lone surrogates (not UTF-8), and the noncharacters U+FDD0..U+FDEF and U+xFFFE/U+xFFFF
  (systemd's UTF-8 check refuses them). systemd itself ends a line at ``\n`` only (at
  ``\r`` and NUL too since v240; older versions cut the line there), and inside a line
  reads U+2028 and NEL as plain text; but fleet's go-systemd trims Unicode white space,
  and Python's ``str.splitlines`` (the parser bug behind this rule) and many log viewers
  break lines at all of them, so they are refused rather than carried.
* A value printed bare (names, versions, timestamps, image, paths, keys, endpoints, and
  every variable a template gains later) must be one word of ``[A-Za-z0-9_@+=:,./-]``
  that starts with a letter, a digit, ``_``, ``.`` or ``/``: nothing systemd reads as a
  specifier (``%``) or a variable (``$``), no quote, backslash or white space that would
  split or join words, nothing the shell interprets (``; & | < > * ? ~`` ...), and no
  leading ``-`` that a command would take for an option. Such a word reads back as itself
  in every position of a unit: an Exec line, a shell script in double quotes, a plain
  value, an ``Environment=`` assignment. Anything else is refused, never quoted: the
  right quoting depends on where the template put the value.
* An environment value is quoted instead (:func:`environment_line`, ``how="environment"``):
  the assignment becomes one double-quoted word, ``Environment="KEY=value"``, with ``\``
  and ``"`` escaped by a backslash (systemd's unquoting and C unescaping give them back)
  and ``%`` doubled (systemd expands specifiers in ``Environment=``). ``$`` needs nothing:
  ``Environment=`` does not expand variables, and the templates hand values to the
  container by name (``docker run -e KEY``), never through an Exec line. The line must
  stay under fleet's 2048 bytes, and a template must print ``{{ environment }}`` on a line
  of its own in ``[Service]`` (checked when it is loaded).

A refused value raises :class:`UnitValueError`, which names the field; the deploy route
checks the same rule on the request's fields before anything happens, and answers 400.
The unit parser below splits lines as systemd does, at ``\n`` (``\r\n`` counts as one),
and refuses a template whose own text holds one of the refused characters.

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
from typing import Any, Literal

import jinja2
import jinja2.meta
import jinja2.nodes
from pydantic import BaseModel

from deployster.fleet import UnitOption
from deployster.keys import announce_key
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

# Option names fleet itself acts on (docs/fleet.md §10). The HTTP API accepts any
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
# A value printed bare: one word that systemd (%, $, quotes, backslash, white space) and sh
# (quotes, ;, &, |, <, >, globs, ~) leave alone, not starting with a command-line option's '-'.
_PLAIN_WORD_RE = re.compile(r"[A-Za-z0-9_./][A-Za-z0-9_@+=:,./-]*")
# What no unit can carry (see the module docstring): C0 and C1 controls, line and paragraph
# separators, lone surrogates, noncharacters. The tab is allowed inside quotes only.
_NONCHARACTERS = "\ufdd0-\ufdef" + "".join(
    f"{chr(plane * 0x10000 + 0xFFFE)}{chr(plane * 0x10000 + 0xFFFF)}" for plane in range(17)
)
_UNCARRIABLE_RE = re.compile(
    f"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff{_NONCHARACTERS}]"
)
# A systemd unit file line ends at \n; \r\n counts as one end.
_LINE_END_RE = re.compile(r"\r?\n")
# systemd's WHITESPACE: what it strips around names and values (never Unicode spaces).
_WHITESPACE = " \t\r\n"
_SECTION_RE = re.compile(r"\[([^\[\]]+)\]")


class TemplateError(ValueError):
    """A unit template that cannot be loaded or rendered; the message names file and problem."""


class UnitValueError(TemplateError):
    """A value that cannot go into a unit. ``field`` names it, ``problem`` says why as a
    clause that follows the field's name (``contains the character U+2028 ...``)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}.")
        self.field = field
        self.problem = problem


class UnitText(str):
    """Text :func:`unit_value` has passed or built (checked words, quoted ``Environment=``
    lines): a template prints it as it is."""


def unit_value(field: str, value: object, how: Literal["word", "environment"] = "word") -> str:
    """The one gate between a value and a unit file (the rule is in the module docstring).

    ``how="word"``: the value itself as :class:`UnitText`, if it is a word that every
    reader of a unit reads back as itself; :class:`UnitText` passes as it is.
    ``how="environment"``: the value escaped for the inside of a double-quoted
    ``Environment=`` word, which systemd unquotes to exactly the value. Integers are
    written in decimal. Anything else raises :class:`UnitValueError` naming ``field``; the
    message never repeats an environment value.
    """
    if how == "word" and isinstance(value, UnitText):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise UnitValueError(field, "must be text to go into a unit")
    bad = _UNCARRIABLE_RE.search(value)
    if bad is not None:
        raise UnitValueError(
            field,
            f"contains the character U+{ord(bad.group()):04X} at position {bad.start()}, "
            "which a unit file cannot carry (a line break, a control character or not "
            "text); encode the value (base64, for example)",
        )
    if how == "environment":
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    if not _PLAIN_WORD_RE.fullmatch(value):
        raise UnitValueError(
            field,
            f"is {value!r}, which cannot go into a unit: use one word of letters, digits and "
            "'_@+=:,./-' that starts with a letter, a digit, '_', '.' or '/' (no spaces, "
            "quotes, '%' or '$')",
        )
    return UnitText(value)


class Announcement(BaseModel):
    """The value an instance writes under its announce key: where it answers, and who it is.

    Both writers produce exactly this JSON: the docker template's ``ExecStartPost`` script
    and the test workload.
    """

    url: str
    machine: str
    unit: str


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


#: Variables a unit's own host commands read (the loader, the shell, docker, etcdctl, CoreOS's
#: address): a deploy's env is the environment of those commands too, so these would change
#: what runs on the host or where an instance is announced, not only the service.
HOST_ENV = re.compile(
    r"LD_[A-Z0-9_]*|PATH|IFS|ENV|BASH_ENV|SHELLOPTS|HOME|DOCKER_[A-Z0-9_]*|ETCDCTL_[A-Z0-9_]*"
    r"|COREOS_[A-Z0-9_]*",
    re.ASCII,
)


def validate_env(env: Mapping[str, str], field: str = "env") -> dict[str, str]:
    """Check a deploy's environment with :func:`unit_value`'s rule; raise
    :class:`UnitValueError` naming ``field`` or ``field.KEY``. Returns a copy."""
    checked: dict[str, str] = {}
    for key, value in env.items():
        if not isinstance(key, str) or not _ENV_KEY_RE.fullmatch(key):
            raise UnitValueError(
                field,
                f"has the variable name {key!r}, which is not valid: use letters, digits "
                "and '_', not starting with a digit",
            )
        if HOST_ENV.fullmatch(key):
            raise UnitValueError(
                f"{field}.{key}",
                "is read by the host's own commands in the unit (the loader, the shell, docker, "
                "etcdctl), not only by the service; set it in the image instead",
            )
        if not isinstance(value, str):
            raise UnitValueError(f"{field}.{key}", "must be a string")
        line = environment_line(key, value, field)
        if len(line.encode()) >= LINE_MAX:
            raise UnitValueError(
                f"{field}.{key}",
                f"is too long: fleet takes unit file lines of less than {LINE_MAX} bytes; "
                "pass a reference (a file, a secret store) instead",
            )
        checked[key] = value
    return checked


def environment_line(key: str, value: str, field: str = "env") -> UnitText:
    """One ``Environment="KEY=value"`` line; the value quoted by :func:`unit_value`."""
    quoted = unit_value(f"{field}.{key}", value, "environment")
    return UnitText(f'Environment="{unit_value(field, key)}={quoted}"')


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
        if self.pull_policy not in PULL_POLICIES:
            raise UnitValueError(
                "pull_policy", f"is {self.pull_policy!r}, not one of {', '.join(PULL_POLICIES)}"
            )
        if not 1 <= self.container_port <= 65535:
            raise UnitValueError(
                "container_port", f"is {self.container_port}, not between 1 and 65535"
            )
        self.variables()  # a value that cannot go into a unit fails here, by its name

    def variables(self) -> dict[str, Any]:
        """The template's namespace (see TEMPLATE_VARIABLES), every value through
        :func:`unit_value` under its own name. ``env`` is the checked mapping, for
        ``{% for key in env %}`` and ``{% if %}``; its values go into the unit quoted, as
        ``environment``, and one printed elsewhere meets the rule for words."""
        unit = self.unit
        words = {
            "service": unit.service,
            "version": unit.version,
            "timestamp": unit.timestamp,
            "instance": unit.instance,
            "unit_name": str(unit),
            "description": unit.description,
            "container": unit.container,
            "image": self.image,
            "etcd_endpoints": self.etcd_endpoints,
            "announce_key": self.announce_key,
            "container_port": self.container_port,
            "python": self.python,
            "docker": self.docker,
            "etcdctl": self.etcdctl,
            "pull_policy": self.pull_policy,
            "publish_address": self.publish_address,
        }
        namespace: dict[str, Any] = {name: unit_value(name, value) for name, value in words.items()}
        namespace["env"] = dict(self.env)
        namespace["environment"] = UnitText(
            "\n".join(environment_line(k, v) for k, v in self.env.items())
        )
        return namespace


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


def _finalize(value: object) -> object:
    # Every {{ ... }} of every template: what is not a checked variable (an expression, an
    # env value, a filter's result) meets the rule here. StrictUndefined raises when printed.
    if isinstance(value, jinja2.Undefined):
        return value
    return unit_value("a value the template prints", value)


_JINJA = jinja2.Environment(
    undefined=jinja2.StrictUndefined,
    autoescape=False,
    finalize=_finalize,
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
    used = jinja2.meta.find_undeclared_variables(ast)
    unknown = used - TEMPLATE_VARIABLES - set(_JINJA.globals)
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
    sample = sample_context()
    options = render_unit(template, sample)
    _check_unit(name, options)
    if "environment" in used:
        # Quoted Environment= lines are safe as lines of their own in [Service] only; inside
        # another line (an Exec line, say) a shell could read the value.
        wanted = [
            UnitOption(section="Service", name="Environment", value=line.partition("=")[2])
            for line in (environment_line(k, v) for k, v in sample.env.items())
        ]
        if any(option not in options for option in wanted):
            raise TemplateError(
                f"Unit template {name} prints {{{{ environment }}}} inside a line or outside "
                "[Service]: give it a line of its own in the [Service] section."
            )
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

    Follows systemd's syntax: lines end at ``\\n`` (``\\r\\n`` counts as one, any other
    line break or control character is refused, see the module docstring); ``[Section]``
    headers; ``Name=Value`` with systemd's whitespace (space, tab) around both stripped; repeated names kept in order (fleet and systemd give them meaning); lines
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
            section = header.group(1).strip(_WHITESPACE)
            return
        key, equals, value = line.partition("=")
        key = key.strip(_WHITESPACE)
        if not equals or not key:
            raise TemplateError(
                f"Unit template {name}, line {number}: {line!r} is neither a [Section] header "
                "nor a Name=Value line."
            )
        if section is None:
            raise TemplateError(
                f"Unit template {name}, line {number}: {key}= comes before any [Section] header."
            )
        options.append(UnitOption(section=section, name=key, value=value.strip(_WHITESPACE)))

    for number, raw in enumerate(_LINE_END_RE.split(text), start=1):
        bad = _UNCARRIABLE_RE.search(raw)
        if bad is not None:
            raise TemplateError(
                f"Unit template {name}, line {number}: the character U+{ord(bad.group()):04X} "
                "cannot be in a unit file (a line break other than \\n, a control character "
                "or not text)."
            )
        line = raw.strip(_WHITESPACE)
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
            line = line[:-1].rstrip(_WHITESPACE)
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
