"""PUT/GET /v1/services/{name}/policy against real etcd."""

from __future__ import annotations

import pytest
from integration.conftest import Api

from deployster.policy import ServicePolicy


def policy_url(api: Api) -> str:
    """A service of this test's own that has no policy yet (the fixture's has a fast one)."""
    return f"/v1/services/{api.service}-p/policy"


async def test_a_service_without_policy_gets_the_defaults(api: Api) -> None:
    resp = await api.client.get(policy_url(api), headers=api.auth)
    assert resp.status == 200
    policy = (await resp.json())["policy"]
    assert policy == ServicePolicy().model_dump(mode="json")
    assert policy["health"] == {
        "path": "/health",
        "interval": 1.0,
        "timeout": 2.0,
        "healthy_threshold": 2,
        "unhealthy_threshold": 3,
    }
    assert (
        policy["min_healthy_time"],
        policy["instance_deadline"],
        policy["deploy_deadline"],
        policy["drain"],
    ) == (10.0, 300.0, 600.0, 10.0)


async def test_put_keeps_what_was_given_and_defaults_the_rest(api: Api) -> None:
    resp = await api.client.put(
        policy_url(api),
        headers=api.auth,
        json={"policy": {"health": {"path": "/up"}, "drain": 0, "instance_count": 3}},
    )
    assert resp.status == 200
    policy = (await resp.json())["policy"]
    assert policy["health"]["path"] == "/up" and policy["health"]["interval"] == 1.0
    assert (policy["drain"], policy["instance_count"], policy["min_healthy_time"]) == (0, 3, 10.0)
    again = await (await api.client.get(policy_url(api), headers=api.auth)).json()
    assert again["policy"] == policy
    # Only the given fields are stored, so later default changes reach this service.
    key = f"{api.deployster.settings.etcd_prefix}/services/{api.service}-p/policy".encode()
    stored = (await api.deployster.etcd.get(key)).value
    assert b"min_healthy_time" not in stored and b"/up" in stored


@pytest.mark.parametrize(
    "body,field",
    [
        ({"policy": {"drain": -1}}, "policy.drain"),
        ({"policy": {"instance_deadline": 86400 * 7}}, "policy.instance_deadline"),
        ({"policy": {"health": {"interval": 0}}}, "policy.health.interval"),
        ({"policy": {"health": {"path": "health"}}}, "policy.health.path"),
        ({"policy": {"health": {"healthy_threshold": 0}}}, "policy.health.healthy_threshold"),
        ({"policy": {"drian": 5}}, "policy.drian"),
        ({"policy": {"min_healthy_time": "soon"}}, "policy.min_healthy_time"),
        ({}, "policy"),
    ],
)
async def test_bad_policies_get_a_400_and_nothing_is_stored(
    api: Api, body: dict, field: str
) -> None:
    resp = await api.client.put(policy_url(api), headers=api.auth, json=body)
    assert resp.status == 400
    data = await resp.json()
    assert data["error"] == "invalid_request" and f"'{field}'" in data["description"]
    current = await (await api.client.get(policy_url(api), headers=api.auth)).json()
    assert current["policy"] == ServicePolicy().model_dump(mode="json")


async def test_container_settings_default_keep_and_refuse_garbage(api: Api) -> None:
    defaults = (await (await api.client.get(policy_url(api), headers=api.auth)).json())["policy"]
    assert (
        defaults["container_port"],
        defaults["pull_policy"],
        defaults["publish_address"],
    ) == (3000, "missing", None)
    given = {"container_port": 8080, "pull_policy": "never", "publish_address": "127.0.0.1"}
    resp = await api.client.put(policy_url(api), headers=api.auth, json={"policy": given})
    assert resp.status == 200
    assert {k: (await resp.json())["policy"][k] for k in given} == given
    for field, value in [
        ("container_port", 0),
        ("container_port", 70000),
        ("pull_policy", "IfNotPresent"),
        ("publish_address", "localhost"),
        ("publish_address", "127.0.0.1; rm -rf /"),
        ("publish_address", "::1"),
    ]:
        resp = await api.client.put(
            policy_url(api), headers=api.auth, json={"policy": {field: value}}
        )
        assert resp.status == 400, (field, value)
        assert f"'policy.{field}'" in (await resp.json())["description"]
    kept = (await (await api.client.get(policy_url(api), headers=api.auth)).json())["policy"]
    assert {k: kept[k] for k in given} == given
