"""The docker template on localfleet: the service's policy reaches the units, a unit that
cannot start rolls the deploy back with its own words, and a stale copy of a unit never
withdraws the announcement of the copy that serves now."""

from __future__ import annotations

import dataclasses
import json
import secrets
from pathlib import Path
from typing import Any

import aetcd
from helpers import eventually
from integration.conftest import FAST_POLICY, localfleet_process, running_api

from deployster import naming
from deployster.fleet import FleetClient
from deployster.keys import announce_key
from deployster.launchers import etcd_binary
from deployster.naming import UnitName
from deployster.units import UnitContext, load_template, render_unit


async def test_the_policy_reaches_the_unit_and_its_failure_the_deploy(
    aiohttp_client: Any, etcd_endpoint: str, localfleet: str
) -> None:
    async with running_api(aiohttp_client, etcd_endpoint, localfleet, template="docker") as api:
        handler = api.deployster.deploys
        # A docker that fails every call: the pull policy "never" then says what is missing.
        handler.config = dataclasses.replace(handler.config, docker="/bin/false")
        policy = FAST_POLICY.model_copy(
            update={"container_port": 8080, "pull_policy": "never", "publish_address": "127.0.0.2"}
        )
        await api.deployster.store.save_policy(api.service, policy)

        created = (await api.deploy({"version": "v1"}))["deploy"]
        unit = await api.fleet.get_unit(created["units"][0])
        options = [(o.name, o.value) for o in unit.options]
        image = f"deployster/{api.service}:v1"
        start = next(value for name, value in options if name == "ExecStart")
        assert start.startswith("/bin/false run --rm --name ")
        assert start.endswith(f" -p 127.0.0.2::8080 {image}")
        pre = [value for name, value in options if name == "ExecStartPre"]
        assert "pull" not in pre[0].split(" || ")[0]
        post = next(value for name, value in options if name == "ExecStartPost")
        assert "url=http://127.0.0.2:" in post and f"--endpoints={etcd_endpoint} put" in post

        done = await api.finished(created["id"])
        assert done["state"] == "rolled_back"
        assert f"image {image} is not on this machine and the pull policy is never" in done["error"]
        assert "ExecStartPre process exited, code=exited, status=1" in done["error"]
        assert await api.units() == []


FAKE_DOCKER = """#!/bin/sh
# A docker whose containers are a sleep, published on a port of their own.
case "$1" in
    run) exec sleep 600 ;;
    port) echo "127.0.0.1:$(( 20000 + $$ % 40000 ))" ;;
esac
"""


async def test_a_stale_copy_of_a_unit_never_withdraws_the_live_copys_announcement(
    tmp_path: Path, etcd_endpoint: str, etcd_client: aetcd.Client
) -> None:
    """Two copies of one unit (two localfleets on one host, as after fleet moved a unit or an
    agent lost track of one): the old copy stops after the new one announced itself, and the
    new announcement stays; the new copy's own stop withdraws it. Real sh, etcdctl and etcd."""
    docker = tmp_path / "docker"
    docker.write_text(FAKE_DOCKER)
    docker.chmod(0o755)
    unit = UnitName.build(f"svc-{secrets.token_hex(3)}", "v1", naming.now_timestamp(), 1)
    key = announce_key(f"/deployster-test-{secrets.token_hex(4)}", unit)
    options = render_unit(
        load_template("docker"),
        UnitContext(
            unit=unit,
            image=f"deployster/{unit.service}:v1",
            etcd_endpoints=etcd_endpoint,
            announce_key=key,
            docker=str(docker),
            etcdctl=str(Path(etcd_binary()).with_name("etcdctl")),
            publish_address="127.0.0.1",
        ),
    )

    async def announced(other_than: str | None = None) -> str | None:
        kv = await etcd_client.get(key.encode())
        value = kv.value.decode() if kv is not None else None
        return value if value != other_than else None

    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    with (
        localfleet_process(tmp_path / "old", machines=1) as old_endpoint,
        localfleet_process(tmp_path / "new", machines=1) as new_endpoint,
    ):
        async with FleetClient(old_endpoint) as old, FleetClient(new_endpoint) as new:
            await old.create_unit(str(unit), options)
            await old.set_desired_state(str(unit), "launched")
            first = await eventually(announced, timeout=20)
            await new.create_unit(str(unit), options)
            await new.set_desired_state(str(unit), "launched")
            second = await eventually(lambda: announced(other_than=first), timeout=20)
            assert json.loads(second)["url"] != json.loads(first)["url"]

            await old.destroy_unit(str(unit))  # ExecStop of the old copy runs now

            async def old_gone() -> bool:
                return not [s for s in await old.list_states() if s.name == str(unit)]

            await eventually(old_gone, timeout=30)
            assert await announced() == second
            # The old copy's withdrawal did run: its note of the value it wrote is gone.
            notes = list(Path("/tmp").glob(f"deployster-announced-{unit}-*"))
            assert len(notes) == 1, notes

            await new.destroy_unit(str(unit))
            await eventually(lambda: _absent(etcd_client, key), timeout=30)
    assert list(Path("/tmp").glob(f"deployster-announced-{unit}-*")) == []


async def _absent(client: aetcd.Client, key: str) -> bool:
    return await client.get(key.encode()) is None
