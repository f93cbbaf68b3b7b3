"""Property tests of the one rule for what goes into a unit (``units.unit_value``).

Over arbitrary Unicode (surrogates, controls, line separators and systemd's own syntax
mixed in on purpose): a value is either refused with ``UnitValueError`` naming its field,
or the rendered unit, read back by Deployster's parser and by localfleet's systemd-like
reading of the file fleet would write, has exactly the options the template meant, never
one more, and gives the value back unchanged.
"""

from __future__ import annotations

import re
import shlex
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deployster.fleet import UnitOption
from deployster.localfleet.environ import expand_exec_argv
from deployster.localfleet.unitfile import (
    build_service_spec,
    check_serializable,
    parse_unit_file,
    render_unit_file,
)
from deployster.localfleet.unitname import expand_specifiers
from deployster.naming import UnitName
from deployster.units import (
    TemplateError,
    UnitContext,
    UnitValueError,
    compile_template,
    environment_line,
    load_template,
    parse_unit,
    render_unit,
    unit_value,
    validate_env,
)

UNIT = UnitName.build("hello", "v1", "2015.03.02-00.31.45", 1)
MACHINE = "0123456789abcdef0123456789abcdef"
ENDPOINTS = "http://127.0.0.1:2379"
KEY = "/deployster/instances/hello/v1:2015.03.02-00.31.45/1"
IMAGE = "acme/hello:v1"
# A few seconds for the whole module: enough examples to hit the hostile characters, which
# the strategies below mix in on purpose.
PROPERTY = settings(
    max_examples=120, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)

# Every line break Python's str.splitlines knows, what systemd reads, and unit syntax.
HOSTILE = [
    "\n", "\r", "\r\n", "\0", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029",
    "\t", " ", "\xa0", "\ufeff", "\ufffe", "\ud800", '"', "'", "\\", "%", "%n", "%%", "$", "$X",
    "${X}", "$$", "#", ";", "=", "[", "]", "-", "~", "`", "&", "|", "*",
    "ExecStartPre=/bin/touch /tmp/p", "\nExecStartPre=/bin/sh -c id\n", "[Service]",
]  # fmt: skip
# Every code point, surrogates included (Python strings can hold them; JSON can send them).
ANY_CHAR = st.characters(exclude_categories=())
TEXT = st.lists(st.one_of(st.sampled_from(HOSTILE), st.text(ANY_CHAR, max_size=4)), max_size=8).map(
    "".join
)
ENV_KEY = st.one_of(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True), TEXT)
ENV = st.dictionaries(ENV_KEY, TEXT, max_size=4)

DOCKER = load_template("docker")
# Every variable printed bare in an Exec line, in a shell script in quotes, in an
# Environment= assignment and in a plain value, as a custom template might.
EVERYWHERE = compile_template(
    "everywhere",
    "[Unit]\n"
    "Description={{ image }} {{ etcd_endpoints }} {{ announce_key }} {{ python }}\n"
    "[Service]\n"
    "{{ environment }}\n"
    'Environment="IMAGE={{ image }}" ENDPOINTS={{ etcd_endpoints }}\n'
    "ExecStart={{ python }} {{ image }} {{ etcd_endpoints }} {{ announce_key }}\n"
    'ExecStartPost=/bin/sh -c "echo {{ image }} {{ announce_key }}"\n',
)


def refused_anywhere(char: str) -> bool:
    """The characters the rule says no unit carries, spelt out independently of it."""
    code = ord(char)
    category = unicodedata.category(char)
    return (
        (category == "Cc" and char != "\t")
        or category in ("Cs", "Zl", "Zp")
        or 0xFDD0 <= code <= 0xFDEF
        or code & 0xFFFE == 0xFFFE
    )


def context(**changes: object) -> UnitContext:
    values: dict[str, object] = {
        "unit": UNIT,
        "image": IMAGE,
        "etcd_endpoints": ENDPOINTS,
        "announce_key": KEY,
        "python": "/usr/bin/python3",
    }
    values.update(changes)
    return UnitContext(**values)  # type: ignore[arg-type]


def skeleton(options: list[UnitOption]) -> list[tuple[str, str]]:
    return [(o.section, o.name) for o in options]


def systemd_reads(options: list[UnitOption]) -> list[UnitOption]:
    """What a fleet host's systemd reads from the file fleet writes for these options."""
    check_serializable(options)
    parsed, ignored = parse_unit_file(render_unit_file(options))
    assert ignored == []
    return parsed


@settings(PROPERTY, max_examples=80)  # each example holds up to four values
@given(ENV)
def test_env_is_refused_or_read_back_exactly(env: dict[str, str]) -> None:
    try:
        checked = validate_env(env)
    except UnitValueError as exc:
        assert exc.field == "env" or exc.field.startswith("env.")
        return
    meant = render_unit(DOCKER, context(env=dict.fromkeys(checked, "x")))
    options = render_unit(DOCKER, context(env=checked))

    assert skeleton(options) == skeleton(meant)  # never one option more
    assert systemd_reads(options) == options  # fleet's host reads what was sent
    spec = build_service_spec(options, str(UNIT), MACHINE, "host")
    assert dict(spec.environment) == {"ETCDCTL_API": "3", **checked}
    assert len(spec.exec_start_pre) == 2 and spec.exec_start.argv[-1] == IMAGE


@PROPERTY
@given(st.sampled_from(["image", "etcd_endpoints", "announce_key", "python"]), TEXT)
def test_words_are_refused_or_read_back_exactly(variable: str, value: str) -> None:
    try:
        ctx = context(**{variable: value})
    except UnitValueError as exc:
        assert exc.field == variable
        return
    meant = render_unit(EVERYWHERE, context())
    options = render_unit(EVERYWHERE, ctx)

    assert skeleton(options) == skeleton(meant)
    assert systemd_reads(options) == options
    spec = build_service_spec(options, str(UNIT), MACHINE, "host")
    words = {name: getattr(ctx, name) for name in ("image", "etcd_endpoints", "announce_key")}
    # systemd's reading: specifiers, quotes and variables leave every word as it was.
    argv = expand_exec_argv(spec.exec_start.argv, {"X": "injected", **dict(spec.environment)})
    assert argv == [ctx.python, words["image"], words["etcd_endpoints"], words["announce_key"]]
    script = spec.exec_start_post[0].argv
    assert list(script[:2]) == ["/bin/sh", "-c"]
    assert shlex.split(script[2]) == ["echo", words["image"], words["announce_key"]]
    assert dict(spec.environment)["IMAGE"] == words["image"]


@PROPERTY
@given(TEXT)
def test_unit_value_word_is_itself_to_every_reader_or_refused(value: str) -> None:
    try:
        word = unit_value("field", value)
    except UnitValueError as exc:
        assert exc.field == "field"
        return
    assert word == value and word
    assert shlex.split(word) == [word]  # one word for systemd's and the shell's splitting
    assert expand_specifiers(word, str(UNIT), MACHINE, "host") == word  # no specifier
    assert expand_exec_argv([word], {"X": "injected"}) == [word]  # no variable
    assert not word.startswith("-")  # never an option of the command it is passed to


@PROPERTY
@given(TEXT)
def test_environment_quoting_unquotes_to_the_value_or_is_refused(value: str) -> None:
    try:
        line = environment_line("K", value)
    except UnitValueError as exc:
        assert exc.field == "env.K"
        assert any(refused_anywhere(c) for c in value)
        return
    [option] = parse_unit(f"[Service]\n{line}\n")
    spec_options = [option, UnitOption(section="Service", name="ExecStart", value="/bin/true")]
    spec = build_service_spec(spec_options, str(UNIT), MACHINE, "host")
    assert dict(spec.environment) == {"K": value}


@PROPERTY
@given(TEXT)
def test_parsers_end_lines_only_where_systemd_does(value: str) -> None:
    value = value.replace("\r\n", "").replace("\n", "")  # the one line end of a unit file
    text = f"[Service]\nA=x{value}x\nB=y\n"
    try:
        ours = parse_unit(text)
    except TemplateError:
        # Refused: a character no unit carries, which includes every line end but \n.
        assert any(refused_anywhere(c) for c in value)
        return
    assert [o.name for o in ours] == ["A", "B"]
    assert ours[0].value == f"x{value}x"
    # localfleet ends lines only at \n, \r, \r\n and NUL, as systemd: VT, FF, FS, GS, RS,
    # NEL, U+2028 and U+2029 stay inside the value.
    assert systemd_reads(ours) == ours


@pytest.mark.parametrize(
    "separator", ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]
)
def test_the_finding_is_refused_by_name(separator: str) -> None:
    env = {"X": f"x{separator}ExecStartPre=/bin/touch /tmp/p{separator}#"}
    with pytest.raises(
        UnitValueError, match=f"^env.X contains the character U\\+{ord(separator):04X}"
    ):
        validate_env(env)


def test_localfleet_reads_a_line_break_in_a_value_as_systemd_would() -> None:
    # fleet accepts this option and writes it into the unit file as two lines: localfleet
    # runs what systemd would run, so a value that ever reached fleet with a \n shows.
    options = [
        UnitOption(section="Service", name="Environment", value="A=x\nExecStartPre=/bin/true"),
        UnitOption(section="Service", name="ExecStart", value="/bin/true"),
    ]
    spec = build_service_spec(options, str(UNIT), MACHINE, "host")
    assert [c.argv for c in spec.exec_start_pre] == [("/bin/true",)]


def test_a_template_that_prints_an_env_value_bare_meets_the_word_rule() -> None:
    template = compile_template(
        "bare-env",
        "[Service]\nExecStart=/bin/run{% if 'TOKEN' in env %} {{ env.TOKEN }}{% endif %}\n",
    )
    assert render_unit(template, context(env={"TOKEN": "abc123"}))[0].value == "/bin/run abc123"
    with pytest.raises(UnitValueError, match=r"^a value the template prints is 'a b %n"):
        render_unit(template, context(env={"TOKEN": "a b %n $X"}))


def test_a_template_whose_own_text_holds_a_line_separator_is_refused() -> None:
    with pytest.raises(TemplateError, match="line 3: the character U\\+2028"):
        compile_template("sep", "[Service]\nExecStart=/bin/true\nDescription=a\u2028b\n")
    # \r\n line ends are one line end, as for systemd.
    options = parse_unit("[Service]\r\nExecStart=/bin/true\r\nA=b\r\n")
    assert [(o.name, o.value) for o in options] == [("ExecStart", "/bin/true"), ("A", "b")]


@pytest.mark.parametrize(
    "source",
    [
        "[Service]\nExecStart=/bin/sh -c {{ environment }}\n",
        "[Unit]\n{{ environment }}\n[Service]\nExecStart=/bin/true\n",
    ],
)
def test_the_environment_lines_must_stand_alone_in_service(source: str) -> None:
    # Inside an Exec line the quoted value would reach a shell: refused at start-up.
    with pytest.raises(
        TemplateError, match=re.escape("prints {{ environment }} inside a line or outside")
    ):
        compile_template("mid-line", source)
