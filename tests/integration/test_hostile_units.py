"""Hostile values against the real API, localfleet and its agent: nothing they carry runs.

Each value tries to become an option of the unit (a line break systemd or Python would
split at) or to reach a shell through a specifier or a variable. Every payload would
``touch`` a marker file; the marker never appears. Values the rule refuses get a 400 naming
the field and reach no unit; values it accepts reach the unit's environment exactly, which
the unit's own ExecStartPre writes down as the agent ran it.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from helpers import eventually
from integration.conftest import Api, running_api

from deployster.units import load_template

SEPARATORS = {
    "U+2028": "\u2028",
    "U+2029": "\u2029",
    "VT": "\x0b",
    "FF": "\x0c",
    "FS": "\x1c",
    "GS": "\x1d",
    "RS": "\x1e",
    "NEL": "\x85",
    "CR": "\r",
    "LF": "\n",
    "CRLF": "\r\n",
    "NUL": "\0",
}
FULL_WIDTH_2026 = "\uff12\uff10\uff12\uff16"


def exists(path: Path) -> bool:
    return path.exists()


def read_json(path: Path) -> dict[str, str] | None:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):  # not there yet, or half written
        return None


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    """The file every payload would create; the path must be a plain word itself."""
    path = tmp_path / "pwned"
    assert re.fullmatch(r"[A-Za-z0-9_./-]+", str(path)), path
    return path


@pytest.fixture
async def hostile_api(
    aiohttp_client, etcd_endpoint: str, localfleet: str, tmp_path: Path
) -> AsyncIterator[Api]:  # type: ignore[no-untyped-def]
    """Deployster with the workload template plus an ExecStartPre that writes the unit's
    HOSTILE_* environment, as the agent gave it to the process, to a JSON file."""
    dump = (
        "import json, os, sys; "
        "json.dump({k: v for k, v in os.environ.items() if k.startswith('HOSTILE_')}, "
        "open(sys.argv[1], 'w'))"
    )
    source = load_template("workload").source.replace(
        "ExecStart=",
        f'ExecStartPre={{{{ python }}}} -c "{dump}" {tmp_path}/env-{{{{ instance }}}}.json\n'
        "ExecStart=",
        1,
    )
    template = tmp_path / "hostile.service"
    template.write_text(source)
    async with running_api(
        aiohttp_client, etcd_endpoint, localfleet, template=str(template)
    ) as api:
        yield api


async def post_deploy(api: Api, body: dict[str, Any], path: str | None = None) -> tuple[int, Any]:
    resp = await api.client.post(path or api.url("/deploys"), json=body, headers=api.auth)
    return resp.status, await resp.json()


@pytest.mark.parametrize("name", SEPARATORS)
async def test_a_line_break_in_a_value_is_a_400_naming_the_field(
    hostile_api: Api, marker: Path, name: str
) -> None:
    api, sep = hostile_api, SEPARATORS[name]
    payload = f"x{sep}ExecStartPre=/bin/touch {marker}{sep}#"
    cases = [
        ({"version": "v1", "env": {"X": payload}}, "deploy.env.X"),
        ({"version": "v1", "env": {f"X{sep}ExecStartPre=/bin/touch {marker}": "1"}}, "deploy.env"),
        ({"version": f"v1{payload}"}, "Version"),
        ({"version": "v1", "timestamp": f"2026.01.01-00.00.00{payload}"}, "Timestamp"),
    ]
    for body, field in cases:
        status, data = await post_deploy(api, {"deploy": body})
        assert status == 400, data
        assert data["error"] == "invalid_request"
        assert field in data["description"], data
        if field == "deploy.env.X":
            assert "touch" not in data["description"]  # an env value is never echoed
    status, data = await post_deploy(
        api, {"deploy": {"version": "v1"}}, f"/v1/services/{quote('x' + payload, safe='')}/deploys"
    )
    assert status == 400 and "Service name" in data["description"], data
    assert await api.units() == []
    assert not exists(marker)


@pytest.mark.parametrize(
    "name",
    [
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "PATH",
        "IFS",
        "DOCKER_HOST",
        "ETCDCTL_ENDPOINTS",
        "COREOS_PRIVATE_IPV4",
    ],
)
async def test_a_variable_the_hosts_own_commands_read_is_a_400(
    hostile_api: Api, marker: Path, name: str
) -> None:
    """The deploy's env is also the environment of the unit's host commands (docker, sh,
    etcdctl): a preloaded library, a search path or an announced address must not come
    from a deploy."""
    status, data = await post_deploy(
        hostile_api, {"deploy": {"version": "v1", "env": {name: str(marker)}}}
    )
    assert status == 400, data
    assert f"deploy.env.{name}" in data["description"] and str(marker) not in data["description"]
    assert await hostile_api.units() == []


async def test_unicode_digits_in_the_timestamp_are_a_400_naming_the_field(
    hostile_api: Api,
) -> None:
    status, data = await post_deploy(
        hostile_api, {"deploy": {"version": "v1", "timestamp": f"{FULL_WIDTH_2026}.01.01-00.00.00"}}
    )
    assert status == 400, data
    assert data["description"].startswith("The field 'deploy.timestamp' is "), data
    assert await hostile_api.units() == []


async def test_accepted_values_reach_the_environment_exactly_and_run_nothing(
    hostile_api: Api, marker: Path, tmp_path: Path
) -> None:
    api = hostile_api
    touch = f"/bin/touch {marker}"
    env = {
        "HOSTILE_SPECIFIERS": f"%n %m %i %H %% %{touch} 100%",
        "HOSTILE_DOLLARS": f"$HOME ${{PATH}} $$ $({touch}) `{touch}` ${{X:-$({touch})}}",
        "HOSTILE_QUOTES": f'x" ExecStartPre={touch} "y',
        "HOSTILE_BACKSLASHES": f'a\\" ExecStartPre={touch} \\\\" \\',
        "HOSTILE_SYNTAX": f"#;[Service]\tExecStartPre={touch}",
        "HOSTILE_UNICODE": "\xa0é 中 😀 \u200d\ufeff\xa0",
        "HOSTILE_EMPTY": "",
    }
    created = (await api.deploy({"version": "v1", "env": env}))["deploy"]
    [unit_name] = created["units"]

    unit = await api.fleet.get_unit(unit_name)
    names = [o.name for o in unit.options]
    assert names.count("ExecStartPre") == 1 and names.count("ExecStart") == 1, names
    written = tmp_path / "env-1.json"

    async def environment() -> dict[str, str] | None:
        return read_json(written)

    assert await eventually(environment, timeout=20, interval=0.1) == env
    assert (await api.finished(created["id"]))["state"] == "succeeded"
    assert not exists(marker)


async def test_a_rollback_to_a_record_with_a_hostile_env_is_refused(
    hostile_api: Api, marker: Path
) -> None:
    # A record written before the rule (tampered with here) must not reach a unit again.
    api = hostile_api
    v1 = await api.deployed({"version": "v1", "env": {"HOSTILE_X": "fine"}})
    v2 = await api.deployed({"version": "v2", "destroy_previous": True})
    assert (v1["state"], v2["state"]) == ("succeeded", "succeeded")
    store = api.deployster.store
    record = await store.get_deploy(api.service, v1["id"])
    assert record is not None
    record.env = {"HOSTILE_X": f"x\u2028ExecStartPre=/bin/touch {marker}\u2028#"}
    await store.save_deploy(record)

    resp = await api.client.post(api.url("/rollback"), headers=api.auth)
    data = await resp.json()
    assert resp.status == 409, data
    assert (
        f"(deploy {v1['id']}) cannot be deployed again: its env.HOSTILE_X contains"
        in (data["description"])
    )
    assert "touch" not in data["description"]
    assert sorted(await api.units()) == sorted(v2["units"])
    assert not exists(marker)
