"""HTTP health probes: one probe and a pure threshold state machine (the scheduling of probes
is ``handlers/instances.py``'s).

A probe is one ``GET <url><path>`` with a timeout; any 2xx is healthy. ``HealthTracker`` turns
a stream of probe results into ``became_healthy`` / ``became_unhealthy`` transitions with the
consecutive-success and consecutive-failure thresholds (defaults in `docs/defaults.md`: probe every 1 s,
timeout 2 s, healthy after 2 successes, unhealthy after 3 failures). ``ProbeResult.detail``
is a sentence fragment that deploy rollback reasons quote ("HTTP 503", "connection refused",
"timed out after 2.0 s").

The settings are the service policy's ``HealthPolicy`` (``deployster/policy.py``), where the
defaults and their bounds live.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass

import aiohttp

from deployster.policy import HealthPolicy


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What one probe saw (slots: every probed instance keeps its last one)."""

    ok: bool
    status: int | None  # the HTTP status, None when no response came
    detail: str  # what was seen, as a sentence fragment: "HTTP 503", "connection refused"
    duration: float  # seconds


class HealthState(enum.StrEnum):
    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


class Transition(enum.StrEnum):
    BECAME_HEALTHY = "became_healthy"
    BECAME_UNHEALTHY = "became_unhealthy"


def _seconds(value: float) -> str:
    return f"{float(value)} s"  # 2 -> "2.0 s", 0.25 -> "0.25 s"


def _describe(error: BaseException) -> str:
    if isinstance(error, aiohttp.ClientConnectorError):
        os_error = error.os_error
        if isinstance(os_error, ConnectionRefusedError):
            return "connection refused"
        reason = (os_error.strerror or str(os_error)) if os_error is not None else str(error)
        return f"cannot connect: {reason}"
    if isinstance(error, aiohttp.ServerDisconnectedError):
        return "server closed the connection without answering"
    if isinstance(error, aiohttp.InvalidURL):
        return f"invalid URL {error}"
    return f"request failed: {error or type(error).__name__}"


async def probe(session: aiohttp.ClientSession, url: str, check: HealthPolicy) -> ProbeResult:
    """One GET of ``url + check.path`` within ``check.timeout``; healthy is any 2xx."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    status: int | None = None
    try:
        async with asyncio.timeout(check.timeout):
            async with session.get(url.rstrip("/") + check.path, allow_redirects=False) as resp:
                status = resp.status
                await resp.read()
    except TimeoutError:
        detail = f"timed out after {_seconds(check.timeout)}"
        if status is not None:
            detail = f"HTTP {status}, body {detail}"
        return ProbeResult(ok=False, status=status, detail=detail, duration=loop.time() - started)
    except (aiohttp.ClientError, OSError, ValueError) as error:
        return ProbeResult(
            ok=False, status=status, detail=_describe(error), duration=loop.time() - started
        )
    assert status is not None
    return ProbeResult(
        ok=200 <= status < 300,
        status=status,
        detail=f"HTTP {status}",
        duration=loop.time() - started,
    )


class HealthTracker:
    """Consecutive successes and failures against the thresholds; starts ``unknown``.

    Pure: feed it results with ``observe``; it returns a Transition when the state flips.
    From ``unknown``, ``unhealthy_threshold`` failures give ``became_unhealthy`` (an instance
    that never comes up) and ``healthy_threshold`` successes give ``became_healthy``.
    """

    __slots__ = ("failures", "healthy_threshold", "state", "successes", "unhealthy_threshold")

    def __init__(self, check: HealthPolicy) -> None:
        self.healthy_threshold = check.healthy_threshold
        self.unhealthy_threshold = check.unhealthy_threshold
        self.state = HealthState.UNKNOWN
        self.successes = 0  # consecutive
        self.failures = 0  # consecutive

    @property
    def healthy(self) -> bool:
        return self.state is HealthState.HEALTHY

    def observe(self, result: ProbeResult) -> Transition | None:
        if result.ok:
            self.successes, self.failures = self.successes + 1, 0
            if self.successes >= self.healthy_threshold and self.state is not HealthState.HEALTHY:
                self.state = HealthState.HEALTHY
                return Transition.BECAME_HEALTHY
        else:
            self.successes, self.failures = 0, self.failures + 1
            if (
                self.failures >= self.unhealthy_threshold
                and self.state is not HealthState.UNHEALTHY
            ):
                self.state = HealthState.UNHEALTHY
                return Transition.BECAME_UNHEALTHY
        return None
