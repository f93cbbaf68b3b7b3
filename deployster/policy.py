"""Service policy: how one service is health-checked and rolled out.

Stored in etcd at ``<prefix>/services/<service>/policy`` and read when a deploy starts, so a
change applies to the next deploy. Every field has the server's default (`docs/defaults.md`
says which peer each follows); a policy stored with some fields only takes the defaults for the rest.
Durations are seconds, as numbers. Bounds reject values that are too small to be meant (a
probe every 1e-9 s would spin a CPU) or absurd (a day or more) with a sentence, before
anything is stored; the README's "Security / Limits" lists them.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from deployster.notify import NotifyTarget
from deployster.tagpolicy import TagPolicy

DAY = 86400.0
MIN_PROBE_INTERVAL = 0.1  # seconds between two probes of one instance, at least
MIN_PROBE_TIMEOUT = 0.1
MAX_HEALTH_PATH = 1024  # characters

# A path and query as a URL has them: printable ASCII, no space, no fragment.
_HEALTH_PATH = re.compile(rf"/[!-~]{{0,{MAX_HEALTH_PATH - 1}}}", re.ASCII)


class HealthPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = "/health"
    interval: float = Field(1.0, ge=MIN_PROBE_INTERVAL, le=3600)
    timeout: float = Field(2.0, ge=MIN_PROBE_TIMEOUT, le=3600)
    healthy_threshold: int = Field(2, ge=1, le=100)
    unhealthy_threshold: int = Field(3, ge=1, le=100)

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not _HEALTH_PATH.fullmatch(value) or "#" in value:
            raise ValueError(
                "the health path must start with '/' and hold at most "
                f"{MAX_HEALTH_PATH} printable ASCII characters, without spaces or '#' "
                "(percent-encode others)"
            )
        return value


class AutoDeployPolicy(BaseModel):
    """Which pushed tags deploy the service by themselves (webhooks); off unless enabled."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    # all | major | minor | patch | glob:<pattern> | regexp:<pattern> | exact:<tag>
    policy: str = "all"
    prerelease: bool = False
    # A push replaces the live release, unlike an API deploy (whose default is false).
    destroy_previous: bool = True
    # The image repository whose pushes deploy this service, when it is not the image-name
    # convention's ``<prefix>/<service>`` (e.g. "acme/web" for service "web").
    repository: str | None = Field(
        None, min_length=1, max_length=255, pattern=r"^[a-z0-9][a-z0-9._/-]*$"
    )

    @field_validator("policy")
    @classmethod
    def _policy(cls, value: str) -> str:
        TagPolicy.parse(value)
        return value

    @property
    def tag_policy(self) -> TagPolicy:
        return TagPolicy.parse(self.policy)


class ServicePolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    health: HealthPolicy = Field(default_factory=HealthPolicy)
    min_healthy_time: float = Field(10.0, ge=0, lt=DAY)
    instance_deadline: float = Field(300.0, ge=1, lt=DAY)
    deploy_deadline: float = Field(600.0, ge=1, lt=DAY)
    drain: float = Field(10.0, ge=0, lt=DAY)
    # 0: the original's rule (as many as the running release has, else 1).
    instance_count: int = Field(0, ge=0, le=100)
    auto_deploy: AutoDeployPolicy = Field(default_factory=AutoDeployPolicy)
    # Tasks of this service may not overlap (migrations): a second one is refused with 409.
    exclusive_tasks: bool = False
    # Who hears of this service's deploys and tasks, besides the server's --notify-url.
    notify: list[NotifyTarget] = Field(default_factory=list, max_length=10)
    # The docker template's container: the port the image listens on (the original's 3000),
    # when to pull the image (Kubernetes' names: before every start, only when missing on the
    # machine, or never), and the host address its port is published on; None takes the
    # server's -publish-address (0.0.0.0, where routers on other machines reach it).
    container_port: int = Field(3000, ge=1, le=65535)
    pull_policy: Literal["always", "missing", "never"] = "missing"
    publish_address: str | None = None

    @field_validator("publish_address")
    @classmethod
    def _publish_address(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ipaddress.IPv4Address(value)
            except ValueError:
                raise ValueError(
                    "the publish address must be an IPv4 address, such as 127.0.0.1 or 0.0.0.0"
                ) from None
        return value
