"""What every router adapter shares: the ``Router`` protocol, its errors and input checks.

A router adapter is the one place that knows a router's etcd layout
(`docs/routers.md`). Deployster calls it with its own names: the service name and the
instance id in container form (``hello-v1-2026.11.26-12.00.00-1``, no ``:`` or ``@``). Each
adapter turns those into the router's ids and keys and checks them here first, so that a
name the router would mis-parse never reaches etcd.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit

from deployster.errors import PermanentError, TemporaryError, is_temporary
from deployster.naming import InvalidNameError, validate_service

# The container form of an instance id: the unit name's parts joined by '-'. No '/' (a key
# separator in both layouts), no ':' or '@' (Traefik's provider separator, fleet's delimiters).
_SERVER_ID_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class RouterError(Exception):
    """The router's keys could not be read or written as asked."""


class RouterRefusedError(RouterError, PermanentError):
    """The request cannot work as asked (a name or URL the router would mis-parse)."""


class RouterUnavailableError(RouterError, TemporaryError):
    """The router's etcd (or its API) did not answer, or a write lost a race: retry."""


class RouterTimeoutError(RouterUnavailableError):
    """The router did not apply a change within the time allowed."""


def failure(message: str, error: BaseException) -> RouterError:
    """``error`` of the router's etcd as this adapter's own: temporary when etcd may answer
    later, permanent otherwise (a value that does not parse)."""
    cls = RouterUnavailableError if is_temporary(error) else RouterRefusedError
    return cls(f"{message}: {error}")


@runtime_checkable
class Router(Protocol):
    """Routes a service's traffic to its registered servers (instances)."""

    async def ensure_service(self, service: str, rule: str | None = None) -> None:
        """Create what routing ``service`` needs; idempotent."""

    async def register(self, service: str, server_id: str, url: str) -> None:
        """Add one server to the service's load balancer."""

    async def deregister(self, service: str, server_id: str) -> None:
        """Remove one server; removing a server that is not registered is not an error."""

    async def servers(self, service: str) -> dict[str, str]:
        """Server id to URL, as the router's keys say now."""

    async def all_server_ids(self) -> dict[str, set[str]]:
        """The server ids of every service at once, by service: one paged read of the router's
        keys, for a pass over all services (a service without servers may be left out)."""

    async def wait_applied(
        self,
        service: str,
        present: Iterable[str] = (),
        absent: Iterable[str] = (),
        timeout: float = 10.0,
    ) -> None:
        """Return once the router serves the ``present`` URLs and none of the ``absent`` ones."""


@dataclass(frozen=True)
class Unapplied:
    """What a router still did not show when the time ran out."""

    missing: list[str]  # present URLs it does not serve
    extra: list[str]  # absent URLs it still serves
    answered: bool  # False: it never told what it serves


async def poll_applied(
    observe: Callable[[], Awaitable[set[str] | None]],
    present: Iterable[str],
    absent: Iterable[str],
    timeout: float,
    interval: float,
) -> Unapplied | None:
    """Ask ``observe`` for the URLs the router serves (None: no answer) every ``interval`` s
    until it serves every ``present`` URL and no ``absent`` one: None then, or what was still
    wrong once ``timeout`` passed. Each adapter says what it observes and what a timeout means."""
    want, unwanted = set(present), set(absent)
    deadline = time.monotonic() + timeout
    while True:
        urls = await observe()
        missing, extra = want - (urls or set()), unwanted & (urls or set())
        if urls is not None and not missing and not extra:
            return None
        if time.monotonic() >= deadline:
            return Unapplied(sorted(missing), sorted(extra), urls is not None)
        await asyncio.sleep(interval)


def check_service(service: str) -> str:
    try:
        return validate_service(service)
    except InvalidNameError as error:
        raise RouterRefusedError(str(error)) from None


def check_server_id(server_id: str) -> str:
    if not _SERVER_ID_RE.fullmatch(server_id):
        raise RouterRefusedError(
            f"Server id {server_id!r} is not valid: use the container form of an instance id "
            "(letters, digits, '_', '.' and '-', e.g. 'hello-v1-2026.11.26-12.00.00-1')."
        )
    return server_id


def check_url(url: str) -> str:
    """An absolute http(s) URL with a host, which both routers accept as a server."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RouterRefusedError(f"Server URL {url!r} is not valid: use http://HOST:PORT.")
    return url
