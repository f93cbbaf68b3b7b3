"""localfleet's pure parts: unit names, unit files, environment, X-Fleet rules, page tokens, JSON."""

from __future__ import annotations

import base64
import hashlib
import re
import signal
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deployster.fleet import UnitOption
from deployster.localfleet.environ import (
    expand_exec_argv,
    parse_environment_assignments,
    parse_environment_file,
    split_words,
)
from deployster.localfleet.pagination import (
    InvalidPageTokenError,
    PageToken,
    decode_page_token,
    page_token_from_query,
    slice_page,
)
from deployster.localfleet.unitfile import (
    DEFAULT_TIMEOUT_START,
    DEFAULT_TIMEOUT_STOP,
    ExecLineError,
    InvalidUnitOptionsError,
    UnitLoadError,
    build_service_spec,
    check_serializable,
    parse_exec_line,
    parse_timeout,
    parse_timespan,
    render_unit_file,
    unit_hash,
)
from deployster.localfleet.unitname import (
    InvalidUnitNameError,
    expand_specifiers,
    parse_unit_name,
    validate_unit_name,
)
from deployster.localfleet.wire import (
    InvalidRequestBodyError,
    decode_unit_request,
    go_json_dumps,
    page_json,
    unit_json,
    unit_shape,
    unit_text,
    units_page_json,
)
from deployster.localfleet.xfleet import (
    InvalidRequirementsError,
    fleet_requirements,
    glob_match,
    parse_multivalue,
    validate_requirements,
)

MACHINE = "0123456789abcdef0123456789abcdef"
UNIT = "web:1.2:2015.03.02-00.31.45@3.service"


def service(*lines: tuple[str, str], section: str = "Service") -> list[UnitOption]:
    return [UnitOption(section=section, name=name, value=value) for name, value in lines]


def spec_of(*lines: tuple[str, str], unit: str = UNIT):
    return build_service_spec(service(*lines), unit, MACHINE, "host1")


def x_fleet(*lines: tuple[str, str]) -> list[UnitOption]:
    return service(*lines, section="X-Fleet")


# Unit names


@pytest.mark.parametrize(
    "name",
    [
        "hello.service",
        "hello@.service",
        "hello@1.service",
        UNIT,
        "a\\x2d.socket",
        "timer.timer",
        "a" * 248 + ".service",
    ],
)
def test_valid_unit_names(name: str) -> None:
    validate_unit_name(name)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "unit name cannot be empty"),
        ("a" * 250 + ".service", "unit name exceeds maximum length (256)"),
        ("hello", 'unit name must contain "."'),
        ("hello.", 'unit name cannot end in "."'),
        ("hello.exe", 'invalid unit type: "exe"'),
        ("hello@1.mount", 'invalid unit type for template: "mount"'),
        ("hel lo.service", "invalid character ' ' in unit name"),
        ("hello/x.service", "invalid character '/' in unit name"),
        ("@hello.service", 'unit name cannot start in "@"'),
    ],
)
def test_invalid_unit_names_give_fleets_message(name: str, message: str) -> None:
    with pytest.raises(InvalidUnitNameError) as caught:
        validate_unit_name(name)
    assert str(caught.value) == message


def test_unit_name_parts_follow_fleet_and_systemd() -> None:
    info = parse_unit_name("web@a@b.service")
    assert info is not None
    assert (info.name, info.prefix, info.instance, info.template) == (
        "web@a@b",
        "web",
        "a@b",
        "web@.service",
    )
    template = parse_unit_name("web@.service")
    assert template is not None and template.is_template and template.instance == ""
    plain = parse_unit_name("web.service")
    assert plain is not None and (plain.prefix, plain.instance, plain.is_template) == (
        "web",
        "",
        False,
    )
    assert parse_unit_name("nodot") is None


def test_specifiers() -> None:
    text = "%n|%N|%p|%i|%m|%H|%%i|%z|100%"
    assert expand_specifiers(text, UNIT, MACHINE, "host1") == (
        f"{UNIT}|web:1.2:2015.03.02-00.31.45@3|web:1.2:2015.03.02-00.31.45|3|{MACHINE}|host1|%i|%z|100%"
    )
    assert expand_specifiers("%p-%i", "plain.service", MACHINE, "h") == "plain-"


# Unit file text and hash


def test_render_groups_sections_in_first_seen_order_like_go_systemd() -> None:
    options = [
        UnitOption(section="Unit", name="Description", value="x"),
        UnitOption(section="Service", name="ExecStart", value="/bin/true"),
        UnitOption(section="Unit", name="After", value="docker.service"),
        UnitOption(section="X-Fleet", name="Conflicts", value="a*"),
    ]
    text = "[Unit]\nDescription=x\nAfter=docker.service\n\n[Service]\nExecStart=/bin/true\n\n[X-Fleet]\nConflicts=a*\n"
    assert render_unit_file(options) == text
    assert unit_hash(options) == hashlib.sha1(text.encode()).hexdigest()
    assert unit_hash([]) == hashlib.sha1(b"").hexdigest()


def test_reordering_across_sections_keeps_the_hash_but_within_a_section_changes_it() -> None:
    a, b, c = (
        UnitOption(section="Unit", name="A", value="1"),
        UnitOption(section="Service", name="B", value="2"),
        UnitOption(section="Unit", name="C", value="3"),
    )
    assert unit_hash([a, b, c]) == unit_hash([a, c, b])
    assert unit_hash([a, b, c]) != unit_hash([c, b, a])


def test_serialization_check() -> None:
    check_serializable([UnitOption(section="Service", name="ExecStart", value="x" * 2000)])
    with pytest.raises(InvalidUnitOptionsError, match="line too long"):
        check_serializable([UnitOption(section="Service", name="ExecStart", value="x" * 2048)])
    with pytest.raises(InvalidUnitOptionsError, match="garbage after section name"):
        check_serializable([UnitOption(section="Serv]ice", name="A", value="b")])
    with pytest.raises(InvalidUnitOptionsError, match="unexpected newline"):
        check_serializable([UnitOption(section="Service", name="A\nB", value="b")])


# Time spans


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("5min", 300), ("1min 30s", 90), ("1min30s", 90), ("2h", 7200), ("500ms", 0.5),
     (" 1.5s ", 1.5), ("1d", 86400), ("10sec", 10), ("0", 0)],
)  # fmt: skip
def test_timespans(text: str, seconds: float) -> None:
    assert parse_timespan(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "abc", "5 parsecs", "-1s", "1min foo"])
def test_bad_timespans(text: str) -> None:
    with pytest.raises(ValueError):
        parse_timespan(text)


def test_zero_and_infinity_mean_no_timeout() -> None:
    assert parse_timeout("0") is None
    assert parse_timeout("infinity") is None
    assert parse_timeout("0s") is None
    assert parse_timeout("15") == 15


# Exec lines


def test_exec_line_prefixes_and_quoting() -> None:
    command = parse_exec_line("""-/bin/sh -c "echo 'a b' > /tmp/x" last""")
    assert command.path == "/bin/sh"
    assert command.argv == ("/bin/sh", "-c", "echo 'a b' > /tmp/x", "last")
    assert command.ignore_failure and command.expand_variables

    at = parse_exec_line("@/bin/sleep my-sleeper 5")
    assert (at.path, at.argv, at.ignore_failure) == ("/bin/sleep", ("my-sleeper", "5"), False)

    assert parse_exec_line("+!/bin/true").path == "/bin/true"
    assert parse_exec_line("!!/bin/true").path == "/bin/true"
    assert not parse_exec_line(":/bin/echo $HOME").expand_variables
    assert parse_exec_line("-@/bin/true name").ignore_failure


@pytest.mark.parametrize("line", ["", "   ", "-", "@/bin/true", "/bin/echo 'unbalanced"])
def test_bad_exec_lines(line: str) -> None:
    with pytest.raises(ExecLineError):
        parse_exec_line(line)


# Environment and variables


def test_environment_assignments_with_quotes() -> None:
    assignments, ignored = parse_environment_assignments(
        split_words('"A=b c" D=e F= bad 9X=1 G=x=y')
    )
    assert assignments == {"A": "b c", "D": "e", "F": "", "G": "x=y"}
    assert ignored == ["bad", "9X=1"]


def test_environment_file_parsing() -> None:
    text = (
        "# comment\n"
        "; another comment\n"
        "PLAIN=value\n"
        "  SPACED  =   padded value   \n"
        "SINGLE='it''s $HOME'\n"
        'DOUBLE="a \\"quoted\\" \\$x \\n y"\n'
        "CONT=first\\\n"
        "second\n"
        "ESCAPED=a\\ \n"
        "EMPTY=\n"
        "no equals sign\n"
        "export BAD=1\n"
        "1BAD=2\n"
        "LAST=end"
    )
    assert parse_environment_file(text) == {
        "PLAIN": "value",
        "SPACED": "padded value",
        "SINGLE": "its $HOME",
        "DOUBLE": 'a "quoted" $x \\n y',
        "CONT": "firstsecond",
        "ESCAPED": "a ",
        "EMPTY": "",
        "LAST": "end",
    }


def test_exec_variable_expansion_follows_systemd() -> None:
    env = {"ARGS": "-a  'b c' d", "NAME": "x y", "EMPTY": ""}
    words = [
        "/bin/cmd",
        "$ARGS",
        "${NAME}",
        "pre${NAME}post",
        "$UNSET",
        "${UNSET}",
        "$$HOME",
        "a$NAME",
        "${NAME",
    ]
    assert expand_exec_argv(words, env) == [
        "/bin/cmd", "-a", "b c", "d", "x y", "prex ypost", "", "$HOME", "a$NAME", "${NAME",
    ]  # fmt: skip
    assert expand_exec_argv(["$EMPTY", "x"], env) == ["x"]


# Service specs


def test_service_spec_reads_every_supported_setting() -> None:
    spec = spec_of(
        ("Type", "simple"),
        ("User", "core"),
        ("Environment", '"GREETING=hello world" INSTANCE=%i'),
        ("Environment", "MACHINE=%m HOST=%H"),
        ("EnvironmentFile", "-/etc/%p.env"),
        ("EnvironmentFile", "/etc/required.env"),
        ("ExecStartPre", "-/usr/bin/docker rm -f %p-%i"),
        ("ExecStartPre", "/usr/bin/docker pull image"),
        ("ExecStart", "/usr/bin/docker run --name %p-%i image"),
        ("ExecStartPost", "/bin/echo started %n"),
        ("ExecStop", "/usr/bin/docker stop %p-%i"),
        ("ExecStopPost", "-/usr/bin/docker rm %p-%i"),
        ("TimeoutStartSec", "5min"),
        ("TimeoutStopSec", "20"),
        ("SuccessExitStatus", "143 SIGUSR1 KILL"),
    )
    prefix = "web:1.2:2015.03.02-00.31.45"
    assert spec.exec_start.argv == ("/usr/bin/docker", "run", "--name", f"{prefix}-3", "image")
    assert [c.argv[-1] for c in spec.exec_start_pre] == [f"{prefix}-3", "image"]
    assert [c.ignore_failure for c in spec.exec_start_pre] == [True, False]
    assert spec.exec_start_post[0].argv == ("/bin/echo", "started", UNIT)
    assert spec.exec_stop[0].argv[-1] == f"{prefix}-3"
    assert spec.exec_stop_post[0].ignore_failure
    assert dict(spec.environment) == {
        "GREETING": "hello world",
        "INSTANCE": "3",
        "MACHINE": MACHINE,
        "HOST": "host1",
    }
    assert [(ref.path, ref.optional) for ref in spec.environment_files] == [
        (f"/etc/{prefix}.env", True),
        ("/etc/required.env", False),
    ]
    assert (spec.timeout_start, spec.timeout_stop) == (300, 20)
    assert spec.success_exit_codes == {143}
    assert spec.success_signals == {signal.SIGUSR1, signal.SIGKILL}
    assert spec.warnings == ()


def test_service_spec_defaults_and_resets() -> None:
    spec = spec_of(
        ("ExecStartPre", "/bin/a"),
        ("ExecStartPre", ""),
        ("ExecStartPre", "/bin/b"),
        ("Environment", "A=1"),
        ("Environment", ""),
        ("Environment", "B=2"),
        ("ExecStart", "/bin/sleep 1"),
    )
    assert [c.path for c in spec.exec_start_pre] == ["/bin/b"]
    assert dict(spec.environment) == {"B": "2"}
    assert (spec.timeout_start, spec.timeout_stop) == (DEFAULT_TIMEOUT_START, DEFAULT_TIMEOUT_STOP)
    assert spec_of(("ExecStart", "/bin/true"), ("TimeoutSec", "infinity")).timeout_stop is None
    assert spec_of(("ExecStart", "/bin/true"), ("TimeoutStartSec", "0")).timeout_start is None


def test_service_spec_ignores_what_systemd_ignores_and_says_so() -> None:
    spec = spec_of(
        ("ExecStart", "/bin/true"),
        ("TimeoutStartSec", "soon"),
        ("Type", "bogus"),
        ("Restart", "always"),
        ("KillSignal", "SIGINT"),
        ("EnvironmentFile", "relative.env"),
        ("ExecStartPre", "/bin/echo 'unbalanced"),
    )
    assert spec.timeout_start == DEFAULT_TIMEOUT_START
    joined = "\n".join(spec.warnings)
    for expected in (
        "TimeoutStartSec=soon",
        "unknown Type=bogus",
        "Restart, KillSignal",
        "not absolute",
        "ExecStartPre",
    ):
        assert expected in joined
    assert spec.exec_start_pre == ()


@pytest.mark.parametrize(
    ("lines", "unit", "message"),
    [
        ((("Type", "oneshot"), ("ExecStart", "/bin/true")), UNIT, "Type=oneshot is not supported"),
        ((("Type", "forking"), ("ExecStart", "/bin/true")), UNIT, "Type=forking is not supported"),
        ((("ExecStartPre", "/bin/true"),), UNIT, "no ExecStart"),
        (
            (("ExecStart", "/bin/true"), ("ExecStart", "/bin/false")),
            UNIT,
            "more than one ExecStart",
        ),
        ((("ExecStart", "/bin/true"),), "web.socket", "only .service units"),
    ],
)
def test_units_that_cannot_load(lines, unit: str, message: str) -> None:
    with pytest.raises(UnitLoadError, match=message):
        spec_of(*lines, unit=unit)


# X-Fleet


def test_multivalue_lines() -> None:
    assert parse_multivalue('"a=b" "c=d e"') == ["a=b", "c=d e"]
    assert parse_multivalue("a=b c=d") == ["a=b c=d"]
    assert parse_multivalue('"single"') == ["single"]


def test_requirements_with_specifiers_and_aliases() -> None:
    options = x_fleet(
        ("MachineOf", "app@%i.service"),
        ("X-ConditionMachineOf", "db.service"),
        ("Conflicts", "app@*.service other-%p.service"),
        ("X-Conflicts", "legacy*"),
        ("MachineMetadata", '"region=eu" "disk=ssd"'),
        ("X-ConditionMachineMetadata", "region=us"),
        ("MachineMetadata", "broken"),
        ("Global", "yes"),
        ("Global", "off"),
        ("Unknown", "ignored"),
    )
    requirements = fleet_requirements(options, "sidekick@7.service")
    assert requirements.peers == ("db.service", "app@7.service")
    assert requirements.conflicts == ("legacy*", "app@*.service", "other-sidekick.service")
    assert requirements.metadata == {"region": {"eu", "us"}, "disk": {"ssd"}}
    assert requirements.is_global is False
    assert requirements.machine_id is None
    unexpanded = fleet_requirements(options, None)
    assert unexpanded.peers == ("db.service", "app@%i.service")


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("YES", True), ("1", True), ("On", True),
                                                 ("t", True), ("false", False), ("2", False), ("", False)])  # fmt: skip
def test_global_truthy_values(value: str, expected: bool) -> None:
    assert fleet_requirements(x_fleet(("Global", value)), "g.service").is_global is expected


def test_machine_id_aliases_in_fleets_order() -> None:
    assert (
        fleet_requirements(
            x_fleet(("X-ConditionMachineBootID", "b"), ("X-ConditionMachineID", "a")), None
        ).machine_id
        == "a"
    )
    assert (
        fleet_requirements(
            x_fleet(("X-ConditionMachineID", "a"), ("MachineID", "m")), None
        ).machine_id
        == "m"
    )


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ((("MachineID", "abc"), ("MachineOf", "a.service")), "MachineID cannot be used with Peers"),
        (
            (("X-ConditionMachineID", "abc"), ("Conflicts", "a*")),
            "MachineID cannot be used with Conflicts",
        ),
        ((("MachineID", "abc"), ("Global", "true")), "MachineID cannot be used with Global"),
        (
            (("MachineID", "abc"), ("Replaces", "a.service")),
            "MachineID cannot be used with Replaces",
        ),
        ((("Global", "true"), ("MachineOf", "a.service")), "Global cannot be used with Peers"),
        ((("Global", "true"), ("Replaces", "a.service")), "Global cannot be used with Replaces"),
        (
            (("X-Conflicts", "a*"), ("Replaces", "b.service")),
            "Conflicts cannot be used with Replaces",
        ),
        (
            (("MachineOf", "app@1.service"), ("Conflicts", "app@*")),
            'peer "app@1.service" matches conflict "app@*"',
        ),
        (
            (("MachineOf", "app@1.service"), ("Replaces", "app@?.service")),
            'peer "app@1.service" matches replace',
        ),
        # fleet validates without expanding specifiers: %i is compared literally.
        (
            (("MachineOf", "app@%i.service"), ("Conflicts", "app@*.service")),
            'peer "app@%i.service" matches conflict',
        ),
    ],
)
def test_combinations_the_api_refuses(lines, message: str) -> None:
    with pytest.raises(InvalidRequirementsError, match=re.escape(message)):
        validate_requirements(x_fleet(*lines))


def test_combinations_the_api_accepts() -> None:
    validate_requirements(
        x_fleet(("Global", "false"), ("MachineOf", "a.service"), ("Conflicts", "b*"))
    )
    validate_requirements(
        x_fleet(("MachineOf", "app@%i.service"), ("Conflicts", "app-presence@*.service"))
    )
    validate_requirements(
        x_fleet(("MachineID", "abc"), ("MachineMetadata", "a=b"), ("Unknown", "x"))
    )
    validate_requirements(
        service(("MachineID", "abc"), ("Global", "true"))
    )  # not the X-Fleet section


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("app@*.service", "app@1.service", True),
        ("app@*.service", "app@.service", True),
        ("app@*.service", "app-presence@1.service", False),
        ("web:1:*@*.service", "web:1:2015@3.service", True),
        ("a?c.service", "abc.service", True),
        ("a[b-d]c.service", "acc.service", True),
        ("a[^b]c.service", "abc.service", False),
        ("a[^b]c.service", "axc.service", True),
        ("a\\*c", "a*c", True),
        ("a\\*c", "abc", False),
        ("a*", "a/b", False),
        ("a[", "a[", False),
        ("a[]", "a]", False),
        ("a[z-a]", "ab", False),
        ("a.service", "a.service", True),
        ("a.service", "aXservice", False),
    ],
)
def test_globs_follow_go_path_match(pattern: str, name: str, expected: bool) -> None:
    assert glob_match(pattern, name) is expected


# Page tokens


def test_page_token_is_gos_padded_url_base64_of_two_little_endian_uint16() -> None:
    token = PageToken(limit=100, page=2)
    assert (
        token.encode()
        == base64.urlsafe_b64encode(struct.pack("<HH", 100, 2)).decode()
        == "ZAACAA=="
    )
    assert decode_page_token("ZAACAA==") == token
    assert decode_page_token(PageToken(65535, 65535).encode()) == PageToken(65535, 65535)
    # binary.Read takes the four bytes it needs and ignores the rest.
    assert decode_page_token(
        base64.urlsafe_b64encode(b"\x64\x00\x03\x00extra").decode()
    ) == PageToken(100, 3)


@pytest.mark.parametrize(
    "value",
    ["", "ZAACAA", "ZAACAA=", "ZA+CAA==", "ZA/CAA==", "Z===", "not a token", "ZAA=", "ZA=="],
)
def test_malformed_page_tokens(value: str) -> None:
    with pytest.raises(InvalidPageTokenError):
        decode_page_token(value)


def test_page_token_from_query() -> None:
    assert page_token_from_query([], 100) == PageToken(100, 1)
    assert page_token_from_query([PageToken(100, 3).encode()], 100) == PageToken(100, 3)
    with pytest.raises(InvalidPageTokenError, match="token limit must be 100"):
        page_token_from_query([PageToken(50, 2).encode()], 100)
    with pytest.raises(InvalidPageTokenError, match="greater than zero"):
        page_token_from_query([PageToken(100, 0).encode()], 100)
    with pytest.raises(InvalidPageTokenError, match="too many values"):
        page_token_from_query([PageToken(100, 2).encode()] * 2, 100)


def test_slicing_matches_fleet_including_the_empty_last_page_on_exact_multiples() -> None:
    items = list(range(250))
    first, token = slice_page(items, PageToken(100, 1))
    assert first == list(range(100)) and token == PageToken(100, 2)
    last, token = slice_page(items, PageToken(100, 3))
    assert last == list(range(200, 250)) and token is None
    assert slice_page(list(range(200)), PageToken(100, 2)) == (
        list(range(100, 200)),
        PageToken(100, 3),
    )
    assert slice_page(list(range(200)), PageToken(100, 3)) == ([], None)
    assert slice_page([], PageToken(100, 1)) == ([], None)
    assert slice_page(items, PageToken(100, 9)) == ([], None)


# JSON


def test_unit_json_omits_empty_fields() -> None:
    options = [
        UnitOption(section="Service", name="ExecStartPre", value=""),
        UnitOption(section="Service", name="ExecStart", value="/bin/true"),
    ]
    assert unit_json("a.service", options, "launched", None, None) == {
        "desiredState": "launched",
        "name": "a.service",
        "options": [
            {"section": "Service", "name": "ExecStartPre"},
            {"section": "Service", "name": "ExecStart", "value": "/bin/true"},
        ],
    }
    assert unit_json("a.service", [], "", None, None) == {"name": "a.service"}


@given(
    units=st.lists(
        st.tuples(
            st.text(min_size=1, max_size=8),
            st.lists(st.tuples(st.text(max_size=4), st.text(max_size=4), st.text(max_size=6))),
            st.sampled_from(["", "inactive", "loaded", "launched"]),
            st.one_of(st.none(), st.sampled_from(["", "inactive", "launched"])),
            st.one_of(st.none(), st.text(max_size=4)),
        ),
        max_size=4,
    ),
    token=st.one_of(st.none(), st.just(""), st.text(max_size=6)),
)
def test_a_page_of_units_written_from_each_unit_s_text_is_the_page_written_whole(
    units: list[tuple[str, list[tuple[str, str, str]], str, str | None, str | None]],
    token: str | None,
) -> None:
    shapes = [
        unit_shape(name, [UnitOption(section=a, name=b, value=c) for a, b, c in options], *rest)
        for name, options, *rest in units
    ]
    assert units_page_json([unit_text(u) for u in shapes], token) == go_json_dumps(
        page_json("units", shapes, token)
    )


def test_json_is_escaped_like_go() -> None:
    assert go_json_dumps({"v": "a<b>&c é\u2028"}) == '{"v":"a\\u003cb\\u003e\\u0026c é\\u2028"}'


def test_put_body_decoding_is_as_lenient_as_gos() -> None:
    request = decode_unit_request(
        b' {"NAME":"a.service","Options":[{"Section":"Service","name":"ExecStart","VALUE":"/bin/true"}],'
        b'"desiredState":null,"currentState":"launched","extra":[1,2]} trailing garbage'
    )
    assert request.name == "a.service"
    assert request.options == (UnitOption(section="Service", name="ExecStart", value="/bin/true"),)
    assert request.desired_state == ""
    assert decode_unit_request(b"null") == decode_unit_request(b"{}")
    assert decode_unit_request(b'{"name":"a","name":"b"}').name == "b"


@pytest.mark.parametrize(
    "body", [b"", b"   ", b"[]", b"{", b'{"name":5}', b'{"options":{}}', b'{"options":[null]}', b'{"options":[1]}',
             b'{"desiredState":true}', b'{"machineID":[]}', b"NaN"],
)  # fmt: skip
def test_put_bodies_that_do_not_decode(body: bytes) -> None:
    with pytest.raises(InvalidRequestBodyError):
        decode_unit_request(body)


def test_json_bytes_match_gos_field_order() -> None:
    unit = unit_json(
        "a.service",
        [UnitOption(section="Service", name="ExecStart", value="/bin/true")],
        "launched",
        "loaded",
        "ab" * 16,
    )
    assert go_json_dumps(page_json("units", [unit], "ZAACAA==")) == (
        '{"nextPageToken":"ZAACAA==","units":[{"currentState":"loaded","desiredState":"launched",'
        '"machineID":"abababababababababababababababab","name":"a.service",'
        '"options":[{"name":"ExecStart","section":"Service","value":"/bin/true"}]}]}'
    )
    assert go_json_dumps(page_json("machines", [{"id": "m"}], None)) == '{"machines":[{"id":"m"}]}'
    assert go_json_dumps(page_json("states", [], None)) == "{}"
