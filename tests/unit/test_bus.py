import asyncio

import pytest

from deployster.bus import EventBus
from deployster.events import DeployFailed, DeploySucceeded, Event


def succeeded(service: str, deploy_id: str) -> DeploySucceeded:
    return DeploySucceeded(service=service, deploy_id=deploy_id)


async def test_events_of_one_service_are_handled_in_order_one_at_a_time() -> None:
    bus = EventBus()
    seen: list[str] = []
    running = 0
    last = asyncio.Event()

    async def handler(event: DeploySucceeded) -> None:
        nonlocal running
        running += 1
        assert running == 1, "two events of one service ran at once"
        for _ in range(3):  # give the loop every chance to start the next event early
            await asyncio.sleep(0)
        seen.append(event.deploy_id)
        running -= 1
        if event.deploy_id == "last":
            last.set()

    bus.subscribe(DeploySucceeded, handler)
    for i in range(5):
        bus.publish(succeeded("web", str(i)))
    bus.publish(succeeded("web", "last"))
    await asyncio.wait_for(last.wait(), 5)
    assert seen == ["0", "1", "2", "3", "4", "last"]
    await bus.close()


async def test_services_proceed_in_parallel() -> None:
    bus = EventBus()
    release = asyncio.Event()
    handled = {"slow": asyncio.Event(), "fast": asyncio.Event()}
    seen: list[str] = []

    async def handler(event: DeploySucceeded) -> None:
        if event.service == "slow":
            await release.wait()
        seen.append(event.service)
        handled[event.service].set()

    bus.subscribe(DeploySucceeded, handler)
    bus.publish(succeeded("slow", "1"))
    bus.publish(succeeded("fast", "1"))
    # The fast service is handled while the slow one's handler still waits.
    await asyncio.wait_for(handled["fast"].wait(), 5)
    assert seen == ["fast"]
    release.set()
    await asyncio.wait_for(handled["slow"].wait(), 5)
    assert seen == ["fast", "slow"]
    await bus.close()


async def test_a_failing_handler_is_logged_with_context_and_the_lane_goes_on(
    log_lines: list[dict],
) -> None:
    bus = EventBus()
    good = asyncio.Event()

    async def broken(event: DeploySucceeded) -> None:
        if event.deploy_id == "bad":
            raise RuntimeError("boom")
        good.set()

    bus.subscribe(DeploySucceeded, broken)
    bus.publish(succeeded("web", "bad"))
    bus.publish(succeeded("web", "good"))
    await asyncio.wait_for(good.wait(), 5)
    failure = next(line for line in log_lines if line["event"] == "handler_failed")
    assert failure["log_level"] == "error"
    assert "broken" in failure["handler"]
    assert (failure["service"], failure["deploy_id"]) == ("web", "bad")
    await bus.close()


async def test_request_returns_the_answering_event() -> None:
    bus = EventBus()

    async def answer(event: DeploySucceeded) -> None:
        bus.publish(DeployFailed(service=event.service, deploy_id=event.deploy_id, reason="no"))

    bus.subscribe(DeploySucceeded, answer)

    def is_answer(e: Event) -> bool:
        return isinstance(e, DeployFailed) and e.deploy_id == "42"

    result = await bus.request(succeeded("web", "42"), until=is_answer, timeout=2)
    assert isinstance(result, DeployFailed) and result.reason == "no"
    await bus.close()


async def test_a_request_gets_the_exception_of_its_events_handler_at_once() -> None:
    bus = EventBus()

    async def broken(event: DeploySucceeded) -> None:
        raise KeyError("etcd said no")

    bus.subscribe(DeploySucceeded, broken)
    with pytest.raises(KeyError, match="etcd said no"):
        await bus.request(succeeded("web", "1"), until=lambda e: False, timeout=5)
    await bus.close()
