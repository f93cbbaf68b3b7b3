"""Prometheus metrics of one server, on a registry of its own (``GET /metrics``).

Counters and histograms are fed from the event bus (a deploy that ended says how and how long
it took), so handlers stay free of metric calls; what no event carries (each failed health
probe, the bus's queue depth) is reported by its owner through this object.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from deployster.bus import EventBus
from deployster.events import DeployFailed, DeploySucceeded

CONTENT_TYPE = CONTENT_TYPE_LATEST
DEPLOY_RESULTS = ("succeeded", "failed", "rolled_back")
# A deploy waits for processes to start and health checks to pass: seconds to tens of minutes.
DEPLOY_BUCKETS = (1, 2, 3, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800)


class Metrics:
    def __init__(self, bus: EventBus) -> None:
        self.bus = bus
        self.registry = CollectorRegistry()
        self.deploys = Counter(
            "deployster_deploys",
            "Deploys that ended, by result.",
            ["result"],
            registry=self.registry,
        )
        self.deploy_duration = Histogram(
            "deployster_deploy_duration_seconds",
            "Wall time of deploys that ended, by result.",
            ["result"],
            buckets=DEPLOY_BUCKETS,
            registry=self.registry,
        )
        self.rollbacks = Counter(
            "deployster_rollbacks", "Deploys rolled back by Deployster.", registry=self.registry
        )
        self.probe_failures = Counter(
            "deployster_health_probe_failures",
            "Health probes that failed, by service.",
            ["service"],
            registry=self.registry,
        )
        self.probes = Counter(
            "deployster_health_probes",
            "Health probes this server made, by service (each service is probed by its owner).",
            ["service"],
            registry=self.registry,
        )
        self.owned_services = Gauge(
            "deployster_owned_services",
            "Announced services this server probes and reaps now.",
            registry=self.registry,
        )
        self.members = Gauge(
            "deployster_cluster_members",
            "Live servers this server sees, itself included.",
            registry=self.registry,
        )
        self.webhooks = Counter(
            "deployster_webhooks",
            "Webhook decisions, by source and result "
            "(queued, deployed, ignored, rejected, failed).",
            ["source", "result"],
            registry=self.registry,
        )
        self.tasks = Counter(
            "deployster_tasks",
            "Tasks that ended, by state and exit code "
            "(124: killed at the time limit; none: no exit code).",
            ["state", "exit_code"],
            registry=self.registry,
        )
        self.notifications = Counter(
            "deployster_notifications",
            "Notification attempts, by event and outcome (delivered, retried, given_up).",
            ["event", "outcome"],
            registry=self.registry,
        )
        queue_depth = Gauge(
            "deployster_bus_queue_depth", "Events waiting in the event bus.", registry=self.registry
        )
        queue_depth.set_function(bus.queue_depth)
        for result in DEPLOY_RESULTS:  # every series exists from the start, at 0
            self.deploys.labels(result)
            self.deploy_duration.labels(result)

    def register(self) -> None:
        self.bus.subscribe(DeploySucceeded, self._deploy_ended)
        self.bus.subscribe(DeployFailed, self._deploy_ended)

    async def _deploy_ended(self, event: DeploySucceeded | DeployFailed) -> None:
        result = "succeeded" if isinstance(event, DeploySucceeded) else event.state
        self.deploys.labels(result).inc()
        self.deploy_duration.labels(result).observe(event.duration)
        if result == "rolled_back":
            self.rollbacks.inc()

    def probed(self, service: str, ok: bool) -> None:
        self.probes.labels(service).inc()
        if not ok:
            self.probe_failures.labels(service).inc()

    def ownership(self, owned: Callable[[], int], members: Callable[[], int]) -> None:
        """Read the two ownership gauges from their owners at each scrape."""
        self.owned_services.set_function(owned)
        self.members.set_function(members)

    def webhook_decided(self, source: str, result: str) -> None:
        self.webhooks.labels(source, result).inc()

    def task_ended(self, state: str, exit_code: int | None) -> None:
        self.tasks.labels(state, "none" if exit_code is None else str(exit_code)).inc()

    def notification_sent(self, event: str, outcome: str) -> None:
        self.notifications.labels(event, outcome).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
