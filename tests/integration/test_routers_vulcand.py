"""The vulcand adapter against real etcd: the exact keys and values of `routers.md` §1.2.

No vulcand binary runs here (the project is dormant and ships none for this platform), so
these tests pin the wire format key by key, which is what vulcand reads.
"""

from __future__ import annotations

import json
import re
import secrets

import aetcd
import pytest

from deployster.routers import Router, RouterTimeoutError, VulcandRouter

SRV1 = "web-v1-2026.11.26-12.00.00-1"
SRV2 = "web-v1-2026.11.26-12.00.00-2"


@pytest.fixture
def prefix() -> str:
    return f"vulcand-test-{secrets.token_hex(4)}"


async def dump(etcd_client: aetcd.Client, prefix: str) -> dict[str, str]:
    return {
        kv.key.decode(): kv.value.decode() for kv in await etcd_client.get_prefix(prefix.encode())
    }


async def test_keys_after_ensure_register_and_deregister(
    etcd_client: aetcd.Client, prefix: str
) -> None:
    router = VulcandRouter(etcd_client, prefix=prefix, settle=0.0)
    assert isinstance(router, Router)
    await router.ensure_service("web")
    await router.ensure_service("web")  # idempotent
    await router.register("web", SRV1, "http://127.0.0.1:31001")
    await router.register("web", SRV2, "http://127.0.0.1:31002")
    await router.deregister("web", SRV1)

    keys = await dump(etcd_client, prefix)
    assert sorted(keys) == [
        f"{prefix}/backends/web~be/backend",
        f"{prefix}/backends/web~be/servers/{SRV2}",
        f"{prefix}/frontends/web~fe/frontend",
    ]
    assert keys[f"{prefix}/backends/web~be/backend"] == '{"Type":"http","Settings":{}}'
    assert keys[f"{prefix}/backends/web~be/servers/{SRV2}"] == '{"URL":"http://127.0.0.1:31002"}'
    assert json.loads(keys[f"{prefix}/frontends/web~fe/frontend"]) == {
        "Type": "http",
        "BackendId": "web~be",
        "Route": 'Host("web.localhost")',
        "Settings": {"FailoverPredicate": "IsNetworkError() && Attempts() <= 2"},
    }
    assert keys[f"{prefix}/frontends/web~fe/frontend"] == (
        '{"Type":"http","BackendId":"web~be","Route":"Host(\\"web.localhost\\")",'
        '"Settings":{"FailoverPredicate":"IsNetworkError() && Attempts() <= 2"}}'
    )
    assert await router.servers("web") == {SRV2: "http://127.0.0.1:31002"}


async def test_ensure_service_writes_only_what_changed(
    etcd_client: aetcd.Client, prefix: str
) -> None:
    router = VulcandRouter(etcd_client, prefix=prefix)
    await router.ensure_service("web")
    before = await etcd_client.get(router.backend_key("web").encode())
    await router.ensure_service("web", rule='Host("web.example.com")')
    after = await etcd_client.get(router.backend_key("web").encode())
    assert before is not None and after is not None
    assert after.mod_revision == before.mod_revision  # no needless watch event
    frontend = await etcd_client.get(router.frontend_key("web").encode())
    assert frontend is not None
    assert json.loads(frontend.value)["Route"] == 'Host("web.example.com")'


async def test_write_order_is_backend_before_frontend(
    etcd_client: aetcd.Client, prefix: str
) -> None:
    router = VulcandRouter(etcd_client, prefix=prefix)
    await router.ensure_service("web")
    backend = await etcd_client.get(router.backend_key("web").encode())
    frontend = await etcd_client.get(router.frontend_key("web").encode())
    assert backend is not None and frontend is not None
    assert backend.mod_revision < frontend.mod_revision


async def _servers_are(router: VulcandRouter, ids: set[str]) -> bool:
    return set(await router.servers("web")) == ids


async def test_deregister_deletes_the_exact_key_only(
    etcd_client: aetcd.Client, prefix: str
) -> None:
    """§1.7 bug 1: vulcand's own delete is a prefix delete; srv1 must not take srv1x."""
    router = VulcandRouter(etcd_client, prefix=prefix)
    await router.ensure_service("web")
    for server_id, port in (("srv1", 1), ("srv1x", 2), ("srv10", 3), ("srv1-old", 4)):
        await router.register("web", server_id, f"http://127.0.0.1:3100{port}")
    await router.deregister("web", "srv1")
    await router.deregister("web", "srv1")  # deregistering twice is fine
    assert await router.servers("web") == {
        "srv1x": "http://127.0.0.1:31002",
        "srv10": "http://127.0.0.1:31003",
        "srv1-old": "http://127.0.0.1:31004",
    }


async def test_services_whose_names_share_a_prefix_keep_their_own_servers(
    etcd_client: aetcd.Client, prefix: str
) -> None:
    router = VulcandRouter(etcd_client, prefix=prefix)
    for service in ("a", "a-be"):
        await router.ensure_service(service)
        await router.register(service, f"{service}-v1-1", f"http://127.0.0.1:3100{len(service)}")
    # What vulcand's snapshot does (§1.7 bug 2): all keys under "<backend key minus /backend>".
    backend_dir = router.backend_key("a").removesuffix("/backend")
    under = [kv.key.decode() for kv in await etcd_client.get_prefix(backend_dir.encode())]
    assert all(key.startswith(backend_dir + "/") for key in under), under
    assert await router.servers("a") == {"a-v1-1": "http://127.0.0.1:31001"}


async def test_wait_applied_waits_for_the_keys_then_settles(
    etcd_client: aetcd.Client, prefix: str
) -> None:
    router = VulcandRouter(etcd_client, prefix=prefix, settle=0.2)
    await router.ensure_service("web")
    await router.register("web", SRV1, "http://127.0.0.1:31001")
    await router.wait_applied("web", present=["http://127.0.0.1:31001"], timeout=2)
    with pytest.raises(RouterTimeoutError, match=re.escape("missing ['http://127.0.0.1:31009']")):
        await router.wait_applied("web", present=["http://127.0.0.1:31009"], timeout=0.3)
