"""What routes may use: they publish events and read records, nothing more."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiohttp import web

from deployster.bus import EventBus
from deployster.fleet import FleetClient
from deployster.metrics import Metrics
from deployster.store import Store
from handlers.instances import InstancesHandler
from handlers.notify import Notifier
from handlers.reaper import FleetView
from handlers.tasks import TaskRunner
from handlers.webhooks import WebhookHandler


@dataclass(frozen=True)
class Services:
    bus: EventBus
    fleet: FleetClient
    store: Store
    instances: InstancesHandler  # the live view of announced instances, read-only here
    metrics: Metrics
    fleet_view: FleetView  # fleet's units as last observed, read per service
    # How long the deploy POST waits for fleet to accept the units before answering 202.
    submit_timeout: float = 60.0
    webhooks: WebhookHandler | None = None  # push decisions and the webhook secrets
    tasks: TaskRunner | None = None  # runs one-off tasks; None: this server runs none
    notifier: Notifier | None = None  # sends notifications and lists their deliveries


SERVICES = web.AppKey("services", Services)
#: Set when the server shuts down: long-lived streams end so that shutdown does not wait.
CLOSING = web.AppKey("closing", asyncio.Event)


def services(request: web.Request) -> Services:
    return request.app[SERVICES]
