"""The queued push as the deploy worker reads it: what is garbage, and the deploy a push starts
(or why it no longer does) once its service is free."""

from __future__ import annotations

import pytest

from deployster.events import ImagePushed
from deployster.policy import AutoDeployPolicy, ServicePolicy
from deployster.records import DeployRecord, DeployState, DeployStep
from deployster.store import QueuedPush
from handlers.webhooks import deploy_of_push, read_queued

PUSH = ImagePushed(
    service="web",
    source="registry",
    repository="deployster/web",
    tag="v1.2.0",
    digest="sha256:abc",
    event_id="evt-9",
    callback_url="https://hub.example/u/secret-path/",
)


def policy(**auto: object) -> ServicePolicy:
    return ServicePolicy(instance_count=2, auto_deploy=AutoDeployPolicy(enabled=True, **auto))


def release(version: str, state: DeployState = DeployState.SUCCEEDED) -> DeployRecord:
    return DeployRecord(
        id=f"id-{version}",
        service="web",
        version=version,
        timestamp="2026.01.01-00.00.00",
        instance_count=1,
        destroy_previous=False,
        state=state,
    )


def test_a_push_of_the_slots_service_is_read_back_with_its_callback() -> None:
    read = read_queued(QueuedPush("web", PUSH.model_dump_json(), 7))
    assert read == PUSH and read.callback_url == PUSH.callback_url


@pytest.mark.parametrize(
    "value",
    [
        "\ufffd\x00 not json",
        '{"service": 1}',
        "[]",
        "",
        PUSH.model_copy(update={"service": "other"}).model_dump_json(),  # another service's
        PUSH.model_copy(update={"tag": "../v1 x"}).model_dump_json(),  # never a version
    ],
)
def test_anything_else_in_the_slot_is_garbage(value: str) -> None:
    assert read_queued(QueuedPush("web", value, 7)) is None


def test_the_slot_value_is_not_in_its_repr() -> None:
    assert "secret-path" not in repr(QueuedPush("web", PUSH.model_dump_json(), 7))


def test_a_wanted_push_becomes_a_queued_deploy() -> None:
    record = deploy_of_push(PUSH, policy(policy="minor"), [release("v1.1.0")])
    assert isinstance(record, DeployRecord)
    assert (record.service, record.version, record.step, record.state) == (
        "web",
        "v1.2.0",
        DeployStep.QUEUED,
        DeployState.PENDING,
    )
    assert (record.source, record.actor) == ("webhook:registry", "event evt-9, digest sha256:abc")
    # Planned when its turn comes: as many instances as run then, or the policy's count.
    assert record.instance_count == 0 and record.destroy_previous
    assert record.policy.instance_count == 2
    assert [e.kind for e in record.events] == ["queued"]
    assert "secret-path" not in record.model_dump_json()


def test_a_push_keeps_the_policys_destroy_previous() -> None:
    record = deploy_of_push(PUSH, policy(destroy_previous=False), [])
    assert isinstance(record, DeployRecord) and not record.destroy_previous


def test_auto_deploy_turned_off_while_the_push_waited_drops_it() -> None:
    off = ServicePolicy(auto_deploy=AutoDeployPolicy(enabled=False))
    assert deploy_of_push(PUSH, off, []) == (
        "auto-deploy was turned off before the push could deploy"
    )


def test_a_version_that_went_live_meanwhile_drops_the_push() -> None:
    """The live version is the newest that succeeded, whatever came later."""
    records = [release("v1.1.0"), release("v1.3.0"), release("v1.4.0", DeployState.FAILED)]
    assert deploy_of_push(PUSH, policy(), records) == (
        "tag 'v1.2.0' is not newer than the live version 'v1.3.0' "
        "(checked again when the service was free)"
    )
