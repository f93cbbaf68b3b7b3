"""e2e: the real Debian docker-registry notifies Deployster of pushes made with skopeo from an
umoci OCI layout (no container engine), and the new version is deployed on localfleet."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path
from typing import Any

from e2e.registry import build_image, push, require_tools, start_registry
from helpers import eventually, known_secret
from integration.conftest import FAST_POLICY, Api, localfleet, running_api  # noqa: F401  (localfleet: a fixture)

from deployster.launchers import free_port
from deployster.naming import UnitName
from deployster.records import DeployRecord

SECRET = known_secret(f"registry-hook-{secrets.token_hex(8)}")


async def webhook_deploy(api: Api, count: int) -> DeployRecord:
    """The ``count``-th deploy started by a webhook, once it has ended."""

    async def done() -> DeployRecord | None:
        records = [
            r
            for r in await api.deployster.store.list_deploys(api.service)
            if r.source == "webhook:registry"
        ]
        return (
            records[count - 1]
            if len(records) >= count and records[count - 1].state.finished
            else None
        )

    return await eventually(done, timeout=60, interval=0.2)


async def decisions(api: Api) -> list[dict[str, Any]]:
    resp = await api.client.get("/v1/webhooks/events", headers=api.auth)
    return list((await resp.json())["events"])


async def test_a_skopeo_push_to_the_registry_deploys_the_new_version(
    aiohttp_client, etcd_endpoint: str, localfleet: str, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    require_tools()
    port = free_port()
    async with running_api(
        aiohttp_client,
        etcd_endpoint,
        localfleet,
        webhook_secret=SECRET,
        registry_url=f"127.0.0.1:{port}",
    ) as api:
        policy = {
            **FAST_POLICY.model_dump(mode="json", exclude={"auto_deploy"}),
            "auto_deploy": {"enabled": True, "policy": "patch"},
        }
        resp = await api.client.put(api.url("/policy"), json={"policy": policy}, headers=api.auth)
        assert resp.status == 200
        registry = start_registry(
            tmp_path, port, str(api.client.make_url("/v1/webhooks/registry")), SECRET
        )
        try:
            layout = tmp_path / "oci"
            # The image-name convention with -registry-url: <registry>/<service>:<version>.
            await asyncio.to_thread(build_image, layout, "v1.0.0")
            digest = await asyncio.to_thread(push, layout, "v1.0.0", registry, api.service)
            first = await webhook_deploy(api, 1)
            assert (first.state, first.version) == ("succeeded", "v1.0.0"), first.error
            assert first.actor.endswith(f"digest {digest}")

            await asyncio.to_thread(build_image, layout, "v1.0.1")
            digest = await asyncio.to_thread(push, layout, "v1.0.1", registry, api.service)
            second = await webhook_deploy(api, 2)
            assert (second.state, second.version) == ("succeeded", "v1.0.1"), second.error
            assert second.actor.endswith(f"digest {digest}")
            assert sorted(await api.units()) == sorted(second.units)  # v1.0.0 replaced
            for unit in second.units:
                instance = api.deployster.instances.get(UnitName.parse(unit))
                assert instance is not None and instance.healthy and instance.routed

            # A minor bump is not within policy patch; and the registry's own noise (blob
            # pushes, existence checks) is ignored with its reason.
            await asyncio.to_thread(build_image, layout, "v1.1.0")
            await asyncio.to_thread(push, layout, "v1.1.0", registry, api.service)

            async def minor_ignored() -> dict[str, Any] | None:
                return next(
                    (d for d in await decisions(api) if d["tag"] == "v1.1.0" and d["digest"]), None
                )

            minor = await eventually(minor_ignored, timeout=20)
            assert (minor["decision"], minor["reason"]) == (
                "ignored",
                "tag 'v1.1.0' changes more than the patch version of 'v1.0.1' (policy patch)",
            )
            reasons = {d["reason"] for d in await decisions(api)}
            assert "a push of application/octet-stream, not of an image manifest" in reasons
            assert [r.version for r in await api.deployster.store.list_deploys(api.service)] == [
                "v1.0.0",
                "v1.0.1",
            ]
        finally:
            registry.stop()
        assert SECRET not in registry.log.read_text()
