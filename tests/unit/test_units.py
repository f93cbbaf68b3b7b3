"""Unit templates rendered to fleet options: the built-ins, custom files, quoting, errors."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

from deployster.fleet import UnitOption
from deployster.keys import announce_key, instances_prefix, parse_announce_key
from deployster.naming import UnitName
from deployster.units import (
    TEMPLATE_VARIABLES,
    Announcement,
    TemplateError,
    UnitContext,
    UnitValueError,
    environment_line,
    image_name,
    load_template,
    parse_unit,
    render_unit,
    validate_env,
)

UNIT = UnitName.build("hello-world", "0fbb804", "2015.03.02-00.31.45", 2)
CONTAINER = "hello-world-0fbb804-2015.03.02-00.31.45-2"
KEY = "/deployster/instances/hello-world/0fbb804:2015.03.02-00.31.45/2"
ETCD = "http://10.0.0.1:2379,http://10.0.0.2:2379"


def context(**changes: object) -> UnitContext:
    values: dict[str, object] = {
        "unit": UNIT,
        "image": "mmmhm/hello-world:0fbb804",
        "etcd_endpoints": ETCD,
        "announce_key": KEY,
        "env": {"DATABASE_URL": "postgres://db/app", "GREETING": 'say "hi" 100%'},
        "python": "/opt/venv/bin/python",
    }
    values.update(changes)
    return UnitContext(**values)  # type: ignore[arg-type]


def triples(options: list[UnitOption]) -> list[tuple[str, str, str]]:
    return [(o.section, o.name, o.value) for o in options]


def test_docker_template_renders_the_whole_unit() -> None:
    options = render_unit(load_template("docker"), context())

    announce = (
        '/bin/sh -c "i=0; '
        f"until hostport=$$(/usr/bin/docker port {CONTAINER} 3000 2>/dev/null); do "
        "i=$$((i + 1)); "
        f"if [ $$i -ge 1200 ]; then echo 'port 3000 of {CONTAINER} not published within 120 s' "
        ">&2; exit 1; fi; "
        "sleep 0.1; "
        "done; "
        "url=http://$${COREOS_PRIVATE_IPV4:-127.0.0.1}:$${hostport##*:}; "
        """value='{\\"url\\":\\"'$$url'\\",\\"machine\\":\\"%m\\",\\"unit\\":\\"%n\\"}'; """
        'printf %%s \\"$$value\\" > /tmp/deployster-announced-%n-$$MAINPID; '
        f'/usr/bin/etcdctl --endpoints={ETCD} put {KEY} \\"$$value\\""'
    )
    # Compare-and-delete on the value this run wrote (a raw string between backquotes).
    withdraw = (
        '/bin/sh -c "for f in /tmp/deployster-announced-%n-*; do '
        '[ -f \\"$$f\\" ] || continue; '
        "pid=$${f##*-}; "
        'if [ \\"$$pid\\" = \\"$$MAINPID\\" ] || ! kill -0 \\"$$pid\\" 2>/dev/null; then '
        "printf 'value(\\\"%%s\\\") = `%%s`\\n\\ndel %%s\\n\\n\\n' "
        f'{KEY} \\"$$(cat \\"$$f\\")\\" {KEY} '
        f"| /usr/bin/etcdctl --endpoints={ETCD} txn; "
        'rm -f \\"$$f\\"; '
        "fi; "
        "done; "
        f'/usr/bin/docker stop -t 30 {CONTAINER}"'
    )
    assert triples(options) == [
        ("Unit", "Description", "hello-world-0fbb804-2015.03.02-00.31.45"),
        ("Unit", "After", "docker.service"),
        ("Unit", "Requires", "docker.service"),
        ("Service", "EnvironmentFile", "-/etc/environment"),
        ("Service", "Environment", "ETCDCTL_API=3"),
        ("Service", "Environment", '"DATABASE_URL=postgres://db/app"'),
        ("Service", "Environment", '"GREETING=say \\"hi\\" 100%%"'),
        ("Service", "TimeoutStartSec", "0"),
        ("Service", "TimeoutStopSec", "40"),
        (
            "Service",
            "ExecStartPre",
            '/bin/sh -c "/usr/bin/docker inspect --type=image mmmhm/hello-world:0fbb804 '
            '>/dev/null 2>&1 || /usr/bin/docker pull mmmhm/hello-world:0fbb804"',
        ),
        ("Service", "ExecStartPre", f"-/usr/bin/docker rm -f {CONTAINER}"),
        (
            "Service",
            "ExecStart",
            f"/usr/bin/docker run --rm --name {CONTAINER} -p 0.0.0.0::3000 -e DATABASE_URL "
            "-e GREETING mmmhm/hello-world:0fbb804",
        ),
        ("Service", "ExecStartPost", announce),
        ("Service", "ExecStop", withdraw),
        ("Service", "ExecStopPost", f"-/usr/bin/docker rm -f {CONTAINER}"),
        ("X-Fleet", "Conflicts", "hello-world:0fbb804:2015.03.02-00.31.45@*.service"),
    ]


def test_docker_template_follows_the_container_port_and_an_empty_env() -> None:
    options = triples(render_unit(load_template("docker"), context(env={}, container_port=8080)))

    assert (
        "Service",
        "ExecStart",
        f"/usr/bin/docker run --rm --name {CONTAINER} -p 0.0.0.0::8080 mmmhm/hello-world:0fbb804",
    ) in options
    assert [o for o in options if o[1] == "Environment"] == [
        ("Service", "Environment", "ETCDCTL_API=3")
    ]
    post = next(value for _, name, value in options if name == "ExecStartPost")
    assert f"docker port {CONTAINER} 8080 " in post


def test_docker_template_takes_the_programs_the_pull_policy_and_the_publish_address() -> None:
    image = "mmmhm/hello-world:0fbb804"

    def render(**changes: object) -> list[tuple[str, str, str]]:
        ctx = context(env={}, docker="docker", etcdctl="/venv/bin/etcdctl", **changes)
        return triples(render_unit(load_template("docker"), ctx))

    def pre(options: list[tuple[str, str, str]]) -> list[str]:
        return [value for _, name, value in options if name == "ExecStartPre"]

    always = render(pull_policy="always", publish_address="127.0.0.1")
    assert pre(always) == [f"docker pull {image}", f"-docker rm -f {CONTAINER}"]
    assert (
        "Service",
        "ExecStart",
        f"docker run --rm --name {CONTAINER} -p 127.0.0.1::3000 {image}",
    ) in always
    post = next(value for _, name, value in always if name == "ExecStartPost")
    # Published on one address: that address is announced, not the machine's.
    assert "url=http://127.0.0.1:$${hostport##*:};" in post
    assert "COREOS_PRIVATE_IPV4" not in post
    assert "/venv/bin/etcdctl --endpoints=" in post
    stop = next(value for _, name, value in always if name == "ExecStop")
    assert "| /venv/bin/etcdctl --endpoints=" in stop and " txn; " in stop
    assert stop.endswith(f'docker stop -t 30 {CONTAINER}"')
    assert not [v for *_, v in always if "/usr/bin/" in v]

    never = pre(render(pull_policy="never"))
    assert len(never) == 2 and "docker pull" not in never[0]
    assert never[0].startswith(f'/bin/sh -c "docker inspect --type=image {image} >/dev/null ||')
    assert "the pull policy is never" in never[0]


@pytest.mark.parametrize(
    "changes",
    [
        {"pull_policy": "sometimes"},
        {"docker": "/usr/bin/docker; rm -rf /"},
        {"etcdctl": "etc ctl"},
        {"publish_address": "$HOST"},
    ],
)
def test_docker_template_context_refuses_garbage(changes: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        context(**changes)


def test_workload_template() -> None:
    ctx = context(env={"DEPLOYSTER_WORKLOAD_HEALTH": "fail"})
    options = render_unit(load_template("workload"), ctx)

    assert triples(options) == [
        ("Unit", "Description", "hello-world-0fbb804-2015.03.02-00.31.45"),
        ("Service", "Environment", '"DEPLOYSTER_WORKLOAD_HEALTH=fail"'),
        ("Service", "Environment", '"DEPLOYSTER_SERVICE=hello-world"'),
        ("Service", "Environment", '"DEPLOYSTER_VERSION=0fbb804"'),
        ("Service", "Environment", '"DEPLOYSTER_INSTANCE=2"'),
        ("Service", "Environment", '"DEPLOYSTER_UNIT=%n"'),
        ("Service", "Environment", '"DEPLOYSTER_MACHINE=%m"'),
        ("Service", "Environment", f'"DEPLOYSTER_ETCD={ETCD}"'),
        ("Service", "Environment", f'"DEPLOYSTER_ANNOUNCE_KEY={KEY}"'),
        ("Service", "ExecStart", "/opt/venv/bin/python -m deployster.testing.workload"),
        ("Service", "TimeoutStopSec", "10"),
    ]


def test_python_defaults_to_this_interpreter() -> None:
    ctx = UnitContext(unit=UNIT, image="x/y:1", etcd_endpoints=ETCD, announce_key=KEY)
    assert ctx.python == sys.executable
    assert ctx.container_port == 3000
    assert ctx.env == {}


@pytest.mark.parametrize(
    ("value", "line"),
    [
        ("plain", 'Environment="K=plain"'),
        ("two words", 'Environment="K=two words"'),
        ('say "hi"', 'Environment="K=say \\"hi\\""'),
        ("C:\\path\\", 'Environment="K=C:\\\\path\\\\"'),
        ("50% off %n", 'Environment="K=50%% off %%n"'),
        ("$HOME ${X} 'q'", "Environment=\"K=$HOME ${X} 'q'\""),
        ("", 'Environment="K="'),
    ],
)
def test_environment_lines_are_quoted_for_systemd(value: str, line: str) -> None:
    assert environment_line("K", value) == line


def test_environment_values_survive_the_unit_file() -> None:
    # What systemd reads back out of Environment="..." is the original value.
    value = 'a "quoted" \\ back\\slash, 100% and $dollar'
    [option] = parse_unit(f"[Service]\n{environment_line('K', value)}\n")
    [word] = shlex.split(option.value)
    assert word.replace("%%", "%") == f"K={value}"


def test_validate_env_accepts_and_copies() -> None:
    env = {"A": "1", "_b2": "x y", "EMPTY": "", "LONG": "x" * 2020}
    checked = validate_env(env)
    assert checked == env
    assert checked is not env


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"1ABC": "x"}, "env has the variable name '1ABC', which is not valid"),
        ({"A-B": "x"}, "env has the variable name 'A-B', which is not valid"),
        ({"": "x"}, "env has the variable name '', which is not valid"),
        ({"A B": "x"}, "env has the variable name 'A B', which is not valid"),
        ({"K": "line\nbreak"}, "env.K contains the character U+000A at position 4"),
        ({"K": "cr\rhere"}, "env.K contains the character U+000D at position 2"),
        ({"K": "nul\0here"}, "env.K contains the character U+0000 at position 3"),
        ({"K": "x\u2028ExecStartPre=/bin/touch /tmp/p"}, "env.K contains the character U+2028"),
        ({"K": 3}, "env.K must be a string"),
        ({"K": "x" * 2040}, "env.K is too long"),
    ],
)
def test_validate_env_rejects_with_a_sentence(env: dict[str, object], message: str) -> None:
    with pytest.raises(UnitValueError, match="^" + re.escape(message)) as caught:
        validate_env(env)  # type: ignore[arg-type]
    assert caught.value.field in ("env", "env.K")
    assert "here" not in str(caught.value)  # an environment value is never repeated


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"env": {"BAD-NAME": "x"}}, "env", "env has the variable name 'BAD-NAME'"),
        ({"image": "bad image"}, "image", "image is 'bad image', which cannot go into a unit"),
        ({"announce_key": "/k;rm -rf /"}, "announce_key", "announce_key is '/k;rm -rf /'"),
        ({"etcd_endpoints": "http://%h:2379"}, "etcd_endpoints", "etcd_endpoints is"),
        ({"python": "/my venv/bin/python"}, "python", "python is '/my venv/bin/python'"),
        # A leading '-' would be an option of docker pull.
        ({"image": "-v/:/host"}, "image", "image is '-v/:/host'"),
        ({"container_port": 0}, "container_port", "container_port is 0, not between 1 and"),
    ],
)
def test_context_checks_every_variable_by_name(
    changes: dict[str, object], field: str, message: str
) -> None:
    with pytest.raises(UnitValueError) as caught:
        context(**changes)
    assert caught.value.field == field
    assert str(caught.value).startswith(message)


def test_custom_template_file(tmp_path: Path) -> None:
    path = tmp_path / "custom.service"
    path.write_text(
        "# A comment with $VAR and %i, untouched.\n"
        "; another comment\n"
        "[Unit]\n"
        "Description=custom {{ unit_name }}\n"
        "\n"
        "[Service]\n"
        "  Environment=PORT={{ container_port }}\n"
        "{{ environment }}\n"
        "ExecStartPre=/bin/echo one\n"
        "ExecStartPre=/bin/echo two\n"
        "ExecStart=/usr/bin/docker run \\\n"
        "    --name {{ container }} \\\n"
        "    # a comment inside a continuation is dropped, as systemd does\n"
        "    -p {{ container_port }} {{ image }}\n"
        "ExecStop=/bin/kill -TERM $MAINPID ${X} %i\n"
        "{% if env.get('DEBUG') == '1' %}\n"
        "Environment=LOG_LEVEL=debug\n"
        "{% endif %}\n"
        "Empty=\n"
        "\n"
        "[X-Fleet]\n"
        "MachineMetadata=role=web\n"
        "MachineMetadata=role=api\n"
    )
    template = load_template(str(path))
    assert template.name == str(path)

    options = render_unit(template, context(env={"DEBUG": "1"}, container_port=5000))

    assert triples(options) == [
        ("Unit", "Description", "custom hello-world:0fbb804:2015.03.02-00.31.45@2.service"),
        ("Service", "Environment", "PORT=5000"),
        ("Service", "Environment", '"DEBUG=1"'),
        ("Service", "ExecStartPre", "/bin/echo one"),
        ("Service", "ExecStartPre", "/bin/echo two"),
        (
            "Service",
            "ExecStart",
            f"/usr/bin/docker run --name {CONTAINER} -p 5000 mmmhm/hello-world:0fbb804",
        ),
        ("Service", "ExecStop", "/bin/kill -TERM $MAINPID ${X} %i"),
        ("Service", "Environment", "LOG_LEVEL=debug"),
        ("Service", "Empty", ""),
        ("X-Fleet", "MachineMetadata", "role=web"),
        ("X-Fleet", "MachineMetadata", "role=api"),
    ]
    without_debug = triples(render_unit(template, context(env={})))
    assert ("Service", "Environment", "LOG_LEVEL=debug") not in without_debug


def test_every_template_variable_is_available(tmp_path: Path) -> None:
    path = tmp_path / "all.service"
    path.write_text(
        "[Service]\nExecStart=/bin/true\n"
        + "".join(
            f"X-{name}={{{{ {name} }}}}\n"
            for name in sorted(TEMPLATE_VARIABLES - {"environment", "env"})
        )
        + "X-env={{ env | join(',') }}\n"
    )
    options = render_unit(load_template(str(path)), context(env={"A": "1"}))
    values = {o.name: o.value for o in options}
    assert values == {
        "ExecStart": "/bin/true",
        "X-announce_key": KEY,
        "X-container": CONTAINER,
        "X-container_port": "3000",
        "X-docker": "/usr/bin/docker",
        "X-etcdctl": "/usr/bin/etcdctl",
        "X-pull_policy": "missing",
        "X-publish_address": "0.0.0.0",
        "X-description": "hello-world-0fbb804-2015.03.02-00.31.45",
        "X-etcd_endpoints": ETCD,
        "X-image": "mmmhm/hello-world:0fbb804",
        "X-instance": "2",
        "X-python": "/opt/venv/bin/python",
        "X-service": "hello-world",
        "X-timestamp": "2015.03.02-00.31.45",
        "X-unit_name": "hello-world:0fbb804:2015.03.02-00.31.45@2.service",
        "X-version": "0fbb804",
        "X-env": "A",
    }


def test_continuations_follow_systemd(tmp_path: Path) -> None:
    text = (
        "[Service]\n"
        "A=one \\\n"
        "two\\\n"
        "three\n"
        "B=ends with an escaped backslash \\\\\n"
        "C=cut by a blank line \\\n"
        "\n"
        "D=last \\\n"
    )
    assert triples(parse_unit(text)) == [
        ("Service", "A", "one two three"),
        ("Service", "B", "ends with an escaped backslash \\\\"),
        ("Service", "C", "cut by a blank line"),
        ("Service", "D", "last"),
    ]


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.service"
    with pytest.raises(TemplateError, match=f"Unit template {missing} does not exist"):
        load_template(str(missing))


def test_unknown_placeholder(tmp_path: Path) -> None:
    path = tmp_path / "typo.service"
    path.write_text("[Service]\nExecStart=/bin/run {{ imagee }}\n")
    with pytest.raises(TemplateError) as caught:
        load_template(str(path))
    message = str(caught.value)
    assert f"Unit template {path} uses unknown placeholder 'imagee' on line 2" in message
    assert "announce_key" in message  # lists what is available


def test_unknown_env_key_fails_at_load(tmp_path: Path) -> None:
    # A template must render for any deploy, including one without this variable.
    path = tmp_path / "env.service"
    path.write_text("[Service]\nExecStart=/bin/run {{ env.DATABASE_URL }}\n")
    with pytest.raises(TemplateError, match=f"Unit template {path} failed to render: .*DATABASE"):
        load_template(str(path))


def test_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.service"
    path.write_text("[Service]\n\nExecStart=/bin/run {% if image %}\n")
    with pytest.raises(TemplateError, match=f"Unit template {path} has a syntax error on line"):
        load_template(str(path))


def test_line_without_equals(tmp_path: Path) -> None:
    path = tmp_path / "noequals.service"
    path.write_text("[Unit]\nDescription=x\n\n[Service]\nExecStart /bin/run\n")
    with pytest.raises(
        TemplateError,
        match=rf"Unit template {path}, line 5: 'ExecStart /bin/run' is neither a \[Section\]",
    ):
        load_template(str(path))


def test_line_outside_a_section(tmp_path: Path) -> None:
    path = tmp_path / "nosection.service"
    path.write_text("# header\nDescription=x\n[Service]\nExecStart=/bin/run\n")
    with pytest.raises(TemplateError, match=f"{path}, line 2: Description= comes before any"):
        load_template(str(path))


def test_template_without_exec_start(tmp_path: Path) -> None:
    path = tmp_path / "idle.service"
    path.write_text("[Unit]\nDescription={{ description }}\n")
    with pytest.raises(TemplateError, match="has no ExecStart= in its \\[Service\\] section"):
        load_template(str(path))


def test_unknown_fleet_option(tmp_path: Path) -> None:
    # fleet's API accepts and ignores it, which would silently drop the placement rule.
    path = tmp_path / "xfleet.service"
    path.write_text("[Service]\nExecStart=/bin/run\n[X-Fleet]\nConflict=a@*.service\n")
    with pytest.raises(TemplateError, match="unknown fleet option Conflict= in \\[X-Fleet\\]"):
        load_template(str(path))


def test_lines_fleet_would_refuse(tmp_path: Path) -> None:
    path = tmp_path / "long.service"
    path.write_text("[Service]\nExecStart=/bin/run{% for k in env %} {{ k }}{% endfor %}\n")
    template = load_template(str(path))
    many = {f"VARIABLE_{n:04}": "" for n in range(150)}
    unit = re.escape(str(UNIT))
    expected = rf"renders ExecStart= in \[Service\] as a line of .* bytes for {unit}"
    with pytest.raises(TemplateError, match=expected):
        render_unit(template, context(env=many))


def test_template_error_is_a_value_error() -> None:
    assert issubclass(TemplateError, ValueError)


def test_announce_key_layout() -> None:
    assert announce_key("/deployster", UNIT) == KEY
    assert announce_key("/deployster/", UNIT) == KEY
    assert announce_key("/custom/prefix", UNIT) == (
        "/custom/prefix/instances/hello-world/0fbb804:2015.03.02-00.31.45/2"
    )
    assert instances_prefix("/deployster") == "/deployster/instances/"
    assert instances_prefix("/deployster", "hello-world") == "/deployster/instances/hello-world/"


def test_announce_key_parses_back() -> None:
    assert parse_announce_key("/deployster", KEY) == UNIT
    assert parse_announce_key("/deployster/", KEY) == UNIT
    assert parse_announce_key("/other", KEY) is None
    assert parse_announce_key("/deployster", "/deployster/instances/svc/v1/1") is None
    assert parse_announce_key("/deployster", "/deployster/instances/svc/v:t/x") is None
    assert parse_announce_key("/deployster", "/deployster/instances/svc/v:t/1/extra") is None


def test_announcement_json() -> None:
    announcement = Announcement(url="http://10.0.0.5:49153", machine="abc", unit=str(UNIT))
    assert Announcement.model_validate_json(announcement.model_dump_json()) == announcement


def test_image_name() -> None:
    assert image_name("mmmhm", "hello-world", "0fbb804") == "mmmhm/hello-world:0fbb804"
    assert image_name("my.registry:5000", "app", "abc123") == "my.registry:5000/app:abc123"
    assert image_name("ghcr.io/acme/", "api", "1.2") == "ghcr.io/acme/api:1.2"
