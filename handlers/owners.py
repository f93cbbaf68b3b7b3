"""Who probes, routes and reaps each service: one live server, by rendezvous hashing.

Every server computes the same answer from the same member list (``deployster/membership.py``)
with nothing written per service: the owner of a service is the member with the highest
weight ``hash(member, service)`` (rendezvous, or highest-random-weight, hashing). When a
member leaves, only its services move, each to the member with the next highest weight; when
one joins, it takes about ``1/n`` of the services, from everyone alike.

On top of the hash, a server *claims* a service while it holds that service's deploy lock:
the deploy it drives reads its own instances handler (health, routing), so it probes the
service too for the deploy's duration, beside the hash's owner. Two probers of one instance
are harmless: router writes are idempotent (register puts the same URL, deregister deletes).

Faults: the member list is the one last read, so while etcd is unreachable a server keeps
what it owned and takes nothing over; a partitioned server whose key expired is replaced by
its peers while it goes on probing its share: each instance is probed twice until it reads
the members again, never left unprobed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Iterable

from deployster.membership import Membership

MEMBER_TTL = 15  # seconds a dead server's services stay with it (the deploy lock's TTL)


def weight(member: str, service: str) -> int:
    """The member's weight for the service: 64 bits of BLAKE2b, the same in every process
    (Python's own ``hash`` of a str is salted per process)."""
    digest = hashlib.blake2b(f"{member}\0{service}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owner(service: str, members: Iterable[str]) -> str | None:
    """The member that owns ``service``: the highest weight (ties, never seen in practice,
    to the greater id); None without members."""
    return max(members, key=lambda m: (weight(m, service), m), default=None)


class Owners:
    """The ownership policy of one server over the live members; listeners are told (called,
    synchronously) whenever what this server owns may have changed."""

    def __init__(self, membership: Membership) -> None:
        self.membership = membership
        self._claims: dict[str, int] = {}  # service -> deploys of it this server drives
        self._cache: dict[str, bool] = {}
        self._members: Collection[str] = frozenset()
        self._listeners: list[Callable[[], None]] = []
        membership.on_change = self._changed

    @property
    def id(self) -> str:
        return self.membership.id

    def owns(self, service: str) -> bool:
        if service in self._claims:
            return True
        members = self.membership.members
        if members != self._members:
            self._members, self._cache = members, {}
        found = self._cache.get(service)
        if found is None:
            found = self._cache[service] = owner(service, members) == self.id
        return found

    def subscribe(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def claim(self, service: str) -> None:
        """This server drives a deploy of ``service``: it probes the service until
        :meth:`release`, whoever the hash picks."""
        self._claims[service] = self._claims.get(service, 0) + 1
        if self._claims[service] == 1:
            self._changed()

    def release(self, service: str) -> None:
        count = self._claims.get(service, 0) - 1
        if count > 0:
            self._claims[service] = count
            return
        if self._claims.pop(service, None) is not None:
            self._changed()

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()
