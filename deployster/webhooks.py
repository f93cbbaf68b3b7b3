"""Push webhooks: the wire formats of Docker Hub, registry notifications, Harbor and GHCR.

The one place that knows what each provider sends (`docs/webhooks.md`) and how each
proves who it is. Every check of a secret runs in constant time, before the body is read
(GHCR: its signature's form before, the signature itself once the body is read, before parsing),
and never puts the secret or what was given in a message. Each delivery becomes a
:class:`Delivery`: the pushes worth a decision (repository, tag, digest, event id), and the
events that are not pushes of a tag, each with the reason (blob pushes, pulls, mounts,
deletes, untagged manifests, other event types).

| source | path | authentication |
|---|---|---|
| Docker Hub | ``/v1/webhooks/dockerhub/{token}`` | the token in the URL (Hub signs nothing) |
| registry (distribution) | ``/v1/webhooks/registry`` | ``Authorization: Bearer <secret>`` (a static header in its config; the bare secret is refused) |
| Harbor | ``/v1/webhooks/harbor`` | the policy's "Auth Header", sent verbatim as ``Authorization``: ``Bearer <secret>`` or the bare secret |
| GHCR (GitHub ``package`` event) | ``/v1/webhooks/ghcr`` | ``X-Hub-Signature-256``: HMAC-SHA256 of the raw body |
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from deployster.safejson import JsonRefusedError, load_json

SOURCES = ("dockerhub", "registry", "harbor", "ghcr")

REGISTRY_CONTENT_TYPES = (
    "application/vnd.docker.distribution.events.v1+json",  # registry 2.x
    "application/vnd.docker.distribution.events.v2+json",  # registry 3.x
    "application/json",
)
HARBOR_CONTENT_TYPES = ("application/json", "application/cloudevents+json")
GITHUB_CONTENT_TYPES = ("application/json", "application/x-www-form-urlencoded")

# A tagged push of one of these is an image; anything else in a registry event is not.
MANIFEST_TYPES = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
    }
)


class WebhookUnauthorizedError(Exception):
    """The delivery did not prove it knows the secret (401); the message says what was wrong."""


class MalformedPayloadError(Exception):
    """The body is not the provider's format (400); the message says what is wrong."""


class UnsupportedMediaTypeError(Exception):
    """The body's content type is not one the provider sends (415)."""


@dataclass(frozen=True)
class Push:
    """One tagged image push, as every provider's payload is normalised."""

    source: str
    repository: str  # registry path without host or tag: "acme/hello"
    tag: str
    digest: str  # "" when the provider does not say (Docker Hub)
    event_id: str
    callback_url: str = field(default="", repr=False)


@dataclass(frozen=True)
class Skipped:
    """An event of a delivery that is not a tagged image push, and why."""

    source: str
    event_id: str
    reason: str
    repository: str = ""
    tag: str = ""


@dataclass
class Delivery:
    pushes: list[Push] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


# -- authentication ------------------------------------------------------------------------


def _same(given: str | bytes, expected: str | bytes) -> bool:
    """Constant time whatever the lengths: compare digests of equal size."""

    def digest(value: str | bytes) -> bytes:
        return hashlib.sha256(value.encode() if isinstance(value, str) else value).digest()

    return hmac.compare_digest(digest(given), digest(expected))


def check_token(given: str, secret: str) -> None:
    if not _same(given, secret):
        raise WebhookUnauthorizedError("The token in the webhook URL is wrong.")


def check_bearer(header: str | None, secret: str) -> None:
    """``Authorization: Bearer <secret>`` (registry notifications: a static header of the
    endpoint in the registry's config, where the scheme is written out)."""
    scheme, _, given = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise WebhookUnauthorizedError(
            "The Authorization header is missing: send 'Bearer <secret>'."
        )
    if not _same(given.strip(), secret):
        raise WebhookUnauthorizedError("The secret in the Authorization header is wrong.")


def check_harbor_auth(header: str | None, secret: str) -> None:
    """Harbor sends its policy's "Auth Header" verbatim as ``Authorization``: ``Bearer
    <secret>`` or the bare secret."""
    if not header or not header.strip():
        raise WebhookUnauthorizedError(
            "The Authorization header is missing: send 'Bearer <secret>'."
        )
    scheme, _, rest = header.partition(" ")
    given = rest.strip() if scheme.lower() == "bearer" else header.strip()
    if not _same(given, secret):
        raise WebhookUnauthorizedError("The secret in the Authorization header is wrong.")


def github_signature(body: bytes, secret: str) -> str:
    """The ``X-Hub-Signature-256`` value GitHub sends for ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


_GITHUB_SIGNATURE = re.compile(r"sha256=[0-9a-f]{64}")


def github_signature_given(header: str | None) -> None:
    """The signature header is there and has its form (checked before the body is read)."""
    if not header:
        raise WebhookUnauthorizedError(
            "X-Hub-Signature-256 is missing: set the webhook's secret in GitHub."
        )
    if not _GITHUB_SIGNATURE.fullmatch(header.strip()):
        raise WebhookUnauthorizedError("X-Hub-Signature-256 is not 'sha256=' and 64 hex digits.")


def check_github_signature(body: bytes, header: str | None, secret: str) -> None:
    github_signature_given(header)
    assert header is not None
    if not _same(header.strip(), github_signature(body, secret)):
        raise WebhookUnauthorizedError(
            "X-Hub-Signature-256 does not match the body and the secret."
        )


# -- payloads ------------------------------------------------------------------------------


def _json(body: bytes) -> Any:
    try:
        return load_json(body)
    except JsonRefusedError as exc:
        raise MalformedPayloadError(str(exc)) from None


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MalformedPayloadError(f"'{where}' must be a JSON object.")
    return value


def _text(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise MalformedPayloadError(f"'{where}.{key}' is missing or not a string.")
    return value


def _optional_text(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    return value if isinstance(value, str) else ""


def _content_type(content_type: str, allowed: tuple[str, ...]) -> None:
    if content_type not in allowed:
        raise UnsupportedMediaTypeError(
            f"Content-Type {content_type or 'none'} is not one of: {', '.join(allowed)}."
        )


def _synthetic_id(*parts: object) -> str:
    """For providers that send no event id: the same delivery always gets the same id."""
    return hashlib.sha256("\0".join(str(p) for p in parts).encode()).hexdigest()[:32]


def parse_dockerhub(body: bytes, content_type: str) -> Delivery:
    """Docker Hub's push payload (§1): ``repository.repo_name``, ``push_data.tag``."""
    _content_type(content_type, ("application/json",))
    data = _object(_json(body), "body")
    push_data = _object(data.get("push_data"), "push_data")
    repository = _object(data.get("repository"), "repository")
    repo_name = _text(repository, "repo_name", "repository")
    tag = _text(push_data, "tag", "push_data")
    pushed_at = push_data.get("pushed_at", "")  # an int, or a float in older payloads
    callback = _optional_text(data, "callback_url")
    return Delivery(
        pushes=[
            Push(
                "dockerhub", repo_name, tag, "", _synthetic_id(repo_name, tag, pushed_at), callback
            )
        ]
    )


def parse_registry(body: bytes, content_type: str) -> Delivery:
    """A registry notification envelope (§2): act on tagged manifest pushes only."""
    _content_type(content_type, REGISTRY_CONTENT_TYPES)
    data = _object(_json(body), "body")
    events = data.get("events")
    if not isinstance(events, list):
        raise MalformedPayloadError("'events' must be a list (a registry notification envelope).")
    delivery = Delivery()
    for index, raw in enumerate(events):
        # The registry retries a delivery forever while it is not answered 2xx and holds back
        # every later event: one odd event is skipped with its reason, not refused.
        event = raw if isinstance(raw, dict) else {}
        event_id = _optional_text(event, "id") or f"events[{index}]"
        action = _optional_text(event, "action")
        raw_target = event.get("target")
        target: dict[str, Any] = raw_target if isinstance(raw_target, dict) else {}
        repository, tag = _optional_text(target, "repository"), _optional_text(target, "tag")
        media_type, digest = _optional_text(target, "mediaType"), _optional_text(target, "digest")

        if not _optional_text(event, "id") or not action or not repository:
            skip = "a malformed event (no id, action or target.repository)"
        elif action != "push":
            skip = f"a {action} event, not a push"
        elif media_type not in MANIFEST_TYPES:
            skip = f"a push of {media_type or 'an unknown media type'}, not of an image manifest"
        elif not tag:
            skip = "a manifest pushed by digest, without a tag"
        else:
            delivery.pushes.append(Push("registry", repository, tag, digest, event_id))
            continue
        delivery.skipped.append(Skipped("registry", event_id, skip, repository, tag))
    return delivery


def parse_harbor(body: bytes, content_type: str) -> Delivery:
    """Harbor's ``PUSH_ARTIFACT`` (default format) or ``harbor.artifact.pushed`` (CloudEvents)."""
    _content_type(content_type, HARBOR_CONTENT_TYPES)
    data = _object(_json(body), "body")
    if "specversion" in data:  # CloudEvents, structured mode
        kind, payload = _text(data, "type", "body"), data.get("data")
        event_id = _text(data, "id", "body")
        wanted = kind == "harbor.artifact.pushed"
    else:
        kind, payload = _text(data, "type", "body"), data.get("event_data")
        event_id = ""
        wanted = kind == "PUSH_ARTIFACT"
    if not wanted:
        return Delivery(
            skipped=[
                Skipped("harbor", event_id or _synthetic_id(body), f"a {kind} event, not a push")
            ]
        )
    payload = _object(payload, "event_data")
    repository = _text(
        _object(payload.get("repository"), "event_data.repository"),
        "repo_full_name",
        "event_data.repository",
    )
    resources = payload.get("resources")
    if not isinstance(resources, list) or not resources:
        raise MalformedPayloadError("'event_data.resources' must be a non-empty list.")
    delivery = Delivery()
    for index, raw in enumerate(resources):
        resource = _object(raw, f"event_data.resources[{index}]")
        tag, digest = _optional_text(resource, "tag"), _optional_text(resource, "digest")
        # The default format has no event id: the same delivery (retried) gives the same one.
        rid = (
            f"{event_id}/{index}"
            if event_id
            else _synthetic_id(kind, data.get("occur_at"), repository, digest, tag)
        )
        if tag:
            delivery.pushes.append(Push("harbor", repository, tag, digest, rid))
        else:
            delivery.skipped.append(
                Skipped("harbor", rid, "an artifact pushed without a tag", repository)
            )
    return delivery


def parse_ghcr(
    body: bytes, content_type: str, event: str | None, delivery_id: str | None
) -> Delivery:
    """GitHub's ``package`` (or legacy ``registry_package``) event for a container (§4)."""
    _content_type(content_type, GITHUB_CONTENT_TYPES)
    if content_type == "application/x-www-form-urlencoded":
        form = parse_qs(body.decode(errors="replace"))
        body = (form.get("payload") or [""])[0].encode()
    data = _object(_json(body), "body")
    event_id = delivery_id or ""
    if event not in ("package", "registry_package"):
        return Delivery(
            skipped=[
                Skipped(
                    "ghcr",
                    event_id or _synthetic_id(body),
                    f"a {event or 'unnamed'} event, not a package event",
                )
            ]
        )
    package = _object(data.get("package", data.get("registry_package")), "package")
    action = _optional_text(data, "action")
    version = _object(package.get("package_version"), "package.package_version")
    raw_metadata = version.get("container_metadata")
    metadata: dict[str, Any] = raw_metadata if isinstance(raw_metadata, dict) else {}
    raw_tag = metadata.get("tag")
    tag_info: dict[str, Any] = raw_tag if isinstance(raw_tag, dict) else {}
    tag, digest = _optional_text(tag_info, "name"), _optional_text(tag_info, "digest")
    repository = _ghcr_repository(package, version)
    event_id = event_id or f"package-version-{version.get('id', _synthetic_id(body))}"
    kinds = {
        _optional_text(package, "package_type").lower(),
        _optional_text(package, "ecosystem").lower(),
    }

    def skip(reason: str) -> Delivery:
        return Delivery(skipped=[Skipped("ghcr", event_id, reason, repository, tag)])

    if action not in ("published", "updated"):
        return skip(f"a package {action or 'unnamed'} action, not published or updated")
    if not kinds & {"container", "docker"}:
        return skip(
            f"a {_optional_text(package, 'package_type') or 'unknown'} package, not a container image"
        )
    if not tag:
        return skip("a container version without a tag")
    return Delivery(pushes=[Push("ghcr", repository, tag, digest, event_id)])


def _ghcr_repository(package: dict[str, Any], version: dict[str, Any]) -> str:
    """``owner/name`` in lower case, as image references are; from ``package_url``
    (``ghcr.io/<owner>/<name>:<tag>``) when present."""
    url = _optional_text(version, "package_url")
    if "/" in url:
        head, _, last = url.split("/", 1)[1].split("@", 1)[0].rpartition("/")
        return f"{head}/{last.split(':', 1)[0]}".strip("/").lower()
    owner = _optional_text(package, "namespace") or _optional_text(
        _object(package.get("owner", {}), "package.owner"), "login"
    )
    return f"{owner}/{_text(package, 'name', 'package')}".lower()
