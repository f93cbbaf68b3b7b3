"""Server membership in etcd: who is alive, and this server among them.

Each server process writes ``<prefix>/servers/<id>`` on a lease of its own, kept alive in the
background (``LeaseKeeper``), and follows that prefix with the resumable watch. A server that
dies stops refreshing its lease and its key goes with it within the TTL; a clean stop revokes
the lease, so the key goes at once. The value is a small JSON :class:`Member`; a key whose
value does not decode, or whose id differs from the key's last part, is no member (logged
and ignored), so garbage under the prefix cannot take work from anyone.

This module only says who the members are. Who does what among them is the handlers'
business (``handlers/owners.py``).

Faults: while etcd cannot be reached the view stays as it was last read (the watch retries
and resyncs when etcd answers again), so a server neither gives up nor takes over work on a
guess. A lease that expired during a long outage is granted again and the key written again
as soon as etcd answers; so is a key someone deleted while the lease lived.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import socket
import time
from collections.abc import Callable

import aetcd
import structlog
from pydantic import BaseModel, ValidationError

from deployster import __version__, keys
from deployster.aio import cancel_and_wait
from deployster.etcd import EtcdError, LeaseKeeper, WatchEvent, watch_prefix
from deployster.supervise import start_supervised

log = structlog.get_logger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
REGISTER_RETRY_MAX = 5.0  # seconds between attempts to register while etcd does not answer


class Member(BaseModel):
    """The value of a member key: which process it is, for people reading etcd."""

    id: str
    host: str
    pid: int
    version: str
    started: float  # epoch seconds


def new_server_id() -> str:
    """``<host>-<pid>-<random>``: unique per process, even for two processes of one host
    and a pid reused after a restart; safe as one etcd key part."""
    host = _UNSAFE.sub("-", socket.gethostname()).strip("-") or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


class Membership:
    """This server's member key on a lease, and the live members as the watch last saw them.

    ``members`` always holds this server's own id: a server that cannot see its own key (not
    written yet, or lost in an outage) still counts itself, so it keeps its share of the work
    rather than dropping it. Listeners (:meth:`subscribe`) are called, synchronously, after
    each change of ``members``.
    """

    def __init__(
        self,
        etcd: aetcd.Client,
        prefix: str,
        ttl: int,
        server_id: str | None = None,
    ) -> None:
        self.etcd = etcd
        self.prefix = keys.members_prefix(prefix)
        self.ttl = ttl
        self.id = server_id or new_server_id()
        self._listeners: list[Callable[[], None]] = []
        self._seen: frozenset[str] = frozenset()  # the valid member keys the watch last saw
        self._keeper = LeaseKeeper(etcd, ttl=ttl)
        self._lost = asyncio.Event()  # our key was deleted while its lease lived
        self._read = asyncio.Event()  # the watch has read the prefix once
        self._watch: asyncio.Task[None] | None = None
        self._register: asyncio.Task[None] | None = None
        self._started = time.time()

    @property
    def key(self) -> str:
        return f"{self.prefix}{self.id}"

    @property
    def members(self) -> frozenset[str]:
        return self._seen | {self.id}

    def subscribe(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, wait: float = 5.0) -> None:
        """Follow the members; return once they were read (or after ``wait`` seconds: the
        view then holds this server alone until etcd answers). Does not register yet."""
        self._watch = start_supervised(
            "members-watch",
            lambda: watch_prefix(self.etcd, self.prefix, self._on_event, self._on_resync),
        )
        try:
            await asyncio.wait_for(self._read.wait(), wait)
        except TimeoutError:
            log.warning("members_unread", wait=wait)

    def join(self) -> None:
        """Write this server's key, on its lease, and keep it there until :meth:`close`."""
        self._register = start_supervised("members-register", self._register_forever)

    async def close(self) -> None:
        """Leave: the key goes at once (the lease is revoked), so peers take over now."""
        await cancel_and_wait(self._register, self._watch)
        try:
            async with asyncio.timeout(2.0):
                await self._keeper.revoke()
        except (aetcd.ClientError, TimeoutError) as exc:
            log.warning("member_leave_failed", reason=str(exc), ttl=self.ttl)

    # -- registration --------------------------------------------------------------------

    async def _register_forever(self) -> None:
        delay = 0.2
        value = Member(
            id=self.id,
            host=socket.gethostname(),
            pid=os.getpid(),
            version=__version__,
            started=self._started,
        ).model_dump_json()
        while True:
            try:
                self._lost.clear()
                await self._keeper.grant()
                await self.etcd.put(self.key.encode(), value.encode(), lease=self._keeper.lease_id)
            except (aetcd.ClientError, EtcdError, TimeoutError) as exc:
                log.warning("member_register_retrying", reason=str(exc), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, REGISTER_RETRY_MAX)
                continue
            delay = 0.2
            log.info("member_registered", server_id=self.id, lease=f"{self._keeper.lease_id:x}")
            expired = asyncio.create_task(self._keeper.expired.wait())
            lost = asyncio.create_task(self._lost.wait())
            try:
                await asyncio.wait((expired, lost), return_when=asyncio.FIRST_COMPLETED)
            finally:
                await cancel_and_wait(expired, lost)
            log.warning(
                "member_key_gone",
                server_id=self.id,
                reason="lease expired" if self._keeper.expired.is_set() else "key deleted",
            )

    # -- the view ------------------------------------------------------------------------

    def _member_of(self, key: str, value: str) -> str | None:
        """The member id a key stands for, or None for anything that is not a member."""
        member_id = key[len(self.prefix) :]
        if not member_id or "/" in member_id:
            return None
        try:
            member = Member.model_validate_json(value)
        except ValidationError:
            log.warning("member_invalid", key=key)
            return None
        if member.id != member_id:
            log.warning("member_invalid", key=key, reason="the id differs from the key")
            return None
        return member_id

    def _update(self, seen: frozenset[str]) -> None:
        if seen == self._seen:
            return
        joined, left = seen - self._seen, self._seen - seen
        self._seen = seen
        log.info("members_changed", joined=sorted(joined), left=sorted(left), members=len(seen))
        for listener in self._listeners:
            listener()

    async def _on_resync(self, snapshot: dict[str, str], revision: int) -> None:
        seen = frozenset(
            m for m in (self._member_of(k, v) for k, v in snapshot.items()) if m is not None
        )
        if self._register is not None and self.id not in seen:
            self._lost.set()
        self._read.set()
        self._update(seen)

    async def _on_event(self, event: WatchEvent) -> None:
        member_id = event.key[len(self.prefix) :]
        if event.value is None:
            if member_id == self.id and self._register is not None:
                self._lost.set()
            self._update(self._seen - {member_id})
            return
        found = self._member_of(event.key, event.value)
        if found is None:
            self._update(self._seen - {member_id})  # a member overwritten with garbage
        else:
            self._update(self._seen | {found})
