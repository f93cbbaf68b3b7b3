"""GET /metrics after real deploys: results, durations, rollbacks, probe failures."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from collections.abc import AsyncIterator

import pytest

from integration.conftest import FAST_POLICY, Api, running_api


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
    await api.deployster.store.save_policy(api.service, FAST_POLICY.model_copy(update={"instance_deadline": 2.0}))
    rolled = await api.deployed({"version": "v2", "destroy_previous": True,
                                 "env": {"DEPLOYSTER_WORKLOAD_HEALTH": "fail"}})
    assert rolled["state"] == "rolled_back"

    after = await scrape(api)
    assert after[("deployster_deploys_total", (("result", "succeeded"),))] == 1
    assert after[("deployster_deploys_total", (("result", "rolled_back"),))] == 1
    assert after[("deployster_rollbacks_total", ())] == 1
    assert after[("deployster_deploy_duration_seconds_count", (("result", "succeeded"),))] == 1
    duration = after[("deployster_deploy_duration_seconds_sum", (("result", "rolled_back"),))]
    assert 2.0 <= duration < 30  # at least the instance deadline it waited for
    failures = after.get(("deployster_health_probe_failures_total", (("service", api.service),)), 0)
    # A failing instance that announced itself was probed every 0.1 s and failed each time.
    assert failures >= 1 or "never announced" in rolled["error"]


async def test_metrics_need_auth(api: Api) -> None:
    resp = await api.client.get("/metrics")
    assert resp.status == 401


@pytest.fixture
async def hooked_api(aiohttp_client, etcd_endpoint: str, localfleet: str) -> AsyncIterator[Api]:  # type: ignore[no-untyped-def]
    async with running_api(aiohttp_client, etcd_endpoint, localfleet, webhook_secret="hook-secret") as running:
        yield running


async def test_metrics_count_webhook_decisions_by_source_and_result(hooked_api: Api) -> None:
    api = hooked_api
    resp = await api.client.post("/v1/webhooks/registry", data=b"{}", headers={
        "Authorization": "Bearer wrong", "Content-Type": "application/vnd.docker.distribution.events.v2+json"})
    assert resp.status == 401
    resp = await api.client.post("/v1/webhooks/registry", data=b'{"events": []}', headers={
        "Authorization": "Bearer hook-secret", "Content-Type": "application/vnd.docker.distribution.events.v2+json"})
    assert resp.status == 202
    samples = await scrape(api)
    assert samples[("deployster_webhooks_total", (("result", "rejected"), ("source", "registry")))] == 1
