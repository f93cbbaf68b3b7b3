"""cloud-config.yml: the YAML parses, every embedded unit and drop-in passes a strict
``systemd-analyze verify``, Deployster's unit passes only flags that ``deployster serve``
has, and no credential is written as a literal.

``systemd-analyze verify`` runs with ``--root`` on a throwaway tree: systemd's own units
copied from this machine, stubs for the units CoreOS ships (so a dependency on a unit that
exists nowhere still fails), the embedded units, and an executable stub for every program
their Exec lines name (docker does not exist here). verify exits 0 even when it ignores an
unknown key or an unparsable value, so any output at all counts as a failure.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployster.config import Settings

CLOUD_CONFIG = Path(__file__).resolve().parents[2] / "cloud-config.yml"
SYSTEMD_UNITS = Path("/usr/lib/systemd/system")
# Units a Container Linux node ships; the cloud-config starts or extends them.
COREOS_UNITS = {
    "docker.service": "[Service]\nExecStart=/usr/bin/dockerd\n",
    "etcd-member.service": "[Service]\nExecStart=/usr/lib/coreos/etcd-wrapper\n",
    "fleet.service": "[Service]\nExecStart=/usr/bin/fleetd\n",
    "fleet.socket": "[Socket]\nListenStream=/var/run/fleet.sock\n",
}
EXEC_KEYS = ("ExecStartPre", "ExecStart", "ExecStartPost", "ExecStop", "ExecStopPost", "ExecReload")


@dataclass
class UnitFile:
    """A systemd unit's text as lines joined and keys collected per section, in order."""

    sections: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> UnitFile:
        unit = cls()
        section = ""
        for line in text.replace("\\\n", " ").splitlines():
            line = line.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = line.strip("[]")
                unit.sections.setdefault(section, [])
                continue
            key, _, value = line.partition("=")
            unit.sections[section].append((key.strip(), value.strip()))
        return unit

    def values(self, section: str, key: str) -> list[str]:
        return [v for k, v in self.sections.get(section, []) if k == key]


def load() -> dict[str, Any]:
    data = yaml.safe_load(CLOUD_CONFIG.read_text())
    assert isinstance(data, dict)
    return data


def units(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {unit["name"]: unit for unit in config["coreos"]["units"]}


def exec_programs(text: str) -> set[str]:
    """The absolute paths of the programs the Exec lines of a unit or drop-in run."""
    unit = UnitFile.parse(text)
    found = set()
    for key in EXEC_KEYS:
        for value in unit.values("Service", key):
            if value:
                found.add(shlex.split(value.lstrip("-@:+!"))[0])
    return found


def verify(config: dict[str, Any], root: Path) -> str:
    """``systemd-analyze verify`` of every embedded unit and drop-in; its output (empty when
    all is well) with the exit status when that is not 0."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail(
            "systemd-analyze not found; run scripts/e2e-prereqs (Debian's systemd)", pytrace=False
        )
    system = root / "etc/systemd/system"
    system.mkdir(parents=True)
    shutil.copytree(SYSTEMD_UNITS, root / SYSTEMD_UNITS.relative_to("/"), symlinks=True)
    texts = []
    for name, text in COREOS_UNITS.items():
        (system / name).write_text(f"[Unit]\nDescription=stub of CoreOS's {name}\n{text}")
        texts.append(text)
    names = []
    for name, unit in units(config).items():
        if "content" in unit:
            (system / name).write_text(unit["content"])
            texts.append(unit["content"])
        for dropin in unit.get("drop-ins", []):
            (system / f"{name}.d").mkdir(exist_ok=True)
            (system / f"{name}.d" / dropin["name"]).write_text(dropin["content"])
            texts.append(dropin["content"])
        if "content" in unit or "drop-ins" in unit:
            names.append(name)
    for program in set().union(*map(exec_programs, texts)):
        stub = root / program.lstrip("/")
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\n")
        stub.chmod(0o755)
    done = subprocess.run(
        [analyze, "verify", f"--root={root}", "--man=no", "--generators=no", *names],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = (done.stdout + done.stderr).strip()
    return output if done.returncode == 0 else f"exit status {done.returncode}\n{output}"


def test_the_yaml_parses_as_a_cloud_config() -> None:
    assert CLOUD_CONFIG.read_text().startswith("#cloud-config\n")
    config = load()
    assert set(units(config)) >= {
        "etcd-member.service",
        "fleet.service",
        "traefik.service",
        "vulcand.service",
        "deployster.service",
    }
    started = {name for name, unit in units(config).items() if unit.get("command") == "start"}
    assert started == {
        "etcd-member.service",
        "fleet.socket",
        "fleet.service",
        "traefik.service",
        "deployster.service",
    }


def test_every_embedded_unit_is_valid_systemd(tmp_path: Path) -> None:
    assert verify(load(), tmp_path) == ""


def _corrupt(
    config: dict[str, Any], name: str, old: str, new: str, dropin: bool = False
) -> dict[str, Any]:
    unit = units(config)[name]
    holder = unit["drop-ins"][0] if dropin else unit
    assert old in holder["content"]
    holder["content"] = holder["content"].replace(old, new, 1)
    return config


@pytest.mark.parametrize(
    "name,old,new,dropin,expected",
    [
        ("deployster.service", "ExecStart=", "ExecStrat=", False, "Unknown key 'ExecStrat'"),
        ("deployster.service", "Restart=always", "Restart=sometimes", False, "restart specifier"),
        ("traefik.service", "[Install]", "[Instal]", False, "Unknown section 'Instal'"),
        (
            "traefik.service",
            "Requires=docker.service",
            "Requires=dokcer.service",
            False,
            "dokcer.service",
        ),
        (
            "etcd-member.service",
            "Environment=ETCD_NAME=%m",
            "Enviroment=ETCD_NAME=%m",
            True,
            "Unknown key 'Enviroment'",
        ),
        (
            "deployster.service",
            "TimeoutStartSec=0",
            "TimeoutStartSec=soon",
            False,
            "TimeoutStartSec",
        ),
    ],
)
def test_a_broken_unit_fails_the_check(
    tmp_path: Path, name: str, old: str, new: str, dropin: bool, expected: str
) -> None:
    output = verify(_corrupt(load(), name, old, new, dropin), tmp_path)
    assert expected in output


def _serve_flags() -> set[str]:
    help_text = subprocess.run(
        [sys.executable, "-m", "deployster", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(re.findall(r"(?<![\w-])(--?[a-z][a-z0-9-]*)", help_text))


def test_every_flag_of_the_deployster_unit_exists_in_serve_help() -> None:
    unit = UnitFile.parse(units(load())["deployster.service"]["content"])
    (exec_start,) = unit.values("Service", "ExecStart")
    argv = shlex.split(exec_start)
    assert argv[:2] == ["/usr/bin/docker", "run"]
    after_image = argv[argv.index("${IMAGE}") + 1 :]
    flags = [arg.partition("=")[0] for arg in after_image if arg.startswith("-")]
    assert flags, "the unit passes no flags to deployster serve"
    unknown = set(flags) - _serve_flags()
    assert not unknown, f"deployster serve has no {sorted(unknown)}"
    # The check itself catches a flag that does not exist.
    assert "--no-such-flag" not in _serve_flags()


def test_credentials_come_from_environment_files() -> None:
    text = CLOUD_CONFIG.read_text()
    config = units(load())
    deployster = UnitFile.parse(config["deployster.service"]["content"])
    assert deployster.values("Service", "EnvironmentFile") == [
        "/etc/deployster/env"
    ]  # required: no "-"
    assert deployster.values("Unit", "ConditionPathExists") == ["/etc/deployster/env"]
    argv = shlex.split(deployster.values("Service", "ExecStart")[0])
    assert argv[argv.index("--env-file") + 1] == "/etc/deployster/env"
    assert not {"-password", "--password", "-username", "--username"} & set(argv)
    etcd = UnitFile.parse(config["etcd-member.service"]["drop-ins"][0]["content"])
    assert etcd.values("Service", "EnvironmentFile") == ["/etc/deployster/etcd.env"]
    # No secret value anywhere: no password or discovery token assigned outside comments.
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert not re.search(r"(PASSWORD|SECRET|TOKEN)\w*=", code, re.IGNORECASE)
    assert "discovery.etcd.io/" not in code


def test_the_router_settings_agree_with_deployster() -> None:
    config = units(load())
    argv = shlex.split(
        UnitFile.parse(config["deployster.service"]["content"]).values("Service", "ExecStart")[0]
    )
    flags = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}
    traefik = UnitFile.parse(config["traefik.service"]["content"]).values("Service", "ExecStart")[0]
    assert f"--providers.etcd.rootKey={flags['--traefik-root']}" in traefik
    assert (
        f"--entryPoints.traefik.address={flags['--traefik-api'].removeprefix('http://')}" in traefik
    )
    vulcand = UnitFile.parse(config["vulcand.service"]["content"]).values("Service", "ExecStart")[0]
    assert f"-etcdKey={Settings.model_fields['vulcand_prefix'].default}" in vulcand
    assert "-etcdApiVer=3" in vulcand
