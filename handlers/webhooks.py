"""Webhooks: from an authenticated image push to a deploy, with every decision visible.

A route authenticates a delivery and parses it (``deployster/webhooks.py``); this handler
decides what each push means, and the service's deploy worker (``handlers/deploys.py``) deploys
it:

1. **Which service.** A service whose policy names the repository (``auto_deploy.repository``)
   takes it; else the image-name convention (``<prefix>/<service>``) says which service's
   image it is, unless that service named another repository. No service: ignored.
2. **Decide** (``ImagePushed`` on the service's bus lane, so one service's pushes are decided
   in order): auto-deploy must be on in the service's policy; a redelivered event id, or a
   digest and tag already taken within 24 h, is a duplicate (keys on 24 h leases in etcd);
   the tag policy must take the tag over the live version. The answer is ``PushDecided``,
   which the route returns (202 either way: registries retry anything else).
3. **Queue.** One slot per service in etcd (``webhooks/queued/<service>``), so a restart does
   not lose it and every server sees it: a newer push replaces the queued one (latest wins),
   except that a semver policy never lets a lower version replace a higher one. The slot is
   written only at the revision it was read at, so the same holds for pushes decided at once
   on two servers. ``PushDecided`` wakes the service's deploy worker.
4. **Deploy.** The worker's pass reads the slot as part of what is wanted. When no deploy of
   the service is unfinished, it checks the policy again against the then live version
   (:func:`deploy_of_push`) and, in one etcd transaction at the revision it read, deletes the
   push and writes a queued deploy record (source ``webhook:<source>``, the event id and
   digest as actor), which it then drives like any queued deploy. Of several servers one takes
   the push; a crash leaves either the push or the deploy. ``PushTaken`` tells this handler.
5. **Report.** Every decision goes to the log, to the last 100 of ``GET /v1/webhooks/events``,
   and, for Docker Hub, to its ``callback_url`` once the deploy ends: the callback is written
   beside the deploy record in the same transaction and taken by the server that ends the
   deploy, or by the next server to start should that one stop first (best effort: a callback that fails is logged, never the deploy's failure; its URL is
   a capability and never logged).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Sequence
from datetime import datetime
from typing import Literal
from urllib.parse import urlsplit

import aiohttp
import structlog
from pydantic import BaseModel, Field, ValidationError

from deployster import naming
from deployster.aio import cancel_and_wait
from deployster.bus import EventBus
from deployster.etcd import EtcdError
from deployster.events import (
    DeployFailed,
    DeployRequested,
    DeploySucceeded,
    ImagePushed,
    PushDecided,
    PushTaken,
    now,
)
from deployster.metrics import Metrics
from deployster.policy import ServicePolicy
from deployster.records import DeployRecord, DeployState, DeployStep, new_deploy_id
from deployster.releases import live_release
from deployster.store import QueuedPush, Store
from deployster.tagpolicy import parse_version
from deployster.units import service_of_repository
from deployster.webhooks import SOURCES, Delivery, Push, Skipped

log = structlog.get_logger(__name__)

DEDUP_TTL = 24 * 3600  # seconds an event id, or a digest and tag, counts as seen
DECISIONS_KEPT = 100
DECIDE_TIMEOUT = 30.0  # the route's wait for a decision (etcd reads and writes only)
CALLBACK_TIMEOUT = 10.0

DecisionKind = Literal["queued", "deployed", "ignored", "rejected"]


class Decision(BaseModel):
    """One webhook decision, as the log and ``GET /v1/webhooks/events`` show it."""

    at: datetime = Field(default_factory=now)
    source: str
    decision: DecisionKind
    reason: str
    event_id: str = ""
    repository: str = ""
    tag: str = ""
    digest: str = ""
    service: str = ""
    deploy_id: str = ""


def read_queued(queued: QueuedPush) -> ImagePushed | None:
    """The push in a service's slot, or None when the slot holds something else (garbage:
    only a push of that service with a tag that can be a version was ever queued)."""
    try:
        push = ImagePushed.model_validate_json(queued.value)
        naming.validate_version(push.tag)
    except (ValidationError, naming.InvalidNameError):
        return None
    return push if push.service == queued.service else None


def deploy_of_push(
    push: ImagePushed, policy: ServicePolicy, records: Sequence[DeployRecord]
) -> DeployRecord | str:
    """The queued deploy a queued push starts now that its service is free (``records`` are
    the service's, none unfinished), or why it no longer deploys: the policy is checked again
    against the then live version, since both may have changed while the push waited."""
    auto = policy.auto_deploy
    if not auto.enabled:
        return "auto-deploy was turned off before the push could deploy"
    live = live_release(records)
    why = auto.tag_policy.wants(push.tag, live.version if live else None, auto.prerelease)
    if why:
        return f"{why} (checked again when the service was free)"
    request = DeployRequested(
        service=push.service,
        deploy_id=new_deploy_id(),
        version=push.tag,
        timestamp=naming.now_timestamp(),
        destroy_previous=auto.destroy_previous,
        source=f"webhook:{push.source}",
        actor=f"event {push.event_id}" + (f", digest {push.digest}" if push.digest else ""),
    )
    record = DeployRecord.from_request(request, 0, auto.destroy_previous, policy)
    record.step = DeployStep.QUEUED
    record.note("queued", f"pushed ({push.source}): deploys once the service's lock is free")
    return record


class WebhookHandler:
    def __init__(
        self,
        bus: EventBus,
        *,
        store: Store,
        image_prefix: str,
        secrets: dict[str, str],
        metrics: Metrics | None = None,
    ) -> None:
        self.bus = bus
        self.metrics = metrics
        self.store = store
        self.image_prefix = image_prefix
        self._secrets = {source: secret for source, secret in secrets.items() if secret}
        self._decisions: deque[Decision] = deque(maxlen=DECISIONS_KEPT)
        self._answers: dict[str, Decision] = {}  # ImagePushed id -> its decision, for the route
        self._session: aiohttp.ClientSession | None = None
        self._callbacks: set[asyncio.Task[None]] = set()

    def register(self) -> None:
        self.bus.subscribe(ImagePushed, self.on_pushed)
        self.bus.subscribe(PushTaken, self.on_taken)
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

    async def close(self) -> None:
        await cancel_and_wait(*self._callbacks)
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
            except naming.InvalidNameError:
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
        # "queued" also wakes the service's deploy worker, which takes the push from its slot.
        self.bus.publish(
            PushDecided(service=event.service, push_id=event.id, decision=kind, reason=reason)
        )

    async def _decide(self, event: ImagePushed) -> tuple[DecisionKind, str]:
        try:
            naming.validate_version(event.tag)
        except naming.InvalidNameError as exc:
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
            while True:  # until the slot is written at the revision read (another server's)
                slot = await self.store.queued_push(event.service)
                queued = read_queued(slot) if slot is not None else None
                if (
                    queued is not None
                    and auto.tag_policy.ordered
                    and _version_above(queued.tag, event.tag)
                ):
                    return "ignored", f"the newer version {queued.tag} is queued already"
                if await self.store.queue_push(event.service, event.model_dump_json(), slot):
                    break
        except BaseException:
            # Not decided after all: a redelivery must be decided afresh.
            for key in seen:
                with contextlib.suppress(EtcdError):
                    await self.store.forget_seen(key)
            raise
        if queued is not None:
            self._note(self._about(queued, "ignored", f"superseded by {event.tag}, pushed later"))
        return "queued", (
            f"policy {auto.policy} takes {event.tag}; it deploys as soon as no other "
            f"deploy of {event.service!r} runs"
        )

    async def _live_version(self, service: str) -> str | None:
        records = await self.store.list_deploys(service)
        live = live_release(records)
        return live.version if live else None

    # -- what came of a push (reported by the service's deploy worker) -----------------

    async def on_taken(self, event: PushTaken) -> None:
        if event.deploy_id:
            self._note(
                self._about(event.push, "deployed", f"deploying {event.push.tag}", event.deploy_id)
            )
        else:
            self._note(self._about(event.push, "ignored", event.reason))

    async def on_deploy_ended(self, event: DeploySucceeded | DeployFailed) -> None:
        """Answer the Docker Hub callback of a pushed deploy that ended (on whichever server
        ended it: the callback is kept in etcd with the deploy)."""
        await self._answer(event.service, event.deploy_id)

    async def start(self) -> int:
        """Answer the callbacks of pushed deploys that ended while no server could (it stopped
        between the deploy's end and the callback); returns how many were answered."""
        answered = 0
        for service, deploy_id in await self.store.kept_callbacks():
            record = await self.store.get_deploy(service, deploy_id)
            if record is None or record.state.finished:
                answered += await self._answer(service, deploy_id)
        return answered

    async def _answer(self, service: str, deploy_id: str) -> bool:
        """Take the deploy's kept callback (one server does) and send what came of it."""
        try:
            kept = await self.store.take_callback(service, deploy_id)
            if kept is None:
                return False
            record = await self.store.get_deploy(service, deploy_id)
        except EtcdError as exc:  # best effort, as the callback itself
            log.warning("dockerhub_callback_unread", deploy_id=deploy_id, reason=str(exc))
            return False
        try:
            push = ImagePushed.model_validate_json(kept)
        except ValidationError:
            log.warning("dockerhub_callback_unreadable", deploy_id=deploy_id)
            return False
        tag = push.tag
        if record is None:
            self._callback(push, "error", f"Deployster lost the deploy of {tag} ({deploy_id}).")
        elif record.state is DeployState.SUCCEEDED:
            self._callback(push, "success", f"Deployster deployed {tag} (deploy {deploy_id}).")
        elif not record.submitted_at:  # no unit of it ever ran
            self._callback(push, "error", f"Deployster could not deploy {tag}: {record.error}")
        else:
            self._callback(push, "failure", f"The deploy of {tag} failed (deploy {deploy_id}).")
        return True

    # -- reporting ---------------------------------------------------------------------

    def _callback(self, push: ImagePushed, state: str, description: str) -> None:
        """Docker Hub's callback (`docs/webhooks.md` §1.2), sent beside the bus lane."""
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
