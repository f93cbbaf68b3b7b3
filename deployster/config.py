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
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from deployster.etcd import Endpoint


def generate_password() -> str:
    """A random password (144 bits) that never starts with '-', which a command line such as
    ``deployctl --password ...`` would take for a flag."""
    while (password := secrets.token_urlsafe(18)).startswith("-"):
        pass
    return password


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
    docker_endpoint: str = "unix:///var/run/docker.sock"
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
