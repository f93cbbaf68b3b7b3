"""The docker template on localfleet: the service's policy reaches the units, and a unit that
cannot start rolls the deploy back with its own words."""

from __future__ import annotations

import dataclasses
from typing import Any

from integration.conftest import FAST_POLICY, running_api


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
