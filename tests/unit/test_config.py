"""`deployster serve` flags: the original's names and defaults, one dash or two, env vars."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from deployster.cli import build_parser, main
from deployster.config import Settings, generate_password
from deployster.server import StartupError, tls_context


def settings_from(argv: list[str]) -> Settings:
    args = vars(build_parser().parse_args(["serve", *argv]))
    args.pop("command")
    return Settings(**args)


def test_defaults_are_the_originals(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("DEPLOYSTER_"):
            monkeypatch.delenv(name)
    s = settings_from([])
    assert (s.listen, s.username, s.docker_hub_username, s.registry_url) == (
        "0.0.0.0:3000",
        "deployster",
        "deployster",
        "",
    )
    assert s.password is None and s.cert is None and s.key is None
    assert (s.etcd, s.etcd_prefix, s.fleet_endpoint) == (
        "http://127.0.0.1:2379",
        "/deployster",
        "unix:///var/run/fleet.sock",
    )
    assert s.image_prefix == "deployster"


@pytest.mark.parametrize("dash", ["-", "--"])
def test_flags_take_one_dash_or_two(dash: str) -> None:
    s = settings_from(
        [
            f"{dash}listen",
            "127.0.0.1:4000",
            f"{dash}docker-hub-username",
            "acme",
            f"{dash}registry-url",
            "reg.example:5000",
            f"{dash}password",
            "pw",
            f"{dash}etcd-prefix",
            "/x/",
        ]
    )
    assert s.listen == "127.0.0.1:4000"
    assert s.image_prefix == "reg.example:5000"  # the registry replaces the hub user
    assert s.password is not None and s.password.get_secret_value() == "pw"
    assert s.etcd_prefix == "/x"


def test_environment_fills_what_flags_do_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEPLOYSTER_USERNAME", "ops")
    monkeypatch.setenv("DEPLOYSTER_LISTEN", "127.0.0.1:5000")
    s = settings_from(["-listen", "127.0.0.1:6000"])
    assert s.username == "ops"
    assert s.listen == "127.0.0.1:6000"  # the flag wins over the environment


def test_a_generated_password_is_random_and_kept_secret() -> None:
    a, generated = Settings().with_password()
    b, _ = Settings().with_password()
    assert generated and a.password is not None and b.password is not None
    assert a.password.get_secret_value() != b.password.get_secret_value()
    assert len(a.password.get_secret_value()) >= 20
    assert a.password.get_secret_value() not in repr(a)
    given, generated = Settings(password="x").with_password()
    assert not generated and given.password.get_secret_value() == "x"  # type: ignore[union-attr]


def test_tls_needs_both_files(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match="both -cert and -key"):
        tls_context(Settings(cert=tmp_path / "c.pem"))
    with pytest.raises(StartupError, match="does not exist"):
        tls_context(Settings(cert=tmp_path / "c.pem", key=tmp_path / "k.pem"))
    (tmp_path / "c.pem").write_text("not a certificate")
    (tmp_path / "k.pem").write_text("not a key")
    with pytest.raises(StartupError, match="cannot be loaded"):
        tls_context(Settings(cert=tmp_path / "c.pem", key=tmp_path / "k.pem"))
    assert tls_context(Settings()) is None


def test_generated_passwords_never_look_like_a_flag() -> None:
    # One token in 64 starts with '-': in 2,000 draws an unguarded generator shows one.
    passwords = {generate_password() for _ in range(2000)}
    assert len(passwords) == 2000
    assert not any(p.startswith("-") for p in passwords)
    assert all(len(p) == 24 for p in passwords)


def test_the_unit_programs_and_publish_address_default_to_coreos_and_refuse_garbage(
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = Settings()
    assert (settings.docker_cli, settings.etcdctl, settings.publish_address) == (
        "/usr/bin/docker",
        "/usr/bin/etcdctl",
        "0.0.0.0",
    )
    for flag, value in [
        ("--docker-cli", "docker; rm -rf /"),
        ("--etcdctl", "etc ctl"),
        ("--publish-address", "localhost"),
    ]:
        assert main(["serve", flag, value]) == 2
        assert f"deployster: {flag[1:]}: " in capsys.readouterr().err


@pytest.mark.parametrize(
    "listen",
    [":\uff13\uff10\uff10\uff10", "host:²", "host:", "host:123456", "host:99999", "host:-1"],
)
def test_a_listen_port_is_ascii_digits(listen: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        assert Settings(listen=listen).listen_host_port


@pytest.mark.parametrize("seconds", [0, 0.01, 301])
def test_the_body_timeout_is_bounded(seconds: float) -> None:
    with pytest.raises(ValidationError):
        Settings(body_timeout=seconds)
