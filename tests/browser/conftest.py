"""Browser fixtures: Debian's Chromium (scripts/e2e-prereqs installs it) driven by Playwright,
against the integration tier's real Deployster (real etcd, localfleet over HTTP, the workload
template), whose fixtures are reused here.

Every page of a test fails it on a script error, a console error, or a request to anything but
this machine's loopback.
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pytest
from integration.conftest import PASSWORD, Api, localfleet, running_api  # noqa: F401  (a fixture)
from playwright.async_api import Browser, BrowserContext, Page, async_playwright

CHROMIUM = "/usr/bin/chromium"
# The machine has no network: without the background-networking flags Chromium keeps trying
# to reach Google's services.
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# A constant: pytest loads this module as a conftest and the tests import it again.
WEBHOOK_SECRET = "browser-webhook-secret"
#: A time zone far from UTC with a half-hour offset: times shown in UTC would not match it.
TIMEZONE = "Australia/Adelaide"


@pytest.fixture
async def api(aiohttp_client, etcd_endpoint: str, localfleet: str) -> AsyncIterator[Api]:  # type: ignore[no-untyped-def]
    """The integration tier's Deployster, with the webhooks on (one secret for every source)."""
    async with running_api(
        aiohttp_client, etcd_endpoint, localfleet, webhook_secret=WEBHOOK_SECRET
    ) as running:
        yield running


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    """Chromium for the tests of one module (it does not idle through the other tiers)."""
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield launched
        await launched.close()


def loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if urlsplit(url).scheme in ("data", "about", "blob"):
        return True
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class StatusPage:
    """A browser tab on Deployster's status page, and what went wrong in it."""

    page: Page
    base: str  # http://127.0.0.1:<port>
    api: Api
    problems: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    async def open(self, fragment: str = "#/") -> None:
        await self.page.goto(f"{self.base}/{fragment}")

    async def go(self, fragment: str) -> None:
        """Navigate inside the page (a hash change, no reload)."""
        await self.page.evaluate("fragment => { location.hash = fragment; }", fragment)


async def open_context(browser: Browser, **options: object) -> BrowserContext:
    return await browser.new_context(
        http_credentials={"username": "deployster", "password": PASSWORD},
        locale="en-US",
        timezone_id=TIMEZONE,
        **options,  # type: ignore[arg-type]
    )


@pytest.fixture
async def status_page(browser: Browser, api: Api) -> AsyncIterator[StatusPage]:
    context = await open_context(browser, viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    tab = StatusPage(page, str(api.client.make_url("")).rstrip("/"), api)
    page.on("pageerror", lambda exc: tab.problems.append(f"script error: {exc}"))
    page.on(
        "console",
        lambda msg: (
            tab.problems.append(f"console error: {msg.text} at {msg.location}")
            if msg.type == "error"
            else None
        ),
    )
    context.on("request", lambda request: tab.requests.append(request.url))
    try:
        yield tab
    finally:
        await context.close()
    assert not tab.problems, tab.problems
    elsewhere = [url for url in tab.requests if not loopback(url)]
    assert not elsewhere, f"the page reached beyond this machine: {elsewhere}"
