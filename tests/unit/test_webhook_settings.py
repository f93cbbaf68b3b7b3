"""Webhook secrets: one for every source, an override per source, flags or environment."""

from __future__ import annotations

import pytest

from deployster.cli import build_parser
from deployster.config import Settings
from deployster.webhooks import SOURCES


def settings_from(argv: list[str]) -> Settings:
    args = vars(build_parser().parse_args(["serve", *argv]))
    args.pop("command")
    return Settings(**args)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("DEPLOYSTER_"):
            monkeypatch.delenv(name)


def test_no_secret_turns_every_webhook_off() -> None:
    assert settings_from([]).webhook_secrets(SOURCES) == {}


@pytest.mark.parametrize("dash", ["-", "--"])
def test_one_secret_for_all_and_overrides_per_source(dash: str) -> None:
    s = settings_from(
        [f"{dash}webhook-secret", "all-of-them", f"{dash}webhook-secret-ghcr", "github-only"]
    )
    assert s.webhook_secrets(SOURCES) == {
        "dockerhub": "all-of-them",
        "registry": "all-of-them",
        "harbor": "all-of-them",
        "ghcr": "github-only",
    }
    assert "all-of-them" not in repr(s) and "github-only" not in repr(s)


def test_secrets_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEPLOYSTER_WEBHOOK_SECRET_REGISTRY", "from-env")
    assert settings_from([]).webhook_secrets(SOURCES) == {"registry": "from-env"}
    assert settings_from(["-webhook-secret-registry", "from-flag"]).webhook_secrets(SOURCES) == {
        "registry": "from-flag"
    }
