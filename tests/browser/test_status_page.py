"""The status page in a real browser, against a real Deployster: what runs where, deploys
followed live, failures with their reason, on a phone-sized screen and from the keyboard."""

from __future__ import annotations

import asyncio
import pathlib
import re
import secrets
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from browser.conftest import TIMEZONE, WEBHOOK_SECRET, StatusPage, loopback
from helpers import eventually
from integration.conftest import FAST_POLICY, Api
from playwright.async_api import Dialog, Locator, Page, expect
from webhook_samples import REGISTRY_V1, registry, registry_event

DOCS = pathlib.Path(__file__).parents[2] / "docs"
LIVE = 20_000  # ms: how long the page may take to show what the server knows
PHONE = {"width": 375, "height": 812}


def fact(scope: Locator, term: str) -> Locator:
    """The value of a fact ("Live release", "Latest deploy", ...) in a list of facts."""
    return scope.locator(f'.facts div:has(> dt:text-is("{term}")) > dd')


def section(page: Page, heading: str) -> Locator:
    return page.locator("section").filter(has=page.get_by_role("heading", name=heading, exact=True))


def local_time(iso: str) -> str:
    """The clock time as the page shows it to a viewer in TIMEZONE (en-US)."""
    at = datetime.fromisoformat(iso).astimezone(ZoneInfo(TIMEZONE))
    return at.strftime("%-I:%M:%S %p")


async def fits(page: Page) -> bool:
    """Nothing sticks out sideways: no horizontal scrolling is needed."""
    return bool(
        await page.evaluate(
            "document.documentElement.scrollWidth <= document.documentElement.clientWidth"
        )
    )


async def test_the_overview_shows_each_service_with_its_live_release_and_healthy_instances(
    status_page: StatusPage,
) -> None:
    api, page = status_page.api, status_page.page
    v1 = await api.deployed({"version": "v1", "instance_count": 2})
    assert v1["state"] == "succeeded"
    await status_page.open()
    card = page.locator("section.card").filter(
        has=page.get_by_role("heading", name=api.service, exact=True)
    )
    await expect(fact(card, "Live release")).to_have_text(f"v1 {v1['timestamp']}", timeout=LIVE)
    await expect(fact(card, "Latest deploy")).to_have_text("v1 ✓ succeeded")
    rows = card.locator("tbody tr")
    await expect(rows).to_have_count(2)
    for row in await rows.all():
        await expect(row).to_contain_text("✓ healthy", timeout=LIVE)
        await expect(row).to_contain_text("→ routed")
        await expect(row).to_contain_text("HTTP 200")
    # Each instance's machine is the one fleet placed its unit on.
    resp = await api.client.get(api.url("/units"), headers=api.auth)
    machines = [u["machine_id"] for u in (await resp.json())["units"]]
    for machine in machines:
        await expect(card.locator(f'code[title="{machine}"]')).to_have_count(
            machines.count(machine)
        )
    await expect(page.locator(".summary")).to_have_text(
        "1 service · 0 deploys in flight · 2 of 2 instances healthy"
    )
    await expect(page.locator("#zone")).to_have_text(TIMEZONE)
    await expect(page.locator("#conn")).to_have_text("● live")

    # A phone-sized screen: the rows stack, nothing needs sideways scrolling.
    await page.set_viewport_size(PHONE)
    cells = rows.first.locator("td")
    lefts = {round((await cell.bounding_box() or {"x": -1})["x"]) for cell in await cells.all()}
    assert len(lefts) == 1, f"the cells of a row should stack, not sit side by side: {lefts}"
    assert await fits(page)
    await page.screenshot(path=DOCS / "status-page-phone.png", full_page=True)


async def test_the_service_view_follows_a_deploy_to_succeeded_without_a_reload(
    status_page: StatusPage,
) -> None:
    api, page = status_page.api, status_page.page
    await api.deployed({"version": "v1"})
    await status_page.open()

    # From the keyboard: the service's link, Enter, and focus lands on the new view's heading.
    await page.get_by_role("link", name=api.service, exact=True).focus()
    await page.keyboard.press("Enter")
    await expect(page).to_have_url(re.compile(f"#/services/{api.service}$"))
    await expect(page.get_by_role("heading", level=1)).to_have_text(api.service)
    await expect(page.get_by_role("heading", level=1)).to_be_focused()
    await expect(fact(section(page, "Policy in force"), "Health check")).to_have_text(
        "GET /health every 0.1 s, timeout 1 s"
    )
    await expect(section(page, "Webhook decisions")).to_contain_text(
        f"No push for {api.service} among the last 100 webhook decisions."
    )
    history = section(page, "Deploys").locator("tbody tr")
    await expect(history).to_have_count(1, timeout=LIVE)
    await expect(history.first).to_contain_text("✓ succeeded")
    await page.evaluate("window.notReloaded = true")

    v2 = (await api.deploy({"version": "v2", "destroy_previous": True}))["deploy"]
    await expect(history).to_have_count(2, timeout=LIVE)
    newest = history.first
    await expect(newest).to_contain_text("v2")
    await expect(newest).to_contain_text("✓ succeeded", timeout=LIVE)
    for cell in ("API", "deployster", local_time(v2["created_at"])):
        await expect(newest).to_contain_text(cell)
    await expect(fact(section(page, "Now"), "Live release")).to_contain_text("v2", timeout=LIVE)

    # The deploy view follows a deploy in flight over the events stream: a slow boot keeps it
    # running for a few seconds after the API has answered.
    slow = {"DEPLOYSTER_WORKLOAD_STARTUP_DELAY": "3"}
    v3 = (await api.deploy({"version": "v3", "destroy_previous": True, "env": slow}))["deploy"]
    await status_page.go(f"#/services/{api.service}/deploys/{v3['id']}")
    state = page.locator(".state")
    await expect(state).to_contain_text(re.compile("▶ running|○ pending"))
    await expect(state).to_have_text("✓ succeeded", timeout=LIVE)
    await expect(page.get_by_role("heading", level=1)).to_have_text("Deploy of v3")
    done = await api.record(v3["id"])
    kinds = [e["kind"].replace("_", " ") for e in done["events"]]
    await expect(page.locator(".events .kind")).to_have_text(kinds)
    await expect(page.locator(".failure")).to_be_hidden()
    events_url = f"/v1/services/{api.service}/deploys/{v3['id']}/events"
    assert any(url.endswith(events_url) for url in status_page.requests)
    assert await page.evaluate("window.notReloaded === true")


async def push(api: Api, tag: str) -> dict[str, Any]:
    """A registry's push notification of the service's image with ``tag``; its decision."""
    event = registry_event(
        f"deployster/{api.service}", tag, f"sha256:{secrets.token_hex(32)}", secrets.token_hex(8)
    )
    resp = await api.client.post(
        "/v1/webhooks/registry",
        data=registry(event),
        headers={"Content-Type": REGISTRY_V1, "Authorization": f"Bearer {WEBHOOK_SECRET}"},
    )
    assert resp.status == 202, await resp.text()
    [decision] = (await resp.json())["decisions"]
    return dict(decision)


async def test_a_failed_deploy_shows_its_reason(status_page: StatusPage) -> None:
    api, page = status_page.api, status_page.page
    await api.deployed({"version": "v1", "instance_count": 2})
    # A push of v2 deploys it (the policy takes every tag), one of "latest" is ignored.
    policy = {**FAST_POLICY.model_dump(mode="json"), "auto_deploy": {"enabled": True}}
    resp = await api.client.put(api.url("/policy"), json={"policy": policy}, headers=api.auth)
    assert resp.status == 200
    queued = await push(api, "v2")
    assert queued["decision"] == "queued", queued

    async def pushed_deploy() -> dict[str, Any] | None:
        resp = await api.client.get(api.url("/deploys"), headers=api.auth)
        newest = (await resp.json())["deploys"][0]
        return newest if newest["source"] == "webhook:registry" else None

    pushed = await api.finished((await eventually(pushed_deploy))["id"])
    assert (pushed["version"], pushed["state"]) == ("v2", "succeeded")
    ignored = await push(api, "latest")
    assert ignored["decision"] == "ignored", ignored
    # An unparsable startup delay makes the workload exit at once: the unit fails.
    broken = {"DEPLOYSTER_WORKLOAD_STARTUP_DELAY": "soon"}
    bad = (await api.deploy({"version": "v3", "destroy_previous": True, "env": broken}))["deploy"]
    await status_page.open(f"#/services/{api.service}/deploys/{bad['id']}")
    await expect(page.locator(".state")).to_have_text("↶ rolled back", timeout=LIVE)
    done = await api.finished(bad["id"])
    assert done["state"] == "rolled_back" and done["error"]
    # The reason carries the failed unit's own last log lines (the workload names the variable).
    assert "last log lines" in done["error"], done["error"]
    assert "DEPLOYSTER_WORKLOAD_STARTUP_DELAY" in done["error"], done["error"]
    failure = page.get_by_role("alert").filter(has_text="Why it was rolled back")
    await expect(failure.locator(".reason")).to_have_text(done["error"])
    await expect(failure.locator(".reason")).to_contain_text("DEPLOYSTER_WORKLOAD_STARTUP_DELAY")
    await expect(page.locator(".events li").last).to_contain_text(done["error"])

    # The service keeps its live release; its history says what happened.
    await status_page.go(f"#/services/{api.service}")
    await expect(fact(section(page, "Now"), "Live release")).to_contain_text("v2", timeout=LIVE)
    await expect(fact(section(page, "Now"), "Latest deploy")).to_have_text("v3 ↶ rolled back")
    history = section(page, "Deploys").locator("tbody tr")
    await expect(history).to_have_count(3)
    await expect(history.first).to_contain_text("↶ rolled back")
    await expect(history.first.locator(".why")).to_have_text(done["error"])
    await expect(history.nth(1)).to_contain_text("✓ succeeded")
    await expect(history.nth(1)).to_contain_text("webhook (registry)")
    hooks = section(page, "Webhook decisions").locator("tbody tr")
    resp = await api.client.get("/v1/webhooks/events", headers=api.auth)
    decisions = [e for e in (await resp.json())["events"] if e["service"] == api.service]
    assert [d["decision"] for d in decisions] == ["ignored", "deployed", "queued"], decisions
    await expect(hooks).to_have_count(3)
    for row, decision in zip(await hooks.all(), decisions, strict=True):
        for cell in (decision["tag"], decision["decision"], decision["reason"], "registry"):
            await expect(row).to_contain_text(cell)
    await history.nth(1).get_by_role("link").click()
    await expect(page).to_have_url(re.compile(f"/deploys/{pushed['id']}$"))
    await expect(page.locator(".state")).to_have_text("✓ succeeded")
    await expect(fact(page.locator("main"), "Source")).to_have_text("webhook (registry)")
    await page.go_back()
    await expect(section(page, "Now").locator("tbody tr")).to_have_count(2)
    for row in await section(page, "Now").locator("tbody tr").all():
        await expect(row).to_contain_text("✓ healthy", timeout=LIVE)
    await page.screenshot(path=DOCS / "status-page.png", full_page=True)


async def test_the_page_guard_catches_script_errors(status_page: StatusPage) -> None:
    """The fixture's check is real: an error thrown in the page is recorded (and would fail
    the test); this test then clears it."""
    await status_page.open()
    await expect(status_page.page.locator("#conn")).to_have_text("● live", timeout=LIVE)
    await status_page.page.evaluate("setTimeout(() => { throw new Error('boom'); })")
    await status_page.page.evaluate("console.error('console boom')")
    await eventually(lambda: asyncio.sleep(0, len(status_page.problems) == 2))
    assert "boom" in status_page.problems[0] and "console boom" in status_page.problems[1]
    status_page.problems.clear()


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("http://127.0.0.1:8080/v1/services", True),
        ("http://127.3.4.5/", True),
        ("http://localhost:3000/", True),
        ("http://[::1]:3000/", True),
        ("data:,", True),
        ("https://fonts.googleapis.com/css", False),
        ("http://10.0.0.1/", False),
        ("http://example.invalid/x.js", False),
    ],
)
def test_only_loopback_counts_as_this_machine(url: str, allowed: bool) -> None:
    assert loopback(url) is allowed


async def test_actions_ask_first_and_use_deployctls_requests(status_page: StatusPage) -> None:
    api, page = status_page.api, status_page.page
    v1 = await api.deployed({"version": "v1"})
    await status_page.open(f"#/services/{api.service}")
    history = section(page, "Deploys").locator("tbody tr")
    await expect(history).to_have_count(1, timeout=LIVE)
    questions: list[str] = []
    answer = {"accept": False}

    async def on_dialog(dialog: Dialog) -> None:
        questions.append(dialog.message)
        await (dialog.accept() if answer["accept"] else dialog.dismiss())

    page.on("dialog", on_dialog)
    await page.get_by_text("Actions", exact=True).click()
    await page.get_by_label("Version").fill("v2")
    await page.get_by_label("Version").press("Enter")
    await expect(page.locator(".result")).to_have_text("Cancelled: nothing was sent.")
    assert questions == [f"Deploy v2 of {api.service}, replacing the live release?"]
    assert (
        len((await (await api.client.get(api.url("/deploys"), headers=api.auth)).json())["deploys"])
        == 1
    )

    # Accepted: the deploy is sent as deployctl sends it, and its view follows it.
    answer["accept"] = True
    await page.get_by_role("button", name="Deploy…").click()
    await expect(page).to_have_url(re.compile(f"#/services/{api.service}/deploys/"), timeout=LIVE)
    await expect(page.locator(".state")).to_have_text("✓ succeeded", timeout=LIVE)
    v2 = await api.record(page.url.rsplit("/", 1)[1])
    assert (v2["version"], v2["source"], v2["actor"], v2["destroy_previous"]) == (
        "v2",
        "api",
        "deployster",
        True,
    )

    # Roll back: v1 again, from the service view.
    await status_page.go(f"#/services/{api.service}")
    await page.get_by_text("Actions", exact=True).click()
    await page.get_by_role("button", name="Roll back…").click()
    await expect(page.locator(".state")).to_have_text("✓ succeeded", timeout=LIVE)
    back = await api.record(page.url.rsplit("/", 1)[1])
    assert (back["version"], back["source"]) == ("v1", "rollback")
    assert questions[-1] == f"Roll {api.service} back to the release before the live one?"

    # Destroy the rolled-back-to release's units from its deploy view.
    await page.get_by_text("Actions", exact=True).click()
    await page.get_by_role("button", name="Destroy this release's units…").click()
    await expect(page.locator(".result")).to_have_text(
        f"✓ The units of v1 ({back['timestamp']}) are destroyed."
    )
    assert questions[-1].startswith(f"Destroy the units of {api.service} v1 ({back['timestamp']})")
    assert await api.units() == []
    assert v1["timestamp"] != back["timestamp"]


async def test_the_page_rides_out_a_lost_connection_and_a_refused_events_stream(
    status_page: StatusPage,
) -> None:
    api, page = status_page.api, status_page.page
    await api.deployed({"version": "v1"})
    await status_page.open()
    conn, problem = page.locator("#conn"), page.get_by_role("alert")
    await expect(conn).to_have_text("● live", timeout=LIVE)

    # The browser cannot reach Deployster: the page says so, keeps trying, and recovers.
    await page.route("**/v1/services", lambda route: route.abort("connectionrefused"))
    await expect(conn).to_have_text("✗ cannot reach Deployster; retrying", timeout=LIVE)
    await expect(problem).to_have_text("Could not load: Deployster cannot be reached.")
    await page.unroute("**/v1/services")
    await expect(conn).to_have_text("● live", timeout=LIVE)
    await expect(problem).to_be_hidden()

    # The events stream is refused: the deploy view reads the record instead, to the end.
    await page.route(
        "**/events",
        lambda route: route.fulfill(
            status=503, json={"error": "unavailable", "description": "Blocked by the test."}
        ),
    )
    slow = {"DEPLOYSTER_WORKLOAD_STARTUP_DELAY": "2"}
    v2 = (await api.deploy({"version": "v2", "destroy_previous": True, "env": slow}))["deploy"]
    await status_page.go(f"#/services/{api.service}/deploys/{v2['id']}")
    await expect(page.locator(".stream")).to_have_text(
        "The live stream is unavailable; reading the record every few seconds.", timeout=LIVE
    )
    await expect(page.locator(".state")).to_have_text("✓ succeeded", timeout=LIVE)
    done = await api.record(v2["id"])
    await expect(page.locator(".events li")).to_have_count(len(done["events"]))

    # What the browser logged about the blocked requests, and nothing else.
    expected = ("net::ERR_CONNECTION_REFUSED", "the server responded with a status of 503")
    for sign in expected:
        assert any(sign in p for p in status_page.problems), status_page.problems
    status_page.problems[:] = [
        p for p in status_page.problems if not any(sign in p for sign in expected)
    ]
