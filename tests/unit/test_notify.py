"""Notification targets, bodies and signatures, without the network."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest
from pydantic import ValidationError

from deployster.config import Settings
from deployster.notify import (
    MASK,
    REVEAL,
    NotifyTarget,
    headers,
    keep_secrets,
    render,
    slack,
)
from deployster.policy import ServicePolicy

PAYLOAD = {
    "event": "deploy.rolled_back",
    "service": "web",
    "at": "2026-12-01T00:00:00+00:00",
    "deploy": {
        "id": "d1",
        "version": "v2",
        "reason": "instance web:v2 not healthy",
        "source": "webhook",
        "actor": "registry",
        "duration": 12.25,
    },
    "link": "http://127.0.0.1:3000/v1/services/web/deploys/d1",
}


def test_the_signature_is_githubs_scheme_over_the_exact_body() -> None:
    body = render("json", PAYLOAD)
    found = headers("deploy.rolled_back", "abc", body, "s3cret")
    expected = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert found["X-Deployster-Signature-256"] == f"sha256={expected}"
    assert (found["X-Deployster-Event"], found["X-Deployster-Delivery"]) == (
        "deploy.rolled_back",
        "abc",
    )
    assert "X-Deployster-Signature-256" not in headers("e", "abc", body, None)


def test_the_json_body_is_the_payload() -> None:
    assert json.loads(render("json", PAYLOAD)) == PAYLOAD


def test_slack_text_says_what_happened_with_the_details() -> None:
    message = slack(PAYLOAD)
    assert message["text"].splitlines() == [
        "↩️ Deploy of *web* v2 rolled back",
        "*Reason:* instance web:v2 not healthy",
        "*Source:* webhook",
        "*By:* registry",
        "*Duration:* 12.2 s",
        "<http://127.0.0.1:3000/v1/services/web/deploys/d1>",
    ]
    assert [b["type"] for b in message["blocks"]] == ["section", "section", "context"]
    task = {**PAYLOAD, "event": "task.finished", "task": {"version": "v2", "exit_code": 124}}
    del task["deploy"]
    assert slack(task)["text"].startswith("🏁 Task of *web* v2 finished with exit code 124")


def test_a_secret_is_masked_unless_written_to_etcd() -> None:
    policy = ServicePolicy(notify=[NotifyTarget(url="https://h.example/x", secret="s3cret")])
    assert policy.model_dump(mode="json")["notify"][0]["secret"] == MASK
    assert "s3cret" not in policy.model_dump_json() and "s3cret" not in repr(policy)
    stored = ServicePolicy.model_validate_json(policy.model_dump_json(context=REVEAL))
    assert stored.notify[0].secret is not None
    assert stored.notify[0].secret.get_secret_value() == "s3cret"


def test_a_masked_secret_sent_back_keeps_the_stored_one_for_its_url_only() -> None:
    old = [NotifyTarget(url="https://a.example/", secret="one")]
    new = [
        NotifyTarget(url="https://a.example/", secret=MASK),
        NotifyTarget(url="https://b.example/", secret=MASK),  # no stored secret: none
        NotifyTarget(url="https://c.example/", secret="fresh"),
    ]
    kept = keep_secrets(new, old)
    assert [t.secret.get_secret_value() if t.secret else None for t in kept] == [
        "one",
        None,
        "fresh",
    ]


@pytest.mark.parametrize(
    "url",
    ["ftp://x/", "//x/", "http:///p", "https://u:p@x/", "http://x\n.example/", "http://x:0x/"],
)
def test_bad_receiver_urls_are_refused(url: str) -> None:
    with pytest.raises(ValidationError):
        NotifyTarget(url=url)


def test_events_filter_and_origin() -> None:
    target = NotifyTarget(
        url="https://hooks.example:8443/services/T0/B0/XXXX", events=["deploy.failed"]
    )
    assert target.wants("deploy.failed") and not target.wants("deploy.succeeded")
    assert NotifyTarget(url="http://x/").wants("task.finished")
    assert target.origin == "https://hooks.example:8443"
    with pytest.raises(ValidationError):
        NotifyTarget(url="http://x/", events=["deploy.exploded"])  # type: ignore[list-item]


def test_server_targets_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEPLOYSTER_NOTIFY_URL", "http://a.example/h, https://b.example/h")
    monkeypatch.setenv("DEPLOYSTER_NOTIFY_SECRET", "s")
    targets = Settings().notify_targets()
    assert [t.url for t in targets] == ["http://a.example/h", "https://b.example/h"]
    assert all(t.secret and t.secret.get_secret_value() == "s" for t in targets)
    monkeypatch.setenv("DEPLOYSTER_NOTIFY_URL", "gopher://a.example/")
    with pytest.raises(ValidationError):
        Settings()


def test_links_start_with_the_public_url_or_the_listen_address() -> None:
    assert Settings(listen="0.0.0.0:3000").base_url == "http://127.0.0.1:3000"
    assert Settings(public_url="https://d.example/").base_url == "https://d.example"
