"""The Debian ``docker-registry`` of the e2e tier, and images pushed to it with skopeo: from
an OCI layout made with umoci (no container engine), or from podman's storage
(`docs/containers.md` §9).

:func:`start_registry` configures it in a directory of the test's own, on a loopback port,
optionally notifying one endpoint with a Bearer secret. Its log level is ``warn``: at ``info``
the registry prints the endpoint's headers, the secret included, in clear text
(`docs/webhooks.md` §2.1).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import wait_http

from deployster.launchers import free_port

TOOLS = ("docker-registry", "skopeo", "umoci")


def require_tools() -> None:
    """A missing tool fails the test (scripts/e2e-prereqs installs them), never skips it."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.fail(
            f"missing {', '.join(missing)}: run scripts/e2e-prereqs (Debian packages "
            "docker-registry, skopeo, umoci)"
        )


@dataclass
class Registry:
    host: str  # 127.0.0.1:<port>, as image references name it
    process: subprocess.Popen[bytes]
    log: Path

    def push_local(self, local_image: str, repository: str) -> str:
        """Copy ``local_image`` from podman's storage to ``<host>/<repository>``; returns it."""
        destination = f"{self.host}/{repository}"
        _run(
            "skopeo",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            f"containers-storage:{local_image}",
            f"docker://{destination}",
        )
        return destination

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def start_registry(
    workdir: Path, port: int | None = None, notify_url: str | None = None, secret: str = ""
) -> Registry:
    """A registry on ``port`` (default: a free one), notifying ``notify_url`` if given."""
    require_tools()
    workdir.mkdir(parents=True, exist_ok=True)
    host = f"127.0.0.1:{port or free_port()}"
    config: dict[str, object] = {  # YAML is a superset of JSON: no YAML writer needed
        "version": 0.1,
        "log": {"level": "warn", "formatter": "text", "fields": {"service": "registry"}},
        "storage": {
            "filesystem": {"rootdirectory": str(workdir / "reg-data")},
            "delete": {"enabled": True},
            "cache": {"blobdescriptor": "inmemory"},
        },
        "http": {
            "addr": host,
            "secret": "deployster-e2e",
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        },
    }
    if notify_url is not None:
        config["notifications"] = {
            "events": {"includereferences": True},
            "endpoints": [
                {
                    "name": "deployster",
                    "url": notify_url,
                    "headers": {"Authorization": [f"Bearer {secret}"]},
                    "timeout": "2s",
                    "threshold": 5,
                    "backoff": "1s",
                }
            ],
        }
    path = workdir / "registry.yml"
    path.write_text(json.dumps(config, indent=2))
    log = workdir / "registry.log"
    with open(log, "wb") as out:
        child = subprocess.Popen(["docker-registry", "serve", str(path)], stdout=out, stderr=out)
    registry = Registry(host, child, log)
    try:
        wait_http(f"http://{host}/v2/", child, log)
    except BaseException:
        registry.stop()
        raise
    return registry


def build_image(layout: Path, tag: str) -> None:
    """An OCI image ``layout:tag`` with one layer (a file that holds the tag), by umoci."""
    if not layout.exists():
        _run("umoci", "init", "--layout", str(layout))
    _run("umoci", "new", "--image", f"{layout}:{tag}")
    content = layout.parent / f"content-{tag}"
    content.write_text(f"{tag}\n")
    _run("umoci", "insert", "--image", f"{layout}:{tag}", str(content), "/version")


def push(layout: Path, tag: str, registry: Registry, repository: str) -> str:
    """Copy ``layout:tag`` to ``registry/repository:tag`` with skopeo; returns the manifest digest."""
    digest_file = layout.parent / f"digest-{tag}"
    _run(
        "skopeo",
        "copy",
        "--dest-tls-verify=false",
        "--digestfile",
        str(digest_file),
        f"oci:{layout}:{tag}",
        f"docker://{registry.host}/{repository}:{tag}",
    )
    return digest_file.read_text().strip()


def _run(*argv: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited with {result.returncode}: {result.stderr}")
