"""GET /metrics after real deploys: results, durations, rollbacks, probe failures."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from helpers import WEBHOOK_SECRET, eventually
from integration.conftest import FAST_POLICY, Api, running_api
from prometheus_client.parser import text_string_to_metric_families

from deployster.keys import announce_key
from deployster.naming import UnitName
from deployster.units import Announcement


async def scrape(api: Api) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    resp = await api.client.get("/metrics", headers=api.auth)
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(await resp.text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_metrics_count_deploys_by_result_and_failed_probes(api: Api) -> None:
    before = await scrape(api)
    assert before[("deployster_deploys_total", (("result", "rolled_back"),))] == 0
    assert ("deployster_bus_queue_depth", ()) in before

    await api.deployed({"version": "v1"})
    await api.deployster.store.save_policy(
        api.service, FAST_POLICY.model_copy(update={"instance_deadline": 2.0})
    )
    rolled = await api.deployed(
        {"version": "v2", "destroy_previous": True, "env": {"DEPLOYSTER_WORKLOAD_HEALTH": "fail"}}
    )
    assert rolled["state"] == "rolled_back"

    # The record says the deploy ended once it is saved; the bus tells the metrics right after.
    async def counted() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        found = await scrape(api)
        return found if found[("deployster_rollbacks_total", ())] else None

    after = await eventually(counted)
    assert after[("deployster_deploys_total", (("result", "succeeded"),))] == 1
    assert after[("deployster_deploys_total", (("result", "rolled_back"),))] == 1
    assert after[("deployster_rollbacks_total", ())] == 1
    assert after[("deployster_deploy_duration_seconds_count", (("result", "succeeded"),))] == 1
    duration = after[("deployster_deploy_duration_seconds_sum", (("result", "rolled_back"),))]
    assert 2.0 <= duration < 30  # at least the instance deadline it waited for


async def test_metrics_count_failed_health_probes_by_service(api: Api) -> None:
    async def sick(_: web.Request) -> web.Response:
        return web.Response(status=503)

    app = web.Application()
    app.router.add_get("/health", sick)
    server = TestServer(app)
    await server.start_server()
    try:
        unit = UnitName(api.service, "v1", "2026.01.01-00.00.00", 1)
        announcement = Announcement(
            url=str(server.make_url("")).rstrip("/"), machine="m", unit=str(unit)
        )
        key = announce_key(api.deployster.settings.etcd_prefix, unit)
        await api.deployster.etcd.put(key.encode(), announcement.model_dump_json().encode())
        series = ("deployster_health_probe_failures_total", (("service", api.service),))

        async def failed_thrice() -> bool:  # FAST_POLICY probes every 0.1 s
            return (await scrape(api)).get(series, 0) >= 3

        await eventually(failed_thrice, timeout=10)
        await api.deployster.etcd.delete(key.encode())
    finally:
        await server.close()


async def test_metrics_need_auth(api: Api) -> None:
    resp = await api.client.get("/metrics")
    assert resp.status == 401


@pytest.fixture
async def hooked_api(aiohttp_client, etcd_endpoint: str, localfleet: str) -> AsyncIterator[Api]:  # type: ignore[no-untyped-def]
    async with running_api(
        aiohttp_client, etcd_endpoint, localfleet, webhook_secret=WEBHOOK_SECRET
    ) as running:
        yield running


async def test_metrics_count_webhook_decisions_by_source_and_result(hooked_api: Api) -> None:
    api = hooked_api
    resp = await api.client.post(
        "/v1/webhooks/registry",
        data=b"{}",
        headers={
            "Authorization": "Bearer wrong",
            "Content-Type": "application/vnd.docker.distribution.events.v2+json",
        },
    )
    assert resp.status == 401
    resp = await api.client.post(
        "/v1/webhooks/registry",
        data=b'{"events": []}',
        headers={
            "Authorization": f"Bearer {WEBHOOK_SECRET}",
            "Content-Type": "application/vnd.docker.distribution.events.v2+json",
        },
    )
    assert resp.status == 202
    samples = await scrape(api)
    assert (
        samples[("deployster_webhooks_total", (("result", "rejected"), ("source", "registry")))]
        == 1
    )
