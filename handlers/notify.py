"""Notifications: tell receivers when a deploy starts, succeeds, fails or rolls back, and when
a task finishes.

Subscribed to the bus, outside every deploy's path: the handler only turns an event into
pending deliveries in etcd (one per receiver that wants it) and wakes the sender; it never
waits for a receiver. The sender posts each due delivery with a timeout, on its own task, so a
slow receiver delays nobody else; a non-2xx answer, a timeout or a refused connection is
retried on :data:`RETRY_SCHEDULE` (about 20 minutes in all) with the same delivery id, then
given up. Deliveries stay in etcd until they end, so a restart loses none (at least once).
Several servers share the outbox: a server claims a delivery (a compare-and-swap on its
record) before it sends it.

The sender follows the outbox with a watch on its prefix (a full read at start and after a
compaction, then only the changes), so it sees every server's deliveries, claims, retries and
ends as they are written, and sleeps until the next delivery is due. While etcd does not
answer it sends nothing: a delivery is only sent once its claim is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import structlog

from deployster.aio import cancel_and_wait
from deployster.bus import EventBus
from deployster.etcd import EtcdError, WatchEvent, watch_prefix
from deployster.events import DeployFailed, DeploySucceeded, TaskFinished, UnitsSubmitted
from deployster.metrics import Metrics
from deployster.notify import Delivery, DeliveryOutcome, NotifyTarget, headers, render
from deployster.store import NotificationStore, Store, TaskStore
from deployster.supervise import start_supervised

log = structlog.get_logger(__name__)

#: Seconds before each retry: 9 tries over about 20 minutes.
RETRY_SCHEDULE = (5.0, 15.0, 30.0, 60.0, 120.0, 240.0, 300.0, 450.0)
SEND_TIMEOUT = 10.0
#: Seconds before a delivery whose claim or outcome etcd did not take is tried again.
ETCD_RETRY = 1.0
MAX_PARALLEL = 16


class Notifier:
    def __init__(
        self,
        bus: EventBus,
        store: Store,
        tasks: TaskStore,
        outbox: NotificationStore,
        targets: list[NotifyTarget],
        *,
        base_url: str,
        metrics: Metrics,
        schedule: tuple[float, ...] = RETRY_SCHEDULE,
        timeout: float = SEND_TIMEOUT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.bus = bus
        self.store = store
        self.tasks = tasks
        self.outbox = outbox
        self.targets = targets  # the server's own, for every service
        self.base_url = base_url.rstrip("/")
        self.metrics = metrics
        self.schedule = schedule
        self.timeout = timeout
        self.clock = clock
        self._wake = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        # The outbox as the watch last showed it: delivery id -> (delivery, stored value).
        self._pending: dict[str, tuple[Delivery, bytes]] = {}
        # The stored value this server last acted on (claimed, or found claimed by another):
        # not acted on again until the watch brings the value that replaced it.
        self._acted: dict[str, bytes] = {}
        self._sending: dict[str, asyncio.Task[None]] = {}
        self._limit = asyncio.Semaphore(MAX_PARALLEL)
        self._session: aiohttp.ClientSession | None = None

    def register(self) -> None:
        self.bus.subscribe(UnitsSubmitted, self._on_started)
        self.bus.subscribe(DeploySucceeded, self._on_ended)
        self.bus.subscribe(DeployFailed, self._on_ended)
        self.bus.subscribe(TaskFinished, self._on_task)

    async def start(self) -> None:
        # No cookies, no proxies from the environment: a receiver gets exactly what we send.
        self._session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        self._watch = start_supervised(
            "notifications-watch",
            lambda: watch_prefix(
                self.outbox.etcd, self.outbox.pending_prefix, self._on_change, self._on_resync
            ),
        )
        self._loop = asyncio.create_task(self._send_loop(), name="notifications")

    async def close(self) -> None:
        await cancel_and_wait(*(t for t in (self._watch, self._loop) if t), *self._sending.values())
        if self._session is not None:
            await self._session.close()

    # -- events to deliveries ------------------------------------------------------------

    async def _on_started(self, event: UnitsSubmitted) -> None:
        await self._deploy_event("deploy.started", event.service, event.deploy_id, 0.0)

    async def _on_ended(self, event: DeploySucceeded | DeployFailed) -> None:
        name = "deploy.succeeded" if isinstance(event, DeploySucceeded) else f"deploy.{event.state}"
        await self._deploy_event(name, event.service, event.deploy_id, event.duration)

    async def _deploy_event(self, name: str, service: str, deploy_id: str, duration: float) -> None:
        record = await self.store.get_deploy(service, deploy_id)
        if record is None:
            log.warning("notification_without_record", notification=name)
            return
        deploy = {
            "id": record.id,
            "version": record.version,
            "timestamp": record.timestamp,
            "state": str(record.state),
            "reason": record.error or "",
            "source": record.source,
            "actor": record.actor,
            "instance_count": record.instance_count,
            "duration": round(duration, 3),
        }
        link = f"{self.base_url}/v1/services/{service}/deploys/{record.id}"
        await self._queue(name, service, {"deploy": deploy, "link": link})

    async def _on_task(self, event: TaskFinished) -> None:
        record = await self.tasks.get(event.service, event.task_id)
        if record is None:
            log.warning("notification_without_record", notification="task.finished")
            return
        task = {
            "id": record.id,
            "version": record.version,
            "state": str(record.state),
            "exit_code": record.exit_code,
            "reason": record.error,
            "actor": record.actor,
        }
        link = f"{self.base_url}/v1/services/{event.service}/tasks/{record.id}"
        await self._queue("task.finished", event.service, {"task": task, "link": link})

    async def _queue(self, name: str, service: str, details: dict[str, Any]) -> None:
        policy = await self.store.get_policy(service)
        targets = [t for t in [*self.targets, *policy.notify] if t.wants(name)]
        if not targets:
            return
        now = self.clock()
        payload = {"event": name, "service": service, "at": _iso(now), **details}
        deliveries = []
        for target in targets:
            delivery_id = secrets.token_hex(12)
            body = render(target.format, payload)
            secret = target.secret.get_secret_value() if target.secret else None
            deliveries.append(
                Delivery(
                    id=delivery_id,
                    event=name,
                    service=service,
                    url=target.url,
                    origin=target.origin,
                    body=body.decode(),
                    headers=headers(name, delivery_id, body, secret),
                    created_at=now,
                    next_at=now,
                )
            )
        await self.outbox.add(deliveries)  # the watch brings them to the sender
        log.info("notifications_queued", notification=name, receivers=len(deliveries))

    # -- the outbox, followed ------------------------------------------------------------

    async def _on_resync(self, snapshot: dict[str, str], revision: int) -> None:
        self._pending = {}
        for key, value in snapshot.items():
            self._keep(key, value)
        self._acted = {i: v for i, v in self._acted.items() if i in self._pending}
        self._wake.set()

    async def _on_change(self, event: WatchEvent) -> None:
        if event.value is None:
            delivery_id = event.key.removeprefix(self.outbox.pending_prefix)
            self._pending.pop(delivery_id, None)
            self._acted.pop(delivery_id, None)
        else:
            self._keep(event.key, event.value)
        self._wake.set()

    def _keep(self, key: str, value: str) -> None:
        delivery_id = key.removeprefix(self.outbox.pending_prefix)
        try:
            delivery = Delivery.model_validate_json(value)
        except ValueError:
            # Not a delivery this server can send: left alone, never retried in a loop.
            log.warning("notification_unreadable", delivery=delivery_id)
            self._pending.pop(delivery_id, None)
            return
        self._pending[delivery_id] = (delivery, value.encode())

    # -- the sender ----------------------------------------------------------------------

    async def _send_loop(self) -> None:
        """Start each due delivery; sleep until the next one is due or the outbox changes."""
        while True:
            self._wake.clear()
            now = self.clock()
            wait: float | None = None
            for delivery_id, (delivery, stored) in list(self._pending.items()):
                if delivery_id in self._sending or self._acted.get(delivery_id) == stored:
                    continue
                due = max(delivery.next_at, delivery.claimed_until)
                if due <= now:
                    self._sending[delivery_id] = asyncio.create_task(
                        self._deliver(delivery, stored)
                    )
                else:
                    wait = due - now if wait is None else min(wait, due - now)
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(None if wait is None else max(wait, 0.05)):
                    await self._wake.wait()

    async def _deliver(self, delivery: Delivery, stored: bytes) -> None:
        try:
            async with self._limit:
                await self._attempt(delivery, stored)
            current = self._pending.get(delivery.id)
            if current is not None and current[1] == stored:
                self._acted[delivery.id] = stored
        except EtcdError as exc:
            # The claim or the outcome could not be written: the delivery stays pending
            # and is tried again once etcd answers (at least once, never lost).
            log.warning("notification_not_recorded", delivery=delivery.id, reason=str(exc))
            await asyncio.sleep(ETCD_RETRY)
        finally:
            self._sending.pop(delivery.id, None)
            self._wake.set()

    async def _attempt(self, delivery: Delivery, stored: bytes) -> None:
        now = self.clock()
        claimed = delivery.model_copy(
            update={"attempts": delivery.attempts + 1, "claimed_until": now + self.timeout + 5}
        )
        claimed_value = await self.outbox.replace(claimed, stored)
        if claimed_value is None:
            return  # another server sent or is sending it
        status, error = await self._post(claimed)
        context = {
            "delivery": claimed.id,
            "notification": claimed.event,
            "receiver": claimed.origin,
            "attempt": claimed.attempts,
        }
        if status is not None and 200 <= status < 300:
            await self._finish(claimed, "delivered", status, "")
            log.info("notification_delivered", status=status, **context)
            return
        error = error or f"the receiver answered HTTP {status}"
        if claimed.attempts > len(self.schedule):
            await self._finish(claimed, "given_up", status, error)
            log.error("notification_given_up", reason=error, **context)
            return
        retry_in = self.schedule[claimed.attempts - 1]
        again = claimed.model_copy(
            update={"next_at": self.clock() + retry_in, "claimed_until": 0.0, "last_error": error}
        )
        await self.outbox.replace(again, claimed_value)
        self.metrics.notification_sent(claimed.event, "retried")
        log.warning("notification_failed", reason=error, retry_in=retry_in, **context)

    async def _post(self, delivery: Delivery) -> tuple[int | None, str]:
        assert self._session is not None
        try:
            async with self._session.post(
                delivery.url,
                data=delivery.body.encode(),
                headers=delivery.headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                allow_redirects=False,
            ) as response:
                await response.read()
                return response.status, ""
        except TimeoutError:
            return None, f"no answer within {self.timeout:g} s"
        except aiohttp.ClientError as exc:
            # The exception text may hold the URL (a Slack webhook's path is its secret).
            return None, f"the request failed ({type(exc).__name__})"

    async def _finish(
        self, delivery: Delivery, outcome: str, status: int | None, error: str
    ) -> None:
        await self.outbox.finish(
            delivery,
            DeliveryOutcome(
                id=delivery.id,
                event=delivery.event,
                service=delivery.service,
                origin=delivery.origin,
                outcome=outcome,  # type: ignore[arg-type]
                attempts=delivery.attempts,
                status=status,
                error=error,
                at=self.clock(),
            ),
        )
        self.metrics.notification_sent(delivery.event, outcome)

    async def deliveries(self, service: str) -> list[DeliveryOutcome]:
        """What the API shows: the service's pending deliveries, then the last that ended."""
        pending = [
            DeliveryOutcome(
                id=d.id,
                event=d.event,
                service=d.service,
                origin=d.origin,
                outcome="retrying",
                attempts=d.attempts,
                error=d.last_error,
                at=d.next_at,
            )
            for d, _ in await self.outbox.pending()
            if d.service == service
        ]
        return sorted(pending, key=lambda o: -o.at) + await self.outbox.outcomes(service)


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat()
