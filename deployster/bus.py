"""In-process EventBus: publish, subscribe, supervised handler lanes.

One lane per service: a queue and a worker task that runs the subscribed handlers of each
event in order, so two handlers never race on one service's units, while different services
proceed in parallel (kopf queues per object the same way). A handler that raises is logged
with the event's context and the lane goes on: one bad event never stops the bus.

Routes that must answer with the outcome of an event (the deploy POST answers once the units
are submitted) use :meth:`EventBus.request`: the waiter is registered before the event is
published, so the answer cannot be missed, and if a handler of that very event raises, the
waiter gets the exception at once instead of waiting for an answer that will never come.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog

from deployster.aio import cancel_and_wait
from deployster.events import Event

log = structlog.get_logger(__name__)

E = TypeVar("E", bound=Event)
Handler = Callable[[Any], Awaitable[None]]
Predicate = Callable[[Event], bool]


class EventBus:
    def __init__(self) -> None:
        self._handlers: dict[type[Event], list[Handler]] = {}
        self._lanes: dict[str, asyncio.Queue[Event]] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}
        # (answers this predicate, future, id of the event whose handler failures it takes)
        self._waiters: list[tuple[Predicate, asyncio.Future[Event], str]] = []
        self._closed = False

    def subscribe(self, event_type: type[E], handler: Callable[[E], Awaitable[None]]) -> None:
        self._handlers.setdefault(event_type, []).append(handler)

    def publish(self, event: Event) -> None:
        """Hand ``event`` to its service's lane and to anyone waiting for it. Never blocks."""
        if self._closed:
            log.warning("event_dropped_bus_closed", **event.log_context)
            return
        for predicate, future, _ in list(self._waiters):
            if not future.done() and predicate(event):
                future.set_result(event)
        if not any(issubclass(type(event), t) for t in self._handlers):
            return
        lane = self._lanes.get(event.service)
        if lane is None:
            lane = self._lanes[event.service] = asyncio.Queue()
            self._workers[event.service] = asyncio.create_task(
                self._run_lane(event.service, lane), name=f"lane:{event.service}"
            )
        lane.put_nowait(event)

    async def request(self, event: Event, until: Predicate, timeout: float) -> Event:
        """Publish ``event`` and wait for the first event matching ``until``.

        Raises what a handler of ``event`` raised, or ``asyncio.TimeoutError``.
        """
        future: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        waiter = (until, future, event.id)
        self._waiters.append(waiter)
        try:
            self.publish(event)
            return await asyncio.wait_for(future, timeout)
        finally:
            self._waiters.remove(waiter)

    def queue_depth(self) -> int:
        """Events waiting in every lane (a gauge: a growing number means a stuck handler)."""
        return sum(lane.qsize() for lane in self._lanes.values())

    async def close(self) -> None:
        """Stop the lanes; pending events are dropped (etcd has the state)."""
        self._closed = True
        await cancel_and_wait(*self._workers.values())

    async def _run_lane(self, service: str, lane: asyncio.Queue[Event]) -> None:
        while True:
            event = await lane.get()
            for event_type, handlers in list(self._handlers.items()):
                if not isinstance(event, event_type):
                    continue
                for handler in handlers:
                    with structlog.contextvars.bound_contextvars(**event.log_context):
                        try:
                            await handler(event)
                        except Exception as exc:
                            log.exception("handler_failed", handler=_name(handler))
                            self._fail_waiters(event, exc)
            lane.task_done()

    def _fail_waiters(self, event: Event, exc: Exception) -> None:
        for _, future, cause in self._waiters:
            if cause == event.id and not future.done():
                future.set_exception(exc)


def _name(handler: Handler) -> str:
    return getattr(handler, "__qualname__", repr(handler))
