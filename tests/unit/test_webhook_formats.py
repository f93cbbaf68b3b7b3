"""Each provider's payload and authentication (deployster/webhooks.py) on its documented samples."""

from __future__ import annotations

import json
from urllib.parse import urlencode

import pytest
from webhook_samples import (
    GITHUB_DOC_PAYLOAD,
    GITHUB_DOC_SECRET,
    GITHUB_DOC_SIGNATURE,
    REGISTRY_V1,
    REGISTRY_V2,
    ghcr,
    registry,
    registry_event,
    sample,
    sample_bytes,
)

from deployster import webhooks
from deployster.webhooks import (
    MalformedPayloadError,
    UnsupportedMediaTypeError,
    WebhookUnauthorizedError,
)

DIGEST = "sha256:74eb1167a8e8f069f5cbaf2dd58e5e36bdfec1948972826e6f98601622d81069"


# -- Docker Hub ------------------------------------------------------------------------------


def test_dockerhub_sample() -> None:
    delivery = webhooks.parse_dockerhub(sample_bytes("dockerhub_push"), "application/json")
    assert delivery.skipped == []
    [push] = delivery.pushes
    assert (push.source, push.repository, push.tag, push.digest) == (
        "dockerhub",
        "someuser/hello-world",
        "latest",
        "",
    )
    assert push.callback_url.startswith(
        "https://registry.hub.docker.com/u/someuser/hello-world/hook/"
    )
    # Hub sends no event id: the same delivery (a retry) gets the same one, another push another.
    again = webhooks.parse_dockerhub(sample_bytes("dockerhub_push"), "application/json").pushes[0]
    body = sample("dockerhub_push")
    body["push_data"]["pushed_at"] = 1.417566162e09  # older payloads: float timestamps
    later = webhooks.parse_dockerhub(json.dumps(body).encode(), "application/json").pushes[0]
    assert again.event_id == push.event_id != later.event_id


def test_dockerhub_token() -> None:
    webhooks.check_token("s3cret-token", "s3cret-token")
    for wrong in ("s3cret-toke", "s3cret-token2", ""):
        with pytest.raises(WebhookUnauthorizedError) as caught:
            webhooks.check_token(wrong, "s3cret-token")
        assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize(
    "body,where",
    [
        (b"not json", "not valid JSON"),
        (b"[]", "'body'"),
        (json.dumps({"repository": {"repo_name": "a/b"}}).encode(), "'push_data'"),
        (
            json.dumps({"push_data": {"tag": "v1"}, "repository": {}}).encode(),
            "'repository.repo_name'",
        ),
        (
            json.dumps({"push_data": {"tag": 3}, "repository": {"repo_name": "a/b"}}).encode(),
            "'push_data.tag'",
        ),
    ],
)
def test_dockerhub_malformed(body: bytes, where: str) -> None:
    with pytest.raises(MalformedPayloadError, match=where):
        webhooks.parse_dockerhub(body, "application/json")


# -- registry notifications --------------------------------------------------------------------


@pytest.mark.parametrize("content_type", [REGISTRY_V1, REGISTRY_V2, "application/json"])
def test_registry_sample_in_both_envelope_types(content_type: str) -> None:
    delivery = webhooks.parse_registry(sample_bytes("registry_push"), content_type)
    [push] = delivery.pushes
    assert push == webhooks.Push(
        "registry", "acme/hello", "v1", DIGEST, "c0ef71e8-8519-4667-b892-ad2054e42e09"
    )


def test_registry_acts_on_tagged_manifest_pushes_only() -> None:
    body = registry(
        registry_event(
            "acme/hello", "", "sha256:aa", "e1", media_type="application/octet-stream"
        ),  # blob
        registry_event("acme/hello", "", "sha256:bb", "e2", action="pull"),
        registry_event(
            "acme/other",
            "",
            "sha256:cc",
            "e3",
            action="mount",
            media_type="application/octet-stream",
        ),
        registry_event("acme/hello", "v1", "sha256:dd", "e4", action="delete"),
        registry_event("acme/hello", "", "sha256:ee", "e5"),  # a multi-arch child, by digest
        registry_event(
            "acme/hello",
            "v2",
            "sha256:ff",
            "e6",
            media_type="application/vnd.docker.distribution.manifest.v2+json",
        ),
        registry_event(
            "acme/hello",
            "v3",
            "sha256:11",
            "e7",
            media_type="application/vnd.oci.image.index.v1+json",
        ),
        {"action": "push"},  # malformed: skipped, the rest still counts
    )
    delivery = webhooks.parse_registry(body, REGISTRY_V1)
    assert [(p.tag, p.digest, p.event_id) for p in delivery.pushes] == [
        ("v2", "sha256:ff", "e6"),
        ("v3", "sha256:11", "e7"),
    ]
    reasons = {s.event_id: s.reason for s in delivery.skipped}
    assert reasons == {
        "e1": "a push of application/octet-stream, not of an image manifest",
        "e2": "a pull event, not a push",
        "e3": "a mount event, not a push",
        "e4": "a delete event, not a push",
        "e5": "a manifest pushed by digest, without a tag",
        "events[7]": "a malformed event (no id, action or target.repository)",
    }


def test_registry_authorization_takes_bearer_only() -> None:
    webhooks.check_bearer("Bearer s3cret", "s3cret")
    webhooks.check_bearer("bearer  s3cret", "s3cret")
    # The bare secret is refused: the registry's config writes the scheme out.
    for header in (None, "", "Bearer", "Bearer ", "Bearer wrong", "Basic czNjcmV0", "s3cret"):
        with pytest.raises(WebhookUnauthorizedError):
            webhooks.check_bearer(header, "s3cret")


@pytest.mark.parametrize(
    "body,content_type,error",
    [
        (b"{", REGISTRY_V1, MalformedPayloadError),
        (b'{"events": {}}', REGISTRY_V1, MalformedPayloadError),
        (b'{"Events": []}', REGISTRY_V2, MalformedPayloadError),
        (sample_bytes("registry_push"), "text/plain", UnsupportedMediaTypeError),
    ],
)
def test_registry_malformed(body: bytes, content_type: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        webhooks.parse_registry(body, content_type)


# -- Harbor ------------------------------------------------------------------------------------


def test_harbor_sample() -> None:
    delivery = webhooks.parse_harbor(sample_bytes("harbor_push_artifact"), "application/json")
    [push] = delivery.pushes
    assert (push.repository, push.tag) == ("proj/repo", "latest")
    assert push.digest == "sha256:76525f02955aec223342400a080c73024c995c9db1ba2eabf7505cf3bdf3f1f0"
    # No event id in Harbor's default format: a retried delivery gets the same one.
    assert (
        webhooks.parse_harbor(sample_bytes("harbor_push_artifact"), "application/json")
        .pushes[0]
        .event_id
        == push.event_id
    )
    # Harbor sends its "Auth Header" verbatim: "Bearer <secret>" or the bare secret.
    webhooks.check_harbor_auth("Bearer h4rbor", "h4rbor")
    webhooks.check_harbor_auth("h4rbor", "h4rbor")
    for header in (None, "", "  ", "h4rbor!", "Bearer h4rbor!"):
        with pytest.raises(WebhookUnauthorizedError):
            webhooks.check_harbor_auth(header, "h4rbor")


def test_harbor_other_events_and_cloudevents() -> None:
    body = sample("harbor_push_artifact")
    body["type"] = "PULL_ARTIFACT"
    delivery = webhooks.parse_harbor(json.dumps(body).encode(), "application/json")
    assert (
        delivery.pushes == [] and delivery.skipped[0].reason == "a PULL_ARTIFACT event, not a push"
    )
    cloud = {
        "specversion": "1.0",
        "id": "4b1f0c4e",
        "source": "/projects/1/webhook/policies/2",
        "type": "harbor.artifact.pushed",
        "requestid": "r1",
        "operator": "admin",
        "data": sample("harbor_push_artifact")["event_data"],
    }
    [push] = webhooks.parse_harbor(
        json.dumps(cloud).encode(), "application/cloudevents+json"
    ).pushes
    assert (push.repository, push.tag, push.event_id) == ("proj/repo", "latest", "4b1f0c4e/0")
    with pytest.raises(MalformedPayloadError, match="resources"):
        body["type"] = "PUSH_ARTIFACT"
        body["event_data"]["resources"] = []
        webhooks.parse_harbor(json.dumps(body).encode(), "application/json")


# -- GHCR (GitHub package events) ----------------------------------------------------------------


def test_github_signature_matches_githubs_documented_vector() -> None:
    assert webhooks.github_signature(GITHUB_DOC_PAYLOAD, GITHUB_DOC_SECRET) == GITHUB_DOC_SIGNATURE
    webhooks.check_github_signature(GITHUB_DOC_PAYLOAD, GITHUB_DOC_SIGNATURE, GITHUB_DOC_SECRET)
    for header in (
        None,
        "",
        GITHUB_DOC_SIGNATURE[:-1] + "0",
        "sha1=757107ea0eb2509fc211221cce984b8a37570b6d",
    ):
        with pytest.raises(WebhookUnauthorizedError):
            webhooks.check_github_signature(GITHUB_DOC_PAYLOAD, header, GITHUB_DOC_SECRET)
    with pytest.raises(WebhookUnauthorizedError):  # one byte more in the body
        webhooks.check_github_signature(
            GITHUB_DOC_PAYLOAD + b" ", GITHUB_DOC_SIGNATURE, GITHUB_DOC_SECRET
        )


def test_ghcr_sample_without_a_tag_is_skipped() -> None:
    delivery = webhooks.parse_ghcr(
        sample_bytes("ghcr_package_published"), "application/json", "package", "d-1"
    )
    assert delivery.pushes == []
    [skipped] = delivery.skipped
    assert (skipped.event_id, skipped.reason, skipped.repository) == (
        "d-1",
        "a container version without a tag",
        "codertocat/hello-world",
    )


def test_ghcr_tagged_version_and_form_encoding() -> None:
    body = ghcr("Octo-Org/Hello", "v1.2.0", "sha256:6c62")
    [push] = webhooks.parse_ghcr(body, "application/json", "package", "d-2").pushes
    assert push == webhooks.Push("ghcr", "octo-org/hello", "v1.2.0", "sha256:6c62", "d-2")
    form = urlencode({"payload": body.decode()}).encode()
    assert webhooks.parse_ghcr(
        form, "application/x-www-form-urlencoded", "package", "d-2"
    ).pushes == [push]


def test_ghcr_other_events_actions_and_packages() -> None:
    assert (
        webhooks.parse_ghcr(b'{"zen": "Keep it simple."}', "application/json", "ping", "d-3")
        .skipped[0]
        .reason
        == "a ping event, not a package event"
    )
    body = json.loads(ghcr("o/n", "v1", "sha256:1"))
    body["action"] = "deleted"
    assert (
        "not published or updated"
        in webhooks.parse_ghcr(json.dumps(body).encode(), "application/json", "package", "d-4")
        .skipped[0]
        .reason
    )
    body["action"] = "updated"
    body["package"].update(package_type="npm", ecosystem="npm")
    assert (
        webhooks.parse_ghcr(json.dumps(body).encode(), "application/json", "package", "d-5")
        .skipped[0]
        .reason
        == "a npm package, not a container image"
    )
    with pytest.raises(MalformedPayloadError):
        webhooks.parse_ghcr(b'{"action": "published"}', "application/json", "package", "d-6")


# -- repository -> service by the image-name convention ------------------------------------------


@pytest.mark.parametrize(
    "prefix,repository,service",
    [
        ("deployster", "deployster/hello", "hello"),  # Docker Hub user
        ("deployster", "someone/hello", None),
        ("deployster", "deployster/a/b", None),
        ("127.0.0.1:5000", "hello", "hello"),  # -registry-url: the host is not in the repository
        ("127.0.0.1:5000", "acme/hello", None),
        ("registry.example.com/acme", "acme/hello", "hello"),
        ("localhost/team/x", "team/x/hello", "hello"),
    ],
)
def test_service_of_repository(prefix: str, repository: str, service: str | None) -> None:
    from deployster.units import image_name, service_of_repository

    assert service_of_repository(prefix, repository) == service
    if service:  # the inverse of the convention
        assert image_name(prefix, service, "v1").endswith(f"{repository}:v1")


def test_the_dockerhub_token_in_a_logged_path_is_masked() -> None:
    from deployster.logs import mask_secrets

    line = mask_secrets(
        None, "info", {"event": "http_request", "path": "/v1/webhooks/dockerhub/s3cret-token"}
    )
    assert line["path"] == "/v1/webhooks/dockerhub/***"
    assert (
        mask_secrets(None, "info", {"path": "/v1/webhooks/registry"})["path"]
        == "/v1/webhooks/registry"
    )
