"""GET /metrics after real deploys: results, durations, rollbacks, probe failures."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from integration.conftest import FAST_POLICY, Api


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
