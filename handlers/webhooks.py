"""Webhooks: from an authenticated image push to a deploy, with every decision visible.

A route authenticates a delivery and parses it (``deployster/webhooks.py``); this handler
decides what each push means and follows it through:

1. **Which service.** A service whose policy names the repository (``auto_deploy.repository``)
   takes it; else the image-name convention (``<prefix>/<service>``) says which service's
   image it is, unless that service named another repository. No service: ignored.
2. **Decide** (``ImagePushed`` on the service's bus lane, so one service's pushes are decided
   in order): auto-deploy must be on in the service's policy; a redelivered event id, or a
   digest and tag already taken within 24 h, is a duplicate (keys on 24 h leases in etcd);
   the tag policy must take the tag over the live version. The answer is ``PushDecided``,
   which the route returns (202 either way: registries retry anything else).
3. **Queue.** One slot per service in etcd, so a restart does not lose it and every server
   sees it: a newer push replaces the queued one (latest wins), except that a semver policy
   never lets a lower version replace a higher one. A worker deploys a push only after taking
   it from the slot (compare-and-delete): a push another server's newer one replaced is
   dropped, so the latest push wins across servers too.
4. **Deploy.** One worker per service waits until no deploy of the service holds its lock
   (woken by ``DeploySucceeded``/``DeployFailed``, with a bounded poll of the lock as a
   fallback), checks the policy again against the then live version, and publishes
   ``DeployRequested`` as the API does (source ``webhook:<source>``, the event id and digest
   as actor). A 409 from the deploy handler means another deploy got in first: wait again.
5. **Report.** Every decision goes to the log, to the last 100 of ``GET /v1/webhooks/events``,
   and, for Docker Hub, to its ``callback_url`` once the deploy ends (best effort: a callback
   that fails is logged, never the deploy's failure).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal
from urllib.parse import urlsplit

import aetcd
import aiohttp
import structlog
from pydantic import BaseModel, Field

from deployster import naming
from deployster.aio import cancel_and_wait
from deployster.bus import EventBus
from deployster.etcd import EtcdError
from deployster.events import (
    DeployFailed,
    DeployRejected,
    DeployRequested,
    DeploySucceeded,
    Event,
    ImagePushed,
    PushDecided,
    UnitsSubmitted,
)
from deployster.metrics import Metrics
from deployster.releases import live_release
from deployster.store import DeployState, Store, new_deploy_id
from deployster.supervise import start_supervised
from deployster.tagpolicy import parse_version
from deployster.units import service_of_repository
from deployster.webhooks import SOURCES, Delivery, Push, Skipped

log = structlog.get_logger(__name__)

DEDUP_TTL = 24 * 3600  # seconds an event id, or a digest and tag, counts as seen
DECISIONS_KEPT = 100
DECIDE_TIMEOUT = 30.0  # the route's wait for a decision (etcd reads and writes only)
LOCK_POLL = 5.0  # fallback poll of the lock, should a deploy's end event be missed
CALLBACK_TIMEOUT = 10.0
RETRY_INITIAL, RETRY_MAX = 0.2, 5.0  # backoff of a worker that met an unreachable etcd
SUPERSEDED = "superseded by a push queued later (on this server or another) before it could deploy"

DecisionKind = Literal["queued", "deployed", "ignored", "rejected", "failed"]


def _now() -> datetime:
    return datetime.now(UTC)


class Decision(BaseModel):
    """One webhook decision, as the log and ``GET /v1/webhooks/events`` show it."""

    at: datetime = Field(default_factory=_now)
    source: str
    decision: DecisionKind
    reason: str
    event_id: str = ""
    repository: str = ""
    tag: str = ""
    digest: str = ""
    service: str = ""
    deploy_id: str = ""


@dataclass(eq=False)
class _Lane:
    """One service's queue slot and worker."""

    pending: ImagePushed | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # a deploy of the service ended
    task: asyncio.Task[None] | None = None


class WebhookHandler:
    def __init__(
        self,
        bus: EventBus,
        *,
        store: Store,
        image_prefix: str,
        secrets: dict[str, str],
        submit_timeout: float = 60.0,
        lock_poll: float = LOCK_POLL,
        metrics: Metrics | None = None,
    ) -> None:
        self.bus = bus
        self.metrics = metrics
        self.store = store
        self.image_prefix = image_prefix
        self._secrets = {source: secret for source, secret in secrets.items() if secret}
        self.submit_timeout = submit_timeout
        self.lock_poll = lock_poll
        self._decisions: deque[Decision] = deque(maxlen=DECISIONS_KEPT)
        self._answers: dict[str, Decision] = {}  # ImagePushed id -> its decision, for the route
        self._lanes: dict[str, _Lane] = {}
        self._following: dict[str, asyncio.Future[Event]] = {}  # deploy id -> its end
        self._session: aiohttp.ClientSession | None = None
        self._callbacks: set[asyncio.Task[None]] = set()

    def register(self) -> None:
        self.bus.subscribe(ImagePushed, self.on_pushed)
        self.bus.subscribe(DeploySucceeded, self.on_deploy_ended)
        self.bus.subscribe(DeployFailed, self.on_deploy_ended)

    def secret(self, source: str) -> str | None:
        """The secret of ``source``; None turns its endpoint off."""
        return self._secrets.get(source)

    @property
    def enabled(self) -> list[str]:
        return [source for source in SOURCES if source in self._secrets]

    def decisions(self) -> list[Decision]:
        """The last 100 decisions, newest first."""
        return list(reversed(self._decisions))

    async def start(self) -> int:
        """Take up the pushes that were queued when the server stopped; returns how many."""
        queued = [
            ImagePushed.model_validate_json(raw) for raw in await self.store.list_queued_pushes()
        ]
        for push in queued:
            log.info(
                "webhook_push_restored", service=push.service, tag=push.tag, event_id=push.event_id
            )
            self._queue(push)
        return len(queued)

    async def close(self) -> None:
        await cancel_and_wait(*(lane.task for lane in self._lanes.values()), *self._callbacks)
        if self._session is not None:
            await self._session.close()

    # -- receiving (called by the routes) ----------------------------------------------

    def rejected(self, source: str, reason: str, *, stranger: bool = False) -> Decision:
        """Note a delivery refused before any push was read (bad secret, malformed body).
        A ``stranger`` (no valid secret) is logged and counted but not kept among the
        decisions: anyone can send those, and they must not push real decisions out."""
        decision = Decision(source=source, decision="rejected", reason=reason)
        return self._note(decision, keep=not stranger)

    async def receive(self, delivery: Delivery) -> list[Decision]:
        """Decide every event of an authenticated delivery; raises asyncio.TimeoutError when a
        decision takes too long and EtcdError when etcd cannot be reached (the route answers
        503 then, and the sender retries)."""
        decided = [self._note(self._skipped(s)) for s in delivery.skipped]
        for push in delivery.pushes:
            decided.append(await self._receive(push))
        return decided

    async def _receive(self, push: Push) -> Decision:
        service, why_not = await self._service_for(push.repository)
        if service is None:
            return self._note(
                Decision(
                    source=push.source,
                    decision="ignored",
                    reason=why_not,
                    event_id=push.event_id,
                    repository=push.repository,
                    tag=push.tag,
                    digest=push.digest,
                )
            )
        event = ImagePushed(
            service=service,
            source=push.source,
            repository=push.repository,
            tag=push.tag,
            digest=push.digest,
            event_id=push.event_id,
            callback_url=push.callback_url,
        )
        try:
            await self.bus.request(
                event,
                until=lambda e: isinstance(e, PushDecided) and e.push_id == event.id,
                timeout=DECIDE_TIMEOUT,
            )
            return self._answers[event.id]
        finally:
            self._answers.pop(event.id, None)

    async def _service_for(self, repository: str) -> tuple[str | None, str]:
        policies = await self.store.list_policies()
        for name, policy in sorted(policies.items()):
            if policy.auto_deploy.repository == repository:
                return name, ""
        service = service_of_repository(self.image_prefix, repository)
        if service is not None:
            try:
                naming.validate_service(service)
            except naming.InvalidName:
                service = None
        if service is None:
            return None, (
                f"no service's image is {repository!r}: images are "
                f"{self.image_prefix}/<service>, or a service's policy names the repository "
                "in auto_deploy.repository"
            )
        named = policies[service].auto_deploy.repository if service in policies else None
        if named is not None:
            return (
                None,
                f"service {service!r} deploys pushes of {named!r} only (auto_deploy.repository)",
            )
        return service, ""

    # -- deciding (the service's bus lane) ---------------------------------------------

    async def on_pushed(self, event: ImagePushed) -> None:
        kind, reason = await self._decide(event)
        self._answers[event.id] = self._note(self._about(event, kind, reason))
        self.bus.publish(
            PushDecided(service=event.service, push_id=event.id, decision=kind, reason=reason)
        )

    async def _decide(self, event: ImagePushed) -> tuple[DecisionKind, str]:
        try:
            naming.validate_version(event.tag)
        except naming.InvalidName as exc:
            return "ignored", f"tag {event.tag!r} cannot be deployed as a version: {exc}"
        auto = (await self.store.get_policy(event.service)).auto_deploy
        if not auto.enabled:
            return (
                "ignored",
                f"auto-deploy is off for service {event.service!r} (policy auto_deploy.enabled)",
            )
        seen = [f"{event.source}/{event.event_id}"]
        if not await self.store.first_seen(seen[0], event.tag, DEDUP_TTL):
            return "ignored", f"event {event.event_id} was handled already (a redelivery)"
        try:
            why = auto.tag_policy.wants(
                event.tag, await self._live_version(event.service), auto.prerelease
            )
            if why:
                return "ignored", why
            if event.digest:
                seen.append(f"digests/{event.service}/{event.tag}@{event.digest}")
                if not await self.store.first_seen(seen[1], event.event_id, DEDUP_TTL):
                    seen.pop()
                    return (
                        "ignored",
                        f"{event.tag}@{event.digest} was taken already in the last 24 h",
                    )
            lane = self._lane(event.service)
            queued = lane.pending
            if (
                queued is not None
                and auto.tag_policy.ordered
                and _version_above(queued.tag, event.tag)
            ):
                return "ignored", f"the newer version {queued.tag} is queued already"
            await self.store.save_queued_push(event.service, event.model_dump_json())
        except BaseException:
            # Not decided after all: a redelivery must be decided afresh.
            for key in seen:
                with contextlib.suppress(EtcdError):
                    await self.store.forget_seen(key)
            raise
        if queued is not None:
            self._note(self._about(queued, "ignored", f"superseded by {event.tag}, pushed later"))
        self._queue(event)
        return "queued", (
            f"policy {auto.policy} takes {event.tag}; it deploys as soon as no other "
            f"deploy of {event.service!r} runs"
        )

    async def _live_version(self, service: str) -> str | None:
        records = await self.store.list_deploys(service)
        live = live_release(records)
        return live.version if live else None

    def _lane(self, service: str) -> _Lane:
        return self._lanes.setdefault(service, _Lane())

    def _queue(self, event: ImagePushed) -> None:
        lane = self._lane(event.service)
        lane.pending = event
        lane.wake.set()
        if lane.task is None or lane.task.done():
            # Supervised, in a log context of its own (not that of the push that started it).
            lane.task = start_supervised(
                f"webhooks:{event.service}", lambda: self._work(event.service, lane)
            )

    async def on_deploy_ended(self, event: DeploySucceeded | DeployFailed) -> None:
        lane = self._lanes.get(event.service)
        if lane is not None:
            lane.ended.set()
        future = self._following.pop(event.deploy_id, None)
        if future is not None and not future.done():
            future.set_result(event)

    # -- deploying (one worker per service) --------------------------------------------

    async def _work(self, service: str, lane: _Lane) -> None:
        backoff = RETRY_INITIAL
        while True:
            await lane.wake.wait()
            lane.wake.clear()
            while lane.pending is not None:
                push = lane.pending
                with structlog.contextvars.bound_contextvars(
                    service=service, event_id=push.event_id, tag=push.tag
                ):
                    try:
                        await self._wait_until_free(service, lane)
                        push = lane.pending or push  # the latest push wins
                        lane.pending = None
                        requeue = await self._deploy(push)
                        backoff = RETRY_INITIAL
                    except (EtcdError, aetcd.ClientError) as exc:
                        log.warning("webhook_deploy_retrying", reason=str(exc), retry_in=backoff)
                        await asyncio.sleep(backoff)
                        backoff = min(backoff * 2, RETRY_MAX)
                        requeue = True
                    except Exception as exc:
                        log.exception("webhook_deploy_crashed")
                        self._note(
                            self._about(push, "failed", f"Deployster failed to deploy it: {exc!r}")
                        )
                        requeue = False
                if requeue and lane.pending is not push:  # not taken yet if the lock check failed
                    if lane.pending is None:
                        lane.pending = push
                    else:
                        self._note(
                            self._about(
                                push, "ignored", f"superseded by {lane.pending.tag}, pushed later"
                            )
                        )

    async def _wait_until_free(self, service: str, lane: _Lane) -> None:
        while True:
            lane.ended.clear()  # before reading the lock: an end in between is not missed
            holder = await self.store.locks.holder(service)
            if holder is None:
                return
            log.info("webhook_push_waiting", holder=holder.holder, lock_reason=holder.reason)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(lane.ended.wait(), self.lock_poll)

    async def _deploy(self, push: ImagePushed) -> bool:
        """Start the deploy of ``push`` and follow it to its end; True to try again later
        (another deploy took the lock first)."""
        service = push.service
        auto = (await self.store.get_policy(service)).auto_deploy
        if not auto.enabled:
            why: str | None = "auto-deploy was turned off before the push could deploy"
        else:
            why = auto.tag_policy.wants(
                push.tag, await self._live_version(service), auto.prerelease
            )
        if why:
            self._note(
                self._about(push, "ignored", f"{why} (checked again when the service was free)")
            )
            await self._dequeue(push)
            return False
        # Take the push from its slot in etcd: of several servers (or a newer push), only
        # the slot's holder deploys, so the latest push wins across servers too.
        if not await self.store.delete_queued_push(service, push.model_dump_json()):
            self._note(self._about(push, "ignored", SUPERSEDED))
            return False
        deploy_id = new_deploy_id()
        ended: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self._following[deploy_id] = ended
        request = DeployRequested(
            service=service,
            deploy_id=deploy_id,
            version=push.tag,
            timestamp=naming.now_timestamp(),
            instance_count=0,
            destroy_previous=auto.destroy_previous,
            source=f"webhook:{push.source}",
            actor=f"event {push.event_id}" + (f", digest {push.digest}" if push.digest else ""),
        )
        try:
            result: Event | None = await self.bus.request(
                request,
                timeout=self.submit_timeout,
                until=lambda e: (
                    isinstance(e, (UnitsSubmitted, DeployRejected, DeployFailed))
                    and getattr(e, "deploy_id", None) == deploy_id
                ),
            )
        except TimeoutError:
            result = None  # fleet is slow: the deploy goes on, its end still comes
        except Exception as exc:
            result = DeployFailed(
                service=service, deploy_id=deploy_id, reason=f"the deploy handler failed: {exc}"
            )
        if isinstance(result, DeployRejected) and result.status == 409:
            self._following.pop(deploy_id, None)
            log.info("webhook_push_waiting", reason=result.description)
            if await self.store.restore_queued_push(service, push.model_dump_json()):
                return True
            self._note(self._about(push, "ignored", SUPERSEDED))
            return False
        if isinstance(result, (DeployRejected, DeployFailed)):
            self._following.pop(deploy_id, None)
            reason = result.description if isinstance(result, DeployRejected) else result.reason
            self._note(
                self._about(push, "failed", f"the deploy did not start: {reason}", deploy_id)
            )
            self._callback(push, "error", f"Deployster could not deploy {push.tag}: {reason}")
            return False
        self._note(self._about(push, "deployed", f"deploying {push.tag}", deploy_id))
        outcome = await self._follow(service, deploy_id, ended)
        if isinstance(outcome, DeploySucceeded):
            self._callback(push, "success", f"Deployster deployed {push.tag} (deploy {deploy_id}).")
        else:
            self._callback(
                push, "failure", f"The deploy of {push.tag} failed (deploy {deploy_id})."
            )
        return False

    async def _follow(self, service: str, deploy_id: str, ended: asyncio.Future[Event]) -> Event:
        """Wait for the deploy's end event; its record is read now and then in case the event
        was missed (it is published once, and this worker may have been busy)."""
        try:
            while True:
                try:
                    return await asyncio.wait_for(asyncio.shield(ended), self.lock_poll)
                except TimeoutError:
                    try:
                        record = await self.store.get_deploy(service, deploy_id)
                    except EtcdError as exc:  # the deploy is started: never start it again
                        log.warning(
                            "webhook_deploy_unreadable", deploy_id=deploy_id, reason=str(exc)
                        )
                        continue
                    if record is not None and record.state.finished:
                        if record.state is DeployState.SUCCEEDED:
                            return DeploySucceeded(service=service, deploy_id=deploy_id)
                        return DeployFailed(
                            service=service,
                            deploy_id=deploy_id,
                            reason=record.error or record.state,
                        )
        finally:
            self._following.pop(deploy_id, None)

    async def _dequeue(self, push: ImagePushed) -> None:
        try:
            await self.store.delete_queued_push(push.service, push.model_dump_json())
        except EtcdError as exc:
            # Left behind, it is taken up at the next start and checked against the policy again.
            log.warning("webhook_queue_not_cleared", reason=str(exc))

    # -- reporting ---------------------------------------------------------------------

    def _callback(self, push: ImagePushed, state: str, description: str) -> None:
        """Docker Hub's callback (`docs/webhooks.md` §1.2), sent beside the worker."""
        if not push.callback_url:
            return
        task = asyncio.create_task(self._send_callback(push.callback_url, state, description))
        self._callbacks.add(task)
        task.add_done_callback(self._callbacks.discard)

    async def _send_callback(self, url: str, state: str, description: str) -> None:
        host = urlsplit(url).hostname or "?"  # the URL's path is a capability: not logged
        if urlsplit(url).scheme != "https":
            log.warning(
                "dockerhub_callback_skipped", host=host, reason="the callback_url is not https"
            )
            return
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=CALLBACK_TIMEOUT)
            )
        body = {"state": state, "description": description[:255], "context": "Deployster"}
        try:
            async with self._session.post(url, json=body) as resp:
                if resp.status >= 300:
                    log.warning("dockerhub_callback_failed", host=host, status=resp.status)
                    return
            log.info("dockerhub_callback_sent", host=host, state=state)
        except Exception as exc:  # best effort: whatever goes wrong stays here
            log.warning("dockerhub_callback_failed", host=host, reason=repr(exc))

    def _about(
        self, event: ImagePushed, kind: DecisionKind, reason: str, deploy_id: str = ""
    ) -> Decision:
        return Decision(
            source=event.source,
            decision=kind,
            reason=reason,
            event_id=event.event_id,
            repository=event.repository,
            tag=event.tag,
            digest=event.digest,
            service=event.service,
            deploy_id=deploy_id,
        )

    @staticmethod
    def _skipped(skipped: Skipped) -> Decision:
        return Decision(
            source=skipped.source,
            decision="ignored",
            reason=skipped.reason,
            event_id=skipped.event_id,
            repository=skipped.repository,
            tag=skipped.tag,
        )

    def _note(self, decision: Decision, keep: bool = True) -> Decision:
        if keep:
            self._decisions.append(decision)
        fields = decision.model_dump(exclude={"at"}, exclude_defaults=True)
        log.info("webhook_decision", **fields)
        if self.metrics is not None:
            self.metrics.webhook_decided(decision.source, decision.decision)
        return decision


def _version_above(a: str, b: str) -> bool:
    va, vb = parse_version(a), parse_version(b)
    return va is not None and vb is not None and va.compare(vb) > 0
