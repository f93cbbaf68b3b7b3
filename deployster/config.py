"""Settings: command-line flags > ``DEPLOYSTER_*`` environment variables > defaults.

The flag names and defaults of the original `deployster` are kept (`-listen`, `-cert`, `-key`,
`-username`, `-password`, `-docker-hub-username`, `-registry-url`); the rest is new. The CLI
passes only the flags a user actually gave, so pydantic-settings can let the environment fill
the others.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from deployster.etcd import Endpoint
from deployster.notify import NotifyTarget, check_url
from deployster.units import DEFAULT_DOCKER, DEFAULT_ETCDCTL, DEFAULT_PUBLISH_ADDRESS


def generate_password() -> str:
    """A random password (144 bits) that never starts with '-', which a command line such as
    ``deployctl --password ...`` would take for a flag."""
    while (password := secrets.token_urlsafe(18)).startswith("-"):
        pass
    return password


# A program path a unit file can carry bare: no spaces, quotes, '%' or '$'.
_PROGRAM = r"^[A-Za-z0-9_@+=:,./~-]+$"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DEPLOYSTER_", extra="ignore")

    listen: str = "0.0.0.0:3000"
    cert: Path | None = None
    key: Path | None = None
    username: str = "deployster"
    password: SecretStr | None = None
    docker_hub_username: str = "deployster"
    registry_url: str = ""
    etcd: str = "http://127.0.0.1:2379"
    etcd_prefix: str = "/deployster"
    fleet_endpoint: str = "unix:///var/run/fleet.sock"
    template: str = Field("docker", description="docker, workload, or a unit template file")
    router: Literal["vulcand", "traefik"] = "vulcand"
    vulcand_prefix: str = "vulcand"
    vulcand_settle: float = Field(1.0, ge=0, le=60)
    traefik_root: str = "traefik"
    traefik_api: str = "http://127.0.0.1:8081"
    traefik_entrypoint: str = ""
    reconcile_interval: float = Field(30.0, gt=0, le=3600)
    history: int = Field(10, ge=1, le=1000)
    log_format: str = Field("auto", pattern="^(auto|json|console)$")
    # Webhooks: one secret for every source, or one per source; none turns an endpoint off.
    webhook_secret: SecretStr | None = None
    webhook_secret_dockerhub: SecretStr | None = None
    webhook_secret_registry: SecretStr | None = None
    webhook_secret_harbor: SecretStr | None = None
    webhook_secret_ghcr: SecretStr | None = None
    # Notifications for every service: receivers, their signing secret, and the URL that
    # links in them start with (default: from -listen, https with -cert).
    notify_url: Annotated[list[str], NoDecode] = Field(default_factory=list)
    notify_secret: SecretStr | None = None
    notify_format: Literal["json", "slack"] = "json"
    public_url: str = ""
    docker_endpoint: str = "unix:///var/run/docker.sock"
    # What the docker template's units call, where CoreOS keeps them; a bare name is looked
    # up on the machine's PATH. The address instances publish their port on, unless a
    # service's policy names one.
    docker_cli: str = Field(DEFAULT_DOCKER, pattern=_PROGRAM)
    etcdctl: str = Field(DEFAULT_ETCDCTL, pattern=_PROGRAM)
    publish_address: str = Field(DEFAULT_PUBLISH_ADDRESS, pattern=r"^[0-9]{1,3}(\.[0-9]{1,3}){3}$")
    task_max_timeout: float = Field(600.0, gt=0)
    # Seconds a client has to send a whole request body (408 and the connection closed after).
    body_timeout: float = Field(10.0, ge=0.1, le=300)

    @field_validator("etcd")
    @classmethod
    def _etcd_endpoint(cls, value: str) -> str:
        Endpoint.parse(value)
        return value

    @field_validator("etcd_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        value = "/" + value.strip("/")
        if value == "/":
            raise ValueError("the etcd prefix must not be empty")
        return value

    @field_validator("notify_url", mode="before")
    @classmethod
    def _notify_urls(cls, value: object) -> object:
        # DEPLOYSTER_NOTIFY_URL holds one URL or several separated by spaces or commas.
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if isinstance(value, list):
            for url in value:
                check_url(str(url))
        return value

    @field_validator("cert", "key", mode="before")
    @classmethod
    def _empty_path(cls, value: object) -> object:
        return None if value == "" else value

    @property
    def image_prefix(self) -> str:
        """``-registry-url`` when set, else ``-docker-hub-username`` (as the original)."""
        return self.registry_url.rstrip("/") or self.docker_hub_username

    def webhook_secrets(self, sources: tuple[str, ...]) -> dict[str, str]:
        """The secret of each source that has one: its own, else ``webhook_secret``."""
        found = {}
        for source in sources:
            secret = getattr(self, f"webhook_secret_{source}") or self.webhook_secret
            if secret is not None and secret.get_secret_value():
                found[source] = secret.get_secret_value()
        return found

    def notify_targets(self) -> list[NotifyTarget]:
        """The server's own receivers, for every service and every event."""
        return [
            NotifyTarget(url=url, secret=self.notify_secret, format=self.notify_format)
            for url in self.notify_url
        ]

    @property
    def base_url(self) -> str:
        """Where this server's API is reached, for links in notifications."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host, port = self.listen_host_port
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.cert and self.key else 'http'}://{host}:{port}"

    def secret_values(self) -> list[str]:
        """The value of every secret setting (each ``SecretStr``), for the log masking."""
        values = (getattr(self, name) for name in type(self).model_fields)
        return [v.get_secret_value() for v in values if isinstance(v, SecretStr)]

    @property
    def listen_host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        if not re.fullmatch("[0-9]{1,5}", port) or int(port) > 65535:
            raise ValueError(f"-listen {self.listen!r} is not HOST:PORT")
        return host or "0.0.0.0", int(port)

    def with_password(self) -> tuple[Settings, bool]:
        """These settings with a password; generate one when none was given (True then)."""
        if self.password is not None and self.password.get_secret_value():
            return self, False
        generated = SecretStr(generate_password())
        return self.model_copy(update={"password": generated}), True
