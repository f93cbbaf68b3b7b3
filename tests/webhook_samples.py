"""The providers' sample webhook bodies (``tests/samples/webhooks/``) and their headers.

- ``dockerhub_push.json``: Docker Hub's push payload from its webhooks documentation.
- ``registry_push.json``: a manifest push notification of the Debian docker-registry 2.8.2,
  as captured live (`docs/webhooks.md` §2.7).
- ``harbor_push_artifact.json``: Harbor's ``PUSH_ARTIFACT`` in its default format, from
  Harbor's webhook documentation.
- ``ghcr_package_published.json``: octokit/webhooks' Docker example of a ``package``
  ``published`` event (an untagged version), API URL lists left out.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from deployster.webhooks import github_signature

SAMPLES = Path(__file__).parent / "samples" / "webhooks"
REGISTRY_V1 = "application/vnd.docker.distribution.events.v1+json"
REGISTRY_V2 = "application/vnd.docker.distribution.events.v2+json"

# GitHub's documented test vector ("Validating webhook deliveries").
GITHUB_DOC_SECRET = "It's a Secret to Everybody"
GITHUB_DOC_PAYLOAD = b"Hello, World!"
GITHUB_DOC_SIGNATURE = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"


def sample(name: str) -> dict[str, Any]:
    return dict(json.loads((SAMPLES / f"{name}.json").read_text()))


def sample_bytes(name: str) -> bytes:
    return (SAMPLES / f"{name}.json").read_bytes()


def dockerhub(repo_name: str, tag: str, callback_url: str | None = None) -> bytes:
    body = sample("dockerhub_push")
    namespace, _, name = repo_name.partition("/")
    body["repository"].update(repo_name=repo_name, namespace=namespace, name=name)
    body["push_data"]["tag"] = tag
    if callback_url is not None:
        body["callback_url"] = callback_url
    return json.dumps(body).encode()


def registry_event(
    repository: str,
    tag: str,
    digest: str,
    event_id: str,
    *,
    action: str = "push",
    media_type: str = "application/vnd.oci.image.manifest.v1+json",
) -> dict[str, Any]:
    event = copy.deepcopy(sample("registry_push")["events"][0])
    event.update(id=event_id, action=action)
    event["target"].update(repository=repository, tag=tag, digest=digest, mediaType=media_type)
    if not tag:
        del event["target"]["tag"]
    return dict(event)


def registry(*events: dict[str, Any]) -> bytes:
    return json.dumps({"events": list(events)}).encode()


def harbor(repo_full_name: str, tag: str, digest: str, kind: str = "PUSH_ARTIFACT") -> bytes:
    body = sample("harbor_push_artifact")
    body["type"] = kind
    body["event_data"]["repository"]["repo_full_name"] = repo_full_name
    body["event_data"]["resources"][0].update(tag=tag, digest=digest)
    return json.dumps(body).encode()


def ghcr(owner_name: str, tag: str, digest: str) -> bytes:
    """The octokit sample as a tagged container version of ``owner/name``."""
    body = sample("ghcr_package_published")
    version = body["package"]["package_version"]
    version["container_metadata"]["tag"] = {"name": tag, "digest": digest}
    version["package_url"] = f"ghcr.io/{owner_name}:{tag}"
    body["package"]["package_type"] = "CONTAINER"
    return json.dumps(body).encode()


def ghcr_headers(body: bytes, secret: str, delivery: str, event: str = "package") -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery,
        "User-Agent": "GitHub-Hookshot/abc",
        "X-Hub-Signature-256": github_signature(body, secret),
    }
