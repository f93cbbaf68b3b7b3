"""The status page's routes over HTTP: behind basic auth, only the page's own files, a
same-origin Content-Security-Policy, and every file the page names is served
(tests/browser has the page itself in a real browser)."""

from __future__ import annotations

import re

import pytest
from integration.conftest import Api, basic_auth

from deployster.web.page import FILES


async def test_the_page_needs_credentials_and_the_browser_prompts_for_them(api: Api) -> None:
    for path in ("/", "/static/app.js"):
        resp = await api.client.get(path)
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Basic realm="Deployster"'
        assert (await resp.json())["error"] == "unauthorized"
    wrong = await api.client.get("/", headers=basic_auth("deployster", "guess"))
    assert wrong.status == 401


async def test_the_page_and_every_file_it_names_are_served_same_origin_only(api: Api) -> None:
    resp = await api.client.get("/", headers=api.auth)
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
    csp = resp.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert "script-src 'self'" in csp and "http" not in csp
    html = await resp.text()
    named = set(re.findall(r'(?:src|href)="(/static/[^"]+)"', html))
    assert named == {f"/static/{name}" for name in FILES}
    # Nothing is fetched from elsewhere: every address in the page is this origin's.
    assert not re.search(r'(?:src|href)="(?:https?:)?//', html)
    for path in named:
        served = await api.client.get(path, headers=api.auth)
        assert served.status == 200, path
        assert served.headers["Content-Type"] == FILES[path.removeprefix("/static/")]
        assert served.headers["X-Content-Type-Options"] == "nosniff"
        assert "http://" not in await served.text() and "https://" not in await served.text()


@pytest.mark.parametrize(
    "path",
    [
        "/static/index.html",  # served at / only
        "/static/page.py",
        "/static/..%2Fpage.py",
        "/static/%2e%2e%2fapp.py",
        "/static/app.js%00",
        "/static/APP.JS",
        "/static/",
        "/static",
        "/index.html",
    ],
)
async def test_nothing_but_the_pages_files_is_served(api: Api, path: str) -> None:
    resp = await api.client.get(path, headers=api.auth)
    assert resp.status == 404, path
    body = await resp.json()
    assert body["error"] == "not_found" and body["description"]


async def test_the_page_is_read_only(api: Api) -> None:
    resp = await api.client.post("/", headers=api.auth, data=b"x")
    assert resp.status == 405
    assert (await resp.json())["error"] == "method_not_allowed"


async def test_services_name_each_instances_machine(api: Api) -> None:
    """The page's overview shows each instance's machine: /v1/services says which."""
    await api.deployed({"version": "v1", "instance_count": 2})
    units = await api.client.get(api.url("/units"), headers=api.auth)
    placed = {
        f"{api.service}:v1:{u['deploy_timestamp']}@{u['instance']}.service": u["machine_id"]
        for u in (await units.json())["units"]
    }

    resp = await api.client.get("/v1/services", headers=api.auth)
    [service] = [s for s in (await resp.json())["services"] if s["name"] == api.service]
    assert {i["unit"]: i["machine"] for i in service["instances"]} == placed
