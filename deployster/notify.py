"""Outgoing notifications: the targets, the wire format of what Deployster sends, and the
signature.

A notification is one POST of a JSON body to a receiver that a person configured, per service
in its policy (``notify``) or for every service (``--notify-url``). Two formats:

``json``
    ``{"event", "service", "deploy": {...} | "task": {...}, "link", "at"}``: for programs.
``slack``
    ``{"text", "blocks"}``, what a Slack incoming webhook takes.

Every request carries ``X-Deployster-Event`` (the event), ``X-Deployster-Delivery`` (one id per
notification, the same on every retry, so that a receiver can de-duplicate) and, when the
target has a secret, ``X-Deployster-Signature-256: sha256=<hex HMAC-SHA256 of the raw body>``
(GitHub's scheme). The signature is computed once, when the notification is queued, so the
secret itself is never stored with a pending delivery.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    SerializationInfo,
    field_serializer,
    field_validator,
)

DEPLOY_EVENTS = ("deploy.started", "deploy.succeeded", "deploy.failed", "deploy.rolled_back")
TASK_EVENTS = ("task.finished",)
EVENTS = DEPLOY_EVENTS + TASK_EVENTS
EventName = Literal[
    "deploy.started", "deploy.succeeded", "deploy.failed", "deploy.rolled_back", "task.finished"
]
#: What a policy shows instead of a secret; sent back unchanged, it keeps the stored secret.
MASK = "***"
#: The context under which a target's secret is written out (to etcd, never to an answer).
REVEAL = {"reveal_secrets": True}
MAX_URL = 2048

SIGNATURE_HEADER = "X-Deployster-Signature-256"
EVENT_HEADER = "X-Deployster-Event"
DELIVERY_HEADER = "X-Deployster-Delivery"


class NotifyTarget(BaseModel):
    """One receiver: where, how signed, which format, which events (all when empty)."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=MAX_URL)
    secret: SecretStr | None = Field(None, max_length=1024)
    format: Literal["json", "slack"] = "json"
    events: list[EventName] = Field(default_factory=list, max_length=len(EVENTS))

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return check_url(value)

    @field_serializer("secret", when_used="always")
    def _secret(self, secret: SecretStr | None, info: SerializationInfo) -> str | None:
        if secret is None:
            return None
        reveal = bool(info.context and info.context.get("reveal_secrets"))
        return secret.get_secret_value() if reveal else MASK

    def wants(self, event: str) -> bool:
        return not self.events or event in self.events

    @property
    def origin(self) -> str:
        """What logs and the API show of the URL: scheme and host only (a Slack webhook's
        path is its secret)."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


def check_url(value: str) -> str:
    """An absolute http or https URL with a host and no credentials, or ValueError."""
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in value):
        raise ValueError("a notification URL must not contain spaces or control characters")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError:
        raise ValueError("the notification URL does not parse") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("a notification URL must be http:// or https:// with a host")
    if parts.username or parts.password:
        raise ValueError("a notification URL must not carry credentials; use the secret")
    return value


def keep_secrets(new: list[NotifyTarget], old: list[NotifyTarget]) -> list[NotifyTarget]:
    """A target sent back with the mask as its secret keeps the secret stored for its URL, so
    that reading a policy and writing it back never loses a secret."""
    stored = {t.url: t.secret for t in old}
    return [
        t.model_copy(update={"secret": stored.get(t.url)})
        if t.secret is not None and t.secret.get_secret_value() == MASK
        else t
        for t in new
    ]


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def headers(event: str, delivery_id: str, body: bytes, secret: str | None) -> dict[str, str]:
    found = {
        "Content-Type": "application/json",
        EVENT_HEADER: event,
        DELIVERY_HEADER: delivery_id,
    }
    if secret:
        found[SIGNATURE_HEADER] = sign(secret, body)
    return found


def render(target_format: str, payload: dict[str, Any]) -> bytes:
    """The body for one format; ``payload`` is the ``json`` format's object."""
    if target_format == "slack":
        payload = slack(payload)
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


_HEADLINES = {
    "deploy.started": "🚀 Deploy of *{service}* {version} started",
    "deploy.succeeded": "✅ *{service}* {version} is live",
    "deploy.failed": "❌ Deploy of *{service}* {version} failed",
    "deploy.rolled_back": "↩️ Deploy of *{service}* {version} rolled back",
    "task.finished": "🏁 Task of *{service}* {version} finished with exit code {exit_code}",
}


def slack(payload: dict[str, Any]) -> dict[str, Any]:
    """A Slack incoming webhook message: ``text`` for notifications and plain clients, and
    the same in blocks with the details as fields."""
    thing = payload.get("deploy") or payload.get("task") or {}
    headline = _HEADLINES[payload["event"]].format(
        service=payload["service"],
        version=thing.get("version", ""),
        exit_code=thing.get("exit_code"),
    )
    details = [
        f"*{label}:* {value}"
        for label, value in (
            ("Reason", thing.get("reason")),
            ("Source", thing.get("source")),
            ("By", thing.get("actor")),
            ("Duration", f"{thing['duration']:.1f} s" if thing.get("duration") else None),
        )
        if value
    ]
    text = headline + ("\n" + "\n".join(details) if details else "") + f"\n<{payload['link']}>"
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": headline}},
    ]
    if details:
        blocks.append(
            {"type": "section", "fields": [{"type": "mrkdwn", "text": d} for d in details]}
        )
    blocks.append(
        {"type": "context", "elements": [{"type": "mrkdwn", "text": f"<{payload['link']}>"}]}
    )
    return {"text": text, "blocks": blocks}


class Delivery(BaseModel):
    """One notification to one receiver, pending in etcd until it is delivered or given up.

    It holds the body and the headers as they will be sent (signature included), never the
    secret."""

    id: str
    event: str
    service: str
    url: str = Field(repr=False)  # may hold a secret path (Slack)
    origin: str
    body: str
    headers: dict[str, str] = Field(repr=False)
    attempts: int = 0
    created_at: float
    next_at: float
    # A server sending it holds it until then (several servers share one etcd).
    claimed_until: float = 0.0
    last_error: str = ""


class DeliveryOutcome(BaseModel):
    """What the API shows of a delivery that ended (or is still being retried)."""

    id: str
    event: str
    service: str
    origin: str
    outcome: Literal["delivered", "retrying", "given_up"]
    attempts: int
    status: int | None = None
    error: str = ""
    at: float
