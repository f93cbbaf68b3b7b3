"""``deployster serve``: wire the parts together, run until SIGTERM/SIGINT, stop cleanly.

Start-up refuses to run half-configured: a missing or unreadable TLS certificate or key, a
unit template that does not render, or an etcd that never answers is an error with a
sentence, never a silent fallback (the original served plain HTTP when its key pair failed).
"""

from __future__ import annotations

import asyncio
import signal
import ssl
import time

import aetcd
import structlog
from aiohttp import web

from deployster import __version__, logs
from deployster import etcd as etcd_adapter
from deployster.bus import EventBus
from deployster.config import Settings
from deployster.docker import DockerClient, parse_endpoint
from deployster.fleet import FleetClient
from deployster.logs import AccessLogger
from deployster.membership import Membership
from deployster.metrics import Metrics
from deployster.routers import Router, TraefikRouter, VulcandRouter
from deployster.store import NotificationStore, Store, TaskStore
from deployster.units import TemplateError, UnitTemplate, load_template
from deployster.web.app import ApiRunner, create_app
from deployster.web.context import Services
from deployster.webhooks import SOURCES as WEBHOOK_SOURCES
from handlers.deploys import DeployConfig, DeployHandler
from handlers.instances import InstancesHandler
from handlers.notify import Notifier
from handlers.owners import MEMBER_TTL, Owners
from handlers.reaper import FleetView, Reaper
from handlers.tasks import TaskConfig, TaskRunner
from handlers.webhooks import WebhookHandler

log = structlog.get_logger(__name__)


class StartupError(Exception):
    """The server cannot start as configured; the message says what to change."""


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    if not settings.cert and not settings.key:
        return None
    if not (settings.cert and settings.key):
        raise StartupError("HTTPS needs both -cert and -key; only one was given.")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(settings.cert, settings.key)
    except FileNotFoundError as exc:
        raise StartupError(
            f"Cannot read the TLS certificate or key: {exc.filename} does not exist."
        ) from None
    except (ssl.SSLError, OSError) as exc:
        raise StartupError(
            f"The TLS certificate {settings.cert} and key {settings.key} cannot be loaded: {exc}."
        ) from None
    return context


def router_for(settings: Settings, etcd: aetcd.Client) -> Router:
    if settings.router == "traefik":
        return TraefikRouter(
            etcd,
            root_key=settings.traefik_root,
            api_url=settings.traefik_api,
            entrypoint=settings.traefik_entrypoint or None,
            bookkeeping_prefix=f"{settings.etcd_prefix}/routers/traefik",
        )
    return VulcandRouter(etcd, prefix=settings.vulcand_prefix, settle=settings.vulcand_settle)


async def connect_etcd(endpoints: str, wait: float = 10.0) -> aetcd.Client:
    client = etcd_adapter.client(endpoints)
    deadline = time.monotonic() + wait
    while True:
        try:
            await client.status()
            return client
        except aetcd.ClientError as exc:
            if time.monotonic() > deadline:
                await client.close()
                raise StartupError(
                    f"etcd at {endpoints} did not answer within {wait:.0f} s: {exc}"
                ) from None
            await asyncio.sleep(0.5)


class Deployster:
    """The wired parts of one server: etcd, fleet, router, bus, store, handlers and the app."""

    def __init__(
        self,
        settings: Settings,
        etcd: aetcd.Client,
        fleet: FleetClient,
        template: UnitTemplate,
        deploy_config: DeployConfig | None = None,
    ) -> None:
        logs.register_secret(*settings.secret_values())
        password = settings.password.get_secret_value() if settings.password else ""
        if not password:
            raise StartupError("A password is required.")
        self.settings = settings
        self.etcd = etcd
        self.fleet = fleet
        self.bus = EventBus()
        self.metrics = Metrics(self.bus)
        self.metrics.register()
        self.store = Store(etcd, settings.etcd_prefix)
        self.router = router_for(settings, etcd)
        # Servers sharing etcd split the services: each is probed and reaped by one of them.
        self.membership = Membership(etcd, settings.etcd_prefix, ttl=MEMBER_TTL)
        self.owners = Owners(self.membership, etcd, self.store.locks.base)
        # fleet's units as last observed: the reaper's pass refreshes it, deploys update it.
        self.fleet_view = FleetView()
        self.instances = InstancesHandler(
            self.bus,
            etcd=etcd,
            store=self.store,
            router=self.router,
            prefix=settings.etcd_prefix,
            metrics=self.metrics,
            owners=self.owners,
        )
        self.metrics.ownership(self.instances.owned_services, lambda: len(self.membership.members))
        self.deploys = DeployHandler(
            self.bus,
            fleet=fleet,
            view=self.fleet_view,
            store=self.store,
            template=template,
            config=deploy_config
            or DeployConfig(
                image_prefix=settings.image_prefix,
                etcd_endpoints=settings.etcd,
                etcd_prefix=settings.etcd_prefix,
                docker=settings.docker_cli,
                etcdctl=settings.etcdctl,
                publish_address=settings.publish_address,
            ),
            router=self.router,
            instances=self.instances,
        )
        self.deploys.register()
        self.reaper = Reaper(
            self.bus,
            fleet=fleet,
            view=self.fleet_view,
            store=self.store,
            router=self.router,
            prefix=settings.etcd_prefix,
            interval=settings.reconcile_interval,
            keep=settings.history,
            owns=self.owners.owns,
        )
        self.reaper.register()
        self.webhooks = WebhookHandler(
            self.bus,
            store=self.store,
            image_prefix=settings.image_prefix,
            secrets=settings.webhook_secrets(WEBHOOK_SOURCES),
            metrics=self.metrics,
        )
        self.webhooks.register()
        task_store = TaskStore(etcd, settings.etcd_prefix)
        self.tasks = TaskRunner(
            DockerClient(settings.docker_endpoint),
            store=task_store,
            policies=self.store,
            config=TaskConfig(
                image_prefix=settings.image_prefix,
                etcd_prefix=settings.etcd_prefix,
                max_timeout=settings.task_max_timeout,
            ),
            metrics=self.metrics,
            bus=self.bus,
        )
        self.notifier = Notifier(
            self.bus,
            self.store,
            task_store,
            NotificationStore(etcd, settings.etcd_prefix),
            settings.notify_targets(),
            base_url=settings.base_url,
            metrics=self.metrics,
        )
        self.notifier.register()
        services = Services(
            bus=self.bus,
            fleet=fleet,
            store=self.store,
            instances=self.instances,
            metrics=self.metrics,
            fleet_view=self.fleet_view,
            webhooks=self.webhooks,
            tasks=self.tasks,
            notifier=self.notifier,
        )
        self.app = create_app(
            services, settings.username, password, body_timeout=settings.body_timeout
        )
        self.app.on_shutdown.append(self._end_task_streams)

    async def _end_task_streams(self, _: web.Application) -> None:
        """At shutdown, before aiohttp waits for open answers: task streams end now (aiohttp
        would wait 60 s for them); the tasks run on, for the next start to adopt."""
        await self.tasks.close()

    @classmethod
    async def connect(
        cls, settings: Settings, deploy_config: DeployConfig | None = None
    ) -> Deployster:
        """Check the configuration, then reach etcd; raises StartupError with a sentence."""
        try:
            template = load_template(settings.template)
        except TemplateError as exc:
            raise StartupError(str(exc)) from None
        try:
            fleet = FleetClient(settings.fleet_endpoint)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        try:
            parse_endpoint(settings.docker_endpoint)
        except ValueError as exc:
            await fleet.close()
            raise StartupError(str(exc)) from None
        try:
            etcd = await connect_etcd(settings.etcd)
        except StartupError:
            await fleet.close()
            raise
        return cls(settings, etcd, fleet, template, deploy_config)

    async def start(self) -> int:
        """Join the servers, follow the instances, adopt the task containers a previous run
        left, and resume unfinished deploys; returns how many deploys resumed."""
        # Read the members and the deploy locks, probe this server's share, then join:
        # peers hand over the services that move here only once this server probes them.
        await self.membership.start()
        await self.owners.start()
        await self.instances.start()
        self.membership.join()
        await self.reaper.start()
        await self.tasks.start()
        await self.notifier.start()
        resumed = await self.deploys.resume()
        if self.webhooks.enabled:
            log.info(
                "webhooks_on",
                sources=self.webhooks.enabled,
                callbacks_answered=await self.webhooks.start(),
            )
        else:
            log.warning(
                "webhooks_off",
                reason="no --webhook-secret is set: the webhook endpoints answer 404",
            )
        return resumed

    async def close(self) -> None:
        """Stop every part; a part that does not stop within 10 s is logged and left behind,
        so a shutdown never hangs."""
        for name, part in (
            ("tasks", self.tasks),
            ("notifications", self.notifier),
            ("bus", self.bus),
            ("webhooks", self.webhooks),
            ("membership", self.membership),  # peers take this server's services now
            ("owners", self.owners),
            ("reaper", self.reaper),
            ("deploys", self.deploys),
            ("instances", self.instances),
            ("fleet", self.fleet),
            ("etcd", self.etcd),
        ):
            try:
                async with asyncio.timeout(10):
                    await part.close()
            except TimeoutError:
                log.warning("shutdown_step_timed_out", part=name)


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Run the server until ``stop`` is set (or SIGTERM/SIGINT arrives)."""
    ssl_context = tls_context(settings)
    deployster = await Deployster.connect(settings)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = ApiRunner(deployster.app, access_log_class=AccessLogger, handle_signals=False)
    await runner.setup()
    host, port = settings.listen_host_port
    try:
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(f"Cannot listen on {settings.listen}: {exc.strerror}.") from None
        resumed = await deployster.start()
        scheme = "https" if ssl_context else "http"
        log.info(
            "server_started",
            url=f"{scheme}://{settings.listen}",
            version=__version__,
            fleet=settings.fleet_endpoint,
            etcd=settings.etcd,
            template=settings.template,
            resumed_deploys=resumed,
        )
        await stop.wait()
        log.info("server_stopping")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await runner.cleanup()
        await deployster.close()
    log.info("server_stopped")
