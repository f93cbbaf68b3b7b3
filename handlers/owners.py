"""Who probes, routes and reaps each service: one live server, by rendezvous hashing.

Every server computes the same answer from the same member list (``deployster/membership.py``)
with nothing written per service: the owner of a service is the member with the highest
weight ``hash(member, service)`` (rendezvous, or highest-random-weight, hashing). When a
member leaves, only its services move, each to the member with the next highest weight; when
one joins, it takes about ``1/n`` of the services, from everyone alike.

A deploy overrides the hash for its duration: the server that holds a service's deploy lock
*claims* the service (the deploy reads that server's own view of health and routing, and
*retires* instances there so that no late probe routes them again), and every other server
lets go of a service whose lock it sees held (the locks are watched): one router writer per
service, even mid-deploy. Once the lock is released, or its lease expired with a dead
holder, the hash's owner takes the service back.

Ownership never changes hands with a gap: a server starts probing a service as soon as it owns
it, and stops ``HANDOVER_GRACE`` seconds after it stopped owning it (the new owner is probing
by then). Two probers of one instance for that moment are harmless: router writes are
idempotent (register puts the same URL, deregister deletes what may be gone).

Faults: the member list and the locks are the ones last read, so while etcd is unreachable a
server keeps what it owned and takes nothing over; a partitioned server whose key expired is
replaced by its peers while it goes on probing its share: each instance is probed twice until
it reads the members again, never left unprobed. A lock key that does not decode is no lock.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Collection, Iterable

import aetcd
import structlog
from pydantic import ValidationError

from deployster.aio import cancel_and_wait
from deployster.etcd import WatchEvent, watch_prefix
from deployster.membership import Membership
from deployster.records import LockHolder
from deployster.store import LOCK_TTL
from deployster.supervise import start_supervised

log = structlog.get_logger(__name__)

MEMBER_TTL = LOCK_TTL  # seconds a dead server's services stay with it
HANDOVER_GRACE = 1.0  # seconds a server probes on after it no longer owns a service


def weight(member: str, service: str) -> int:
    """The member's weight for the service: 64 bits of BLAKE2b, the same in every process
    (Python's own ``hash`` of a str is salted per process)."""
    digest = hashlib.blake2b(f"{member}\0{service}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owner(service: str, members: Iterable[str]) -> str | None:
    """The member that owns ``service``: the highest weight (ties, never seen in practice,
    to the greater id); None without members."""
    return max(members, key=lambda m: (weight(m, service), m), default=None)


Listener = Callable[[frozenset[str] | None], None]


class Owners:
    """The ownership policy of one server over the live members; listeners are told (called,
    synchronously) whenever what this server owns may have changed, with the services whose
    ownership may have changed (None: any service, the members changed)."""

    def __init__(self, membership: Membership, etcd: aetcd.Client, locks: str) -> None:
        """``locks``: the prefix of the deploy locks, one key per service under it."""
        self.membership = membership
        self.etcd = etcd
        self.locks = locks.rstrip("/") + "/"
        self._claims: dict[str, int] = {}  # service -> deploys of it this server drives
        self._locked: frozenset[str] = frozenset()  # services whose deploy lock is held
        self._read = asyncio.Event()
        self._watch: asyncio.Task[None] | None = None
        self._cache: dict[str, bool] = {}
        self._members: Collection[str] = frozenset()
        self._listeners: list[Listener] = []
        membership.subscribe(lambda: self._changed(None))

    @property
    def id(self) -> str:
        return self.membership.id

    async def start(self, wait: float = 5.0) -> None:
        """Follow the deploy locks; return once they were read (or after ``wait`` s)."""
        self._watch = start_supervised(
            "locks-watch",
            lambda: watch_prefix(self.etcd, self.locks, self._on_lock, self._on_locks),
        )
        try:
            await asyncio.wait_for(self._read.wait(), wait)
        except TimeoutError:
            log.warning("locks_unread", wait=wait)

    async def close(self) -> None:
        await cancel_and_wait(self._watch)

    def owns(self, service: str) -> bool:
        if service in self._claims:
            return True
        if service in self._locked:
            return False  # a deploy driven by another process: that one probes it
        members = self.membership.members
        if members != self._members:
            self._members, self._cache = members, {}
        found = self._cache.get(service)
        if found is None:
            found = self._cache[service] = owner(service, members) == self.id
        return found

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def claim(self, service: str) -> None:
        """This server drives a deploy of ``service``: it probes the service until
        :meth:`release`, whoever the hash picks."""
        self._claims[service] = self._claims.get(service, 0) + 1
        if self._claims[service] == 1:
            self._changed(frozenset({service}))

    def release(self, service: str) -> None:
        count = self._claims.get(service, 0) - 1
        if count > 0:
            self._claims[service] = count
            return
        if self._claims.pop(service, None) is not None:
            self._changed(frozenset({service}))

    # -- the locks ----------------------------------------------------------------------

    def _locked_service(self, key: str, value: str) -> str | None:
        service = key[len(self.locks) :]
        if not service or "/" in service:
            return None
        try:
            LockHolder.model_validate_json(value)
        except ValidationError:
            log.warning("lock_invalid", key=key)
            return None
        return service

    def _set_locked(self, locked: frozenset[str]) -> None:
        if locked != self._locked:
            changed, self._locked = locked ^ self._locked, locked
            self._changed(changed)

    async def _on_locks(self, snapshot: dict[str, str], revision: int) -> None:
        found = (self._locked_service(k, v) for k, v in snapshot.items())
        self._set_locked(frozenset(s for s in found if s is not None))
        self._read.set()

    async def _on_lock(self, event: WatchEvent) -> None:
        service = event.key[len(self.locks) :]
        if event.value is not None and self._locked_service(event.key, event.value):
            self._set_locked(self._locked | {service})
        else:
            self._set_locked(self._locked - {service})

    def _changed(self, services: frozenset[str] | None) -> None:
        for listener in self._listeners:
            listener(services)
