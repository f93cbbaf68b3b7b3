"""Traefik (v3) driven through its etcd KV provider, confirmed through its API.

Layout (`docs/routers.md` §2.3), values plain strings, ``<root>`` Traefik's
``providers.etcd.rootKey`` (default ``traefik``)::

    <root>/http/routers/<service>/rule                              Host(`<service>.localhost`)
    <root>/http/routers/<service>/service                           <service>
    <root>/http/routers/<service>/entrypoints/0                     web         (if configured)
    <root>/http/services/<service>/loadbalancer/passhostheader      true
    <root>/http/services/<service>/loadbalancer/servers/<n>/url     http://10.0.0.5:31001

Routers and services are named after the Deployster service: ``@`` separates a name from its
provider in Traefik (§2.3), and service names cannot contain it.

**Server numbers.** ``<n>`` is a slice index to Traefik, filled in child order, so gaps are
fine (§2.4). During a start-first rollout the old and the new instance #k coexist, so ``<n>``
cannot be the instance number: each registration takes the next value of a per-service
counter, in one etcd transaction with the bookkeeping that maps the server id to ``<n>``.
That bookkeeping lives **outside** ``<root>`` (default ``/deployster/routers/traefik/<root>``),
because Traefik re-lists and parses the whole root on every change (§2.2), and a key it does
not understand there would break the whole dynamic configuration::

    <bookkeeping>/<service>/next                 next free <n>
    <bookkeeping>/<service>/servers/<server_id>  <n>

Deregistering deletes ``servers/<n>/`` by prefix **with** the trailing slash, so that
``servers/1/`` never takes ``servers/10/`` (§2.4), and the mapping key, in one transaction.

**Confirmation.** ``wait_applied`` polls ``GET <api_url>/api/http/services/<service>@etcd``
(§2.6) until ``loadBalancer.servers[].url`` lists every wanted URL and no unwanted one; a 404
means no servers. A change takes up to ``providersThrottleDuration`` (2 s by default) plus the
watch latency to appear (§2.2). Without an ``api_url`` the adapter can only check its keys and
wait ``settle`` seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

import aetcd
import aiohttp
import structlog
from aetcd.utils import prefix_range_end

from deployster.etcd import SMALL_PAGE_SIZE, key_pages, range_pages
from deployster.routers.base import (
    RouterError,
    RouterRefusedError,
    RouterTimeoutError,
    RouterUnavailableError,
    check_server_id,
    check_service,
    check_url,
    failure,
    poll_applied,
)

DEFAULT_ROOT_KEY = "traefik"
DEFAULT_BOOKKEEPING = "/deployster/routers/traefik"
# Traefik's default providersThrottleDuration (2 s) plus watch latency (§2.1, §2.6).
DEFAULT_SETTLE = 2.5
ALLOCATE_ATTEMPTS = 20

log = structlog.get_logger("deployster.routers.traefik")


def default_rule(service: str) -> str:
    return f"Host(`{check_service(service)}.localhost`)"


class TraefikRouter:
    """Writes Traefik's KV keys into etcd and reads back what Traefik serves."""

    def __init__(
        self,
        etcd: aetcd.Client,
        *,
        root_key: str = DEFAULT_ROOT_KEY,
        api_url: str | None = None,
        entrypoint: str | None = None,
        bookkeeping_prefix: str | None = None,
        settle: float = DEFAULT_SETTLE,
        poll_interval: float = 0.05,
        request_timeout: float = 2.0,
    ) -> None:
        root_key = root_key.rstrip("/")
        if not root_key:
            raise RouterRefusedError(
                "Traefik rootKey is empty: give the providers.etcd.rootKey Traefik runs with."
            )
        self.etcd = etcd
        self.root_key = root_key
        self.api_url = api_url.rstrip("/") if api_url else None
        self.entrypoint = entrypoint
        self.bookkeeping = (
            bookkeeping_prefix or f"{DEFAULT_BOOKKEEPING}/{root_key.strip('/')}"
        ).rstrip("/")
        if self.bookkeeping.startswith(root_key) or root_key.startswith(self.bookkeeping):
            raise RouterRefusedError(
                f"Deployster's bookkeeping prefix {self.bookkeeping!r} overlaps Traefik's rootKey "
                f"{root_key!r}: Traefik would read the bookkeeping keys; choose another prefix."
            )
        self.settle = settle
        self.poll_interval = poll_interval
        self.request_timeout = request_timeout

    # Keys -------------------------------------------------------------------------------

    def router_prefix(self, service: str) -> str:
        return f"{self.root_key}/http/routers/{check_service(service)}/"

    def service_key(self, service: str) -> str:
        return f"{self.root_key}/http/services/{check_service(service)}/loadbalancer/passhostheader"

    def servers_prefix(self, service: str) -> str:
        return f"{self.root_key}/http/services/{check_service(service)}/loadbalancer/servers/"

    def server_prefix(self, service: str, n: int) -> str:
        # The trailing '/' keeps servers/1/ from matching servers/10/ (§2.4).
        return f"{self.servers_prefix(service)}{n}/"

    def url_key(self, service: str, n: int) -> str:
        return f"{self.server_prefix(service, n)}url"

    def counter_key(self, service: str) -> str:
        return f"{self.bookkeeping}/{check_service(service)}/next"

    def mappings_prefix(self, service: str) -> str:
        return f"{self.bookkeeping}/{check_service(service)}/servers/"

    def mapping_key(self, service: str, server_id: str) -> str:
        return self.mappings_prefix(service) + check_server_id(server_id)

    # Router -----------------------------------------------------------------------------

    async def ensure_service(self, service: str, rule: str | None = None) -> None:
        prefix = self.router_prefix(service)
        wanted = {f"{prefix}rule": rule or default_rule(service), f"{prefix}service": service}
        if self.entrypoint:
            wanted[f"{prefix}entrypoints/0"] = self.entrypoint
        # Declares the service before its first server, so that Traefik answers 503 for it
        # instead of logging a router that points at a missing service.
        wanted[self.service_key(service)] = "true"
        try:
            current = {
                kv.key.decode(): kv.value.decode()
                for kv in await self.etcd.get_prefix(prefix.encode())
            }
            declared = await self.etcd.get(self.service_key(service).encode())
            if declared is not None:
                current[self.service_key(service)] = declared.value.decode()
            changed = {key: value for key, value in wanted.items() if current.get(key) != value}
            if changed:
                # One transaction: Traefik sees one change and reloads once.
                await self.etcd.transaction(
                    compare=[],
                    success=[
                        self.etcd.transactions.put(key.encode(), value.encode())
                        for key, value in changed.items()
                    ],
                    failure=[],
                )
        except Exception as error:
            raise failure(f"Could not write Traefik's router for {service}", error) from error
        log.info(
            "router_service_ensured",
            router="traefik",
            service=service,
            rule=wanted[f"{prefix}rule"],
            written=sorted(changed),
        )

    async def register(self, service: str, server_id: str, url: str) -> None:
        check_url(url)
        mapping = self.mapping_key(service, server_id)
        try:
            n = await self._allocate(service, server_id, url)
        except RouterError:
            raise
        except Exception as error:
            raise failure(f"Could not register {server_id} with Traefik", error) from error
        log.info(
            "router_registered",
            router="traefik",
            service=service,
            server_id=server_id,
            url=url,
            key=self.url_key(service, n),
            index=n,
            mapping=mapping,
        )

    async def deregister(self, service: str, server_id: str) -> None:
        mapping = self.mapping_key(service, server_id)
        tx = self.etcd.transactions
        try:
            for _ in range(ALLOCATE_ATTEMPTS):
                current = await self.etcd.get(mapping.encode())
                if current is None:
                    log.info(
                        "router_deregistered",
                        router="traefik",
                        service=service,
                        server_id=server_id,
                        existed=False,
                    )
                    return
                n = int(current.value)
                prefix = self.server_prefix(service, n).encode()
                ok, _ = await self.etcd.transaction(
                    compare=[tx.mod(mapping.encode()) == current.mod_revision],
                    success=[
                        tx.delete(prefix, range_end=prefix_range_end(prefix)),
                        tx.delete(mapping.encode()),
                    ],
                    failure=[],
                )
                if ok:
                    log.info(
                        "router_deregistered",
                        router="traefik",
                        service=service,
                        server_id=server_id,
                        existed=True,
                        index=n,
                        key=prefix.decode(),
                    )
                    return
        except Exception as error:
            raise failure(f"Could not deregister {server_id} from Traefik", error) from error
        raise RouterUnavailableError(
            f"Could not deregister {server_id} from Traefik: its registration kept changing "
            f"under {mapping}; retry."
        )

    async def servers(self, service: str) -> dict[str, str]:
        """Server id to URL; a server without bookkeeping shows as ``#<n>``."""
        prefix = self.servers_prefix(service)
        mprefix = self.mappings_prefix(service)
        try:
            listed = await self.etcd.get_prefix(prefix.encode())
            mapped = await self.etcd.get_prefix(mprefix.encode())
        except Exception as error:
            raise failure(f"Could not read Traefik's servers of {service}", error) from error
        urls: dict[int, str] = {}
        for kv in listed:
            rest = kv.key.decode()[len(prefix) :]
            index, _, field = rest.partition("/")
            if field == "url" and index.isascii() and index.isdigit():
                urls[int(index)] = kv.value.decode()
        ids = {int(kv.value): kv.key.decode()[len(mprefix) :] for kv in mapped}
        return {ids.get(n, f"#{n}"): url for n, url in sorted(urls.items())}

    async def all_server_ids(self) -> dict[str, set[str]]:
        """One paged read of the services' keys and one of the bookkeeping; a server without
        bookkeeping is ``#<index>``, as in ``servers``."""
        services_prefix = f"{self.root_key}/http/services/"
        bookkeeping = f"{self.bookkeeping}/"
        indexes: dict[str, set[int]] = {}
        ids: dict[str, dict[int, str]] = {}
        try:
            async for keys in key_pages(self.etcd, services_prefix.encode()):
                for key, _ in keys:
                    service, _, rest = key.decode()[len(services_prefix) :].partition(
                        "/loadbalancer/servers/"
                    )
                    index, _, field = rest.partition("/")
                    if field == "url" and index.isascii() and index.isdigit():
                        indexes.setdefault(service, set()).add(int(index))
            async for page in range_pages(self.etcd, bookkeeping.encode(), SMALL_PAGE_SIZE):
                for key, value in page:
                    service, _, server_id = key.decode()[len(bookkeeping) :].partition("/servers/")
                    if server_id and "/" not in service and value.isdigit():
                        ids.setdefault(service, {})[int(value)] = server_id
        except Exception as error:
            raise failure("Could not read Traefik's servers", error) from error
        return {
            service: {ids.get(service, {}).get(n, f"#{n}") for n in found}
            for service, found in indexes.items()
        }

    async def served_urls(self, service: str, session: aiohttp.ClientSession) -> set[str] | None:
        """URLs Traefik serves for ``service`` now; None if its API did not answer."""
        url = f"{self.api_url}/api/http/services/{check_service(service)}@etcd"
        try:
            async with session.get(url) as response:
                if response.status == 404:
                    return set()
                if response.status != 200:
                    return None
                body = await response.json()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None
        servers = (body.get("loadBalancer") or {}).get("servers") or []
        return {server["url"] for server in servers if "url" in server}

    async def wait_applied(
        self,
        service: str,
        present: Iterable[str] = (),
        absent: Iterable[str] = (),
        timeout: float = 10.0,
    ) -> None:
        started = time.monotonic()
        where = f"Traefik at {self.api_url}" if self.api_url else "Traefik's keys"
        timeouts = aiohttp.ClientTimeout(total=self.request_timeout)
        async with aiohttp.ClientSession(timeout=timeouts) as session:

            async def served() -> set[str] | None:
                if self.api_url:
                    return await self.served_urls(service, session)
                return set((await self.servers(service)).values())

            unapplied = await poll_applied(served, present, absent, timeout, self.poll_interval)
        if unapplied is not None:
            log.warning(
                "router_apply_timeout",
                router="traefik",
                service=service,
                missing=unapplied.missing,
                extra=unapplied.extra,
                api_answered=unapplied.answered,
            )
            state = (
                f"still missing {unapplied.missing}, still serving {unapplied.extra}"
                if unapplied.answered
                else "its API did not answer"
            )
            raise RouterTimeoutError(
                f"{where} did not apply the change to service {service!r} within "
                f"{timeout:g} s: {state}. Check that Traefik watches etcd under rootKey "
                f"{self.root_key!r} and that its providersThrottleDuration is well below "
                "the timeout."
            )
        if not self.api_url:
            await asyncio.sleep(self.settle)  # no confirmation without the API (§2.6)
        log.info(
            "router_applied",
            router="traefik",
            service=service,
            elapsed=round(time.monotonic() - started, 3),
            confirmed=bool(self.api_url),
        )

    async def _allocate(self, service: str, server_id: str, url: str) -> int:
        """Write the url key under this server's number, taking a new number if it has none."""
        tx = self.etcd.transactions
        mapping = self.mapping_key(service, server_id).encode()
        counter = self.counter_key(service).encode()
        for _ in range(ALLOCATE_ATTEMPTS):
            current = await self.etcd.get(mapping)
            if current is not None:
                # Registered before: keep its number, refresh its url.
                n = int(current.value)
                ok, _ = await self.etcd.transaction(
                    compare=[tx.mod(mapping) == current.mod_revision],
                    success=[
                        tx.put(mapping, str(n).encode()),
                        tx.put(self.url_key(service, n).encode(), url.encode()),
                    ],
                    failure=[],
                )
            else:
                count = await self.etcd.get(counter)
                n = int(count.value) if count is not None else 0
                ok, _ = await self.etcd.transaction(
                    compare=[
                        tx.version(mapping) == 0,
                        tx.mod(counter) == count.mod_revision
                        if count is not None
                        else tx.version(counter) == 0,
                    ],
                    success=[
                        tx.put(counter, str(n + 1).encode()),
                        tx.put(mapping, str(n).encode()),
                        tx.put(self.url_key(service, n).encode(), url.encode()),
                    ],
                    failure=[],
                )
            if ok:
                return n
        raise RouterUnavailableError(
            f"Could not register {server_id} with Traefik: the server counter of {service} "
            f"kept changing under concurrent registrations ({ALLOCATE_ATTEMPTS} attempts); retry."
        )
