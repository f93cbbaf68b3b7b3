"""vulcand (v0.8 and later) driven through its etcd v3 keys.

Layout (`docs/routers.md` §1.2), with ``<prefix>`` the exact string vulcand gets as
``-etcdKey`` (default ``vulcand``, no leading slash on etcd v3: §1.3)::

    <prefix>/backends/<service>~be/backend            {"Type":"http","Settings":{}}
    <prefix>/backends/<service>~be/servers/<server>   {"URL":"http://10.0.0.5:31001"}
    <prefix>/frontends/<service>~fe/frontend          {"Type":"http","BackendId":"<service>~be",
                                                       "Route":"Host(\"<service>.localhost\")",
                                                       "Settings":{"FailoverPredicate":...}}

Design choices, each against a v3-engine bug (§1.7):

* **Ids are prefix-free.** On (re)start vulcand attaches servers to a backend by a string
  prefix without the trailing slash, so the servers of backend ``app2`` also land in ``app``.
  A fixed suffix made of name characters does not prevent it (``a-be`` is a prefix of
  ``a-be-be``, the backend of service ``a-be``); a terminator that cannot occur in a service
  name does: ``~`` is outside the service alphabet (`deployster.naming`), and it is an
  unreserved URL character, so the ids also work in vulcand's API paths and in vctl.
* **Exact-key deletes.** vulcand's own API deletes by prefix (``srv1`` also takes
  ``srv10``); this adapter writes and deletes the keys itself, one exact key at a time.
* **Write order** backend, servers, frontend (§1.2): ``ensure_service`` writes the backend
  then the frontend, and only when the stored value differs, so that repeating it does not
  wake every vulcand's watch.

vulcand has no way to confirm that a change was applied (§1.5, §1.6), so ``wait_applied``
checks the keys and then waits a settle time for the watch to reach every vulcand.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable, Mapping
from typing import Any

import aetcd
import structlog

from deployster.etcd import key_pages
from deployster.routers.base import (
    RouterRefusedError,
    RouterTimeoutError,
    check_server_id,
    check_service,
    check_url,
    failure,
    poll_applied,
)

DEFAULT_PREFIX = "vulcand"
DEFAULT_SETTLE = 1.0
# Retry a request that failed on a network error, at most twice: a cheap safety net while
# instances come and go (§1.2).
DEFAULT_FAILOVER = "IsNetworkError() && Attempts() <= 2"
ID_TERMINATOR = "~"

log = structlog.get_logger("deployster.routers.vulcand")


def backend_id(service: str) -> str:
    return f"{check_service(service)}{ID_TERMINATOR}be"


def frontend_id(service: str) -> str:
    return f"{check_service(service)}{ID_TERMINATOR}fe"


def default_route(service: str) -> str:
    return f'Host("{check_service(service)}.localhost")'


def encode(value: Mapping[str, Any]) -> bytes:
    """vulcand's JSON, compact and in a stable order so that values compare byte for byte."""
    return json.dumps(value, separators=(",", ":")).encode()


def backend_value(settings: Mapping[str, Any] | None = None) -> bytes:
    return encode({"Type": "http", "Settings": dict(settings or {})})


def server_value(url: str) -> bytes:
    return encode({"URL": check_url(url)})


def frontend_value(service: str, route: str, settings: Mapping[str, Any]) -> bytes:
    return encode(
        {
            "Type": "http",
            "BackendId": backend_id(service),
            "Route": route,
            "Settings": dict(settings),
        }
    )


class VulcandRouter:
    """Writes vulcand's keys directly into etcd (no vulcand API needed)."""

    def __init__(
        self,
        etcd: aetcd.Client,
        *,
        prefix: str = DEFAULT_PREFIX,
        settle: float = DEFAULT_SETTLE,
        backend_settings: Mapping[str, Any] | None = None,
        frontend_settings: Mapping[str, Any] | None = None,
        poll_interval: float = 0.05,
    ) -> None:
        if not prefix or prefix.endswith("/"):
            raise RouterRefusedError(
                f"vulcand prefix {prefix!r} is not valid: give the exact -etcdKey vulcand "
                "runs with, without a trailing '/', e.g. 'vulcand'."
            )
        self.etcd = etcd
        self.prefix = prefix
        self.settle = settle
        self.backend_settings = dict(backend_settings or {})
        self.frontend_settings = (
            dict(frontend_settings)
            if frontend_settings is not None
            else {"FailoverPredicate": DEFAULT_FAILOVER}
        )
        self.poll_interval = poll_interval

    # Keys -------------------------------------------------------------------------------

    def backend_key(self, service: str) -> str:
        return f"{self.prefix}/backends/{backend_id(service)}/backend"

    def servers_prefix(self, service: str) -> str:
        return f"{self.prefix}/backends/{backend_id(service)}/servers/"

    def server_key(self, service: str, server_id: str) -> str:
        return self.servers_prefix(service) + check_server_id(server_id)

    def frontend_key(self, service: str) -> str:
        return f"{self.prefix}/frontends/{frontend_id(service)}/frontend"

    # Router -----------------------------------------------------------------------------

    async def ensure_service(self, service: str, rule: str | None = None) -> None:
        route = rule or default_route(service)
        written = []
        for key, value in (
            (self.backend_key(service), backend_value(self.backend_settings)),
            (self.frontend_key(service), frontend_value(service, route, self.frontend_settings)),
        ):
            if await self._put_if_changed(key, value):
                written.append(key)
        log.info(
            "router_service_ensured",
            router="vulcand",
            service=service,
            route=route,
            written=written,
        )

    async def register(self, service: str, server_id: str, url: str) -> None:
        key = self.server_key(service, server_id)
        value = server_value(url)
        try:
            await self.etcd.put(key.encode(), value)
        except Exception as error:  # aetcd raises several unrelated types
            raise failure(f"Could not register {server_id} with vulcand", error) from error
        log.info(
            "router_registered",
            router="vulcand",
            service=service,
            server_id=server_id,
            url=url,
            key=key,
        )

    async def deregister(self, service: str, server_id: str) -> None:
        key = self.server_key(service, server_id)
        try:
            # Exact key, no range end: a prefix delete would take srv10 with srv1 (§1.7).
            deleted = await self.etcd.delete(key.encode())
        except Exception as error:
            raise failure(f"Could not deregister {server_id} from vulcand", error) from error
        log.info(
            "router_deregistered",
            router="vulcand",
            service=service,
            server_id=server_id,
            key=key,
            existed=bool(deleted),
        )

    async def servers(self, service: str) -> dict[str, str]:
        prefix = self.servers_prefix(service)
        found: dict[str, str] = {}
        try:
            listed = await self.etcd.get_prefix(prefix.encode())
        except Exception as error:
            raise failure(f"Could not read vulcand's servers of {service}", error) from error
        for kv in listed:
            server_id = kv.key.decode()[len(prefix) :]
            try:
                found[server_id] = json.loads(kv.value)["URL"]
            except (ValueError, KeyError, TypeError):
                log.warning("router_server_invalid", router="vulcand", key=kv.key.decode())
        return found

    async def all_server_ids(self) -> dict[str, set[str]]:
        """Read from the servers' keys alone: a server whose value is garbage is listed too
        (the reaper removes it when no announced instance stands behind it)."""
        prefix = f"{self.prefix}/backends/"
        suffix = f"{ID_TERMINATOR}be"
        found: dict[str, set[str]] = {}
        try:
            async for page in key_pages(self.etcd, prefix.encode()):
                for key, _ in page:
                    backend, _, server_id = key.decode()[len(prefix) :].partition("/servers/")
                    if not (server_id and backend.endswith(suffix)) or "/" in server_id:
                        continue  # a backend's own key, or one vulcand's layout does not have
                    found.setdefault(backend[: -len(suffix)], set()).add(server_id)
        except Exception as error:
            raise failure("Could not read vulcand's servers", error) from error
        return found

    async def wait_applied(
        self,
        service: str,
        present: Iterable[str] = (),
        absent: Iterable[str] = (),
        timeout: float = 10.0,
    ) -> None:
        started = time.monotonic()

        async def keys() -> set[str]:
            return set((await self.servers(service)).values())

        unapplied = await poll_applied(keys, present, absent, timeout, self.poll_interval)
        if unapplied is not None:
            log.warning(
                "router_apply_timeout",
                router="vulcand",
                service=service,
                missing=unapplied.missing,
                extra=unapplied.extra,
            )
            raise RouterTimeoutError(
                f"vulcand's keys for service {service!r} were not as wanted within "
                f"{timeout:g} s: missing {unapplied.missing}, still present {unapplied.extra}."
            )
        # No acknowledgement exists (§1.6): give the watch time to reach every vulcand.
        await asyncio.sleep(self.settle)
        log.info(
            "router_applied",
            router="vulcand",
            service=service,
            elapsed=round(time.monotonic() - started, 3),
            settle=self.settle,
        )

    async def _put_if_changed(self, key: str, value: bytes) -> bool:
        try:
            current = await self.etcd.get(key.encode())
            if current is not None and current.value == value:
                return False
            await self.etcd.put(key.encode(), value)
        except Exception as error:
            raise failure(f"Could not write vulcand key {key}", error) from error
        return True
