"""cloud-config.yml: the YAML parses, every embedded unit and drop-in passes a strict
``systemd-analyze verify``, Deployster's unit passes only flags that ``deployster serve``
has, no credential is written as a literal, and what a fleet-era Container Linux node does
with the file holds: the container gets the groups of the sockets it uses, the units start at
boot and in an order that works, coreos-cloudinit's serial start never waits for etcd's
quorum, the node stays on its release, the node's private address has a fallback, and the
file and README give no multipart advice.

``systemd-analyze verify`` runs with ``--root`` on a throwaway tree: systemd's own units
copied from this machine, stubs for the units Container Linux ships (so a dependency on a unit
that exists nowhere still fails), the embedded units, and an executable stub for every program
their Exec lines name (docker does not exist here). verify exits 0 even when it ignores an
unknown key or an unparsable value, so any output at all counts as a failure.

Each check of a node's behaviour is a function that returns the problems it finds; the tests
run it on the file (no problems) and on copies with one fault each (a problem found).
"""

from __future__ import annotations

import math
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployster.config import Settings

ROOT = Path(__file__).resolve().parents[2]
CLOUD_CONFIG = ROOT / "cloud-config.yml"
README = ROOT / "README.md"
DOCKERFILE = ROOT / "Dockerfile"
SYSTEMD_UNITS = Path("/usr/lib/systemd/system")
# Units a Container Linux node ships; the cloud-config starts, stops or extends them.
COREOS_UNITS = {
    "docker.service": "[Service]\nExecStart=/usr/bin/dockerd\n",
    "etcd-member.service": "[Service]\nType=notify\nExecStart=/usr/lib/coreos/etcd-wrapper\n",
    "etcd2.service": "[Service]\nType=notify\nExecStart=/usr/bin/etcd2\n",
    "fleet.service": "[Service]\nExecStart=/usr/bin/fleetd\n",
    "fleet.socket": "[Socket]\nListenStream=/var/run/fleet.sock\n",
    "locksmithd.service": "[Service]\nExecStart=/usr/lib/locksmith/locksmithd\n",
    "update-engine.service": "[Service]\nExecStart=/usr/sbin/update_engine\n",
}
# The stock units that are ready only once etcd's cluster has formed (Type=notify).
COREOS_QUORUM_UNITS = {"etcd-member.service", "etcd2.service"}
EXEC_KEYS = ("ExecStartPre", "ExecStart", "ExecStartPost", "ExecStop", "ExecStopPost", "ExecReload")
# Container Linux's ids: the docker group in baselayout's group file, the fleet group in
# fleet's sysusers.d entry; fleet.socket is mode 0660, user and group fleet.
DOCKER_GID = 233
FLEET_GID = 253
# Where Container Linux installs fleet's unit; releases without fleet have none.
FLEET_UNIT_PATH = "/usr/lib/systemd/system/fleet.service"
# The last releases that ship fleet (Stable, Beta).
FLEET_RELEASES = ("1632.3.0", "1662.2.0")
# coreos-cloudinit's own units: TimeoutSec=10min, for all the unit commands run one by one.
CLOUDINIT_TIMEOUT = 600.0
# systemd's default start and stop timeout, for the stock units.
DEFAULT_TIMEOUT = 90.0
ADDRESS_FILE = "/etc/deployster/address.env"


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

    def words(self, section: str, key: str) -> set[str]:
        """The space-separated words of every ``key=`` line (After=, Wants=, ...)."""
        return {word for value in self.values(section, key) for word in value.split()}


def load(text: str | None = None) -> dict[str, Any]:
    data = yaml.safe_load(CLOUD_CONFIG.read_text() if text is None else text)
    assert isinstance(data, dict)
    return data


def units(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {unit["name"]: unit for unit in config["coreos"]["units"]}


def unit_texts(entry: dict[str, Any]) -> list[str]:
    """The unit's own content and its drop-ins, in the order systemd reads them."""
    texts = [entry["content"]] if "content" in entry else []
    return texts + [dropin["content"] for dropin in entry.get("drop-ins", [])]


def merged(entry: dict[str, Any]) -> UnitFile:
    """The embedded content and drop-ins of a unit, as one unit file."""
    return UnitFile.parse("\n".join(unit_texts(entry)))


def exec_argv(value: str) -> list[str]:
    """An Exec line as systemd splits it, without its prefixes, and with ``$$`` as ``$``."""
    return [word.replace("$$", "$") for word in shlex.split(value.lstrip("-@:+!"))]


def exec_programs(text: str) -> set[str]:
    """The absolute paths of the programs the Exec lines of a unit or drop-in run."""
    unit = UnitFile.parse(text)
    found = set()
    for key in EXEC_KEYS:
        for value in unit.values("Service", key):
            if value:
                found.add(exec_argv(value)[0])
    return found


def shell_script(value: str) -> str:
    """The script of an Exec line of the form ``/bin/sh -c '...'``."""
    argv = exec_argv(value)
    assert argv[:2] == ["/bin/sh", "-c"], argv
    return argv[2]


def seconds(span: str) -> float:
    """A systemd time span ("30s", "1min", "3min 20s", "90", "0", "infinity") in seconds;
    0 and infinity both mean no limit, returned as infinity."""
    if span.strip() in ("0", "infinity"):
        return math.inf
    factors = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600}
    parts = re.findall(r"(\d+)\s*([a-z]*)", span)
    assert parts and all(unit in factors for _, unit in parts), span
    return float(sum(int(number) * factors[unit] for number, unit in parts))


def etcd_unit(config: dict[str, Any]) -> str:
    """The name of the one unit that runs etcd with its v2 API (the unit fleet needs)."""
    found = [
        name
        for name, entry in units(config).items()
        for value in merged(entry).values("Service", "ExecStart")
        if "--enable-v2=true" in exec_argv(value)
    ]
    assert len(found) == 1, f"units running etcd with --enable-v2=true: {found}"
    return found[0]


def deployster_argv(config: dict[str, Any]) -> list[str]:
    unit = UnitFile.parse(units(config)["deployster.service"]["content"])
    (exec_start,) = unit.values("Service", "ExecStart")
    return exec_argv(exec_start)


def option_values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == option]


# --- The checks of what a node does with the file -------------------------------------------


def group_problems(config: dict[str, Any]) -> list[str]:
    """The non-root container must be in the groups of both sockets it mounts (docker 233,
    fleet 253), by number; and no drop-in may open fleet's socket to every local user."""
    argv = deployster_argv(config)
    problems = []
    mounts = {volume.split(":")[0] for volume in option_values(argv, "-v")}
    for socket in ("/var/run/fleet.sock", "/var/run/docker.sock"):
        if socket not in mounts:
            problems.append(f"{socket} is not mounted into the container")
    groups = set(option_values(argv, "--group-add"))
    for gid, owner in ((DOCKER_GID, "docker.sock"), (FLEET_GID, "fleet.sock")):
        if str(gid) not in groups:
            problems.append(f"--group-add {gid} ({owner}'s group) is missing: {sorted(groups)}")
    socket_entry = units(config).get("fleet.socket", {})
    for mode in merged(socket_entry).values("Socket", "SocketMode"):
        if int(mode, 8) & 0o006:
            problems.append(f"fleet.socket is opened to every local user (SocketMode={mode})")
    return problems


def boot_problems(config: dict[str, Any]) -> list[str]:
    """Every unit coreos-cloudinit starts must also start at the next boot: enabled, with an
    [Install] section, or (a stock unit) wanted by such a unit."""
    by_name = units(config)
    enabled = {
        name
        for name, entry in by_name.items()
        if entry.get("enable") is True
        and "multi-user.target" in merged(entry).words("Install", "WantedBy")
    }
    wanted = set()
    for name in enabled:
        unit = merged(by_name[name])
        wanted |= unit.words("Unit", "Wants") | unit.words("Unit", "Requires")
    problems = []
    for name, entry in by_name.items():
        if entry.get("command") != "start" or name in enabled:
            continue
        if "content" in entry:
            problems.append(f"{name} is started now but not enabled for the next boot")
        elif name not in wanted:
            problems.append(f"{name} is started now but nothing starts it at the next boot")
    return problems


def ordering_problems(config: dict[str, Any]) -> list[str]:
    """fleet comes after the etcd unit in use and wants it; Deployster and Traefik come after
    etcd; Deployster requires the fleet check, which coreos-cloudinit runs before fleet; and
    no unit depends on etcd-member, which nothing starts."""
    by_name = units(config)
    etcd = etcd_unit(config)
    problems = []
    fleet = merged(by_name["fleet.service"])
    if etcd not in fleet.words("Unit", "After"):
        problems.append(f"fleet.service is not ordered after {etcd}")
    if etcd not in fleet.words("Unit", "Wants") | fleet.words("Unit", "Requires"):
        problems.append(f"fleet.service neither wants nor requires {etcd}")
    for name in ("traefik.service", "deployster.service"):
        if etcd not in merged(by_name[name]).words("Unit", "After"):
            problems.append(f"{name} is not ordered after {etcd}")
    deployster = merged(by_name["deployster.service"])
    if "fleet.socket" not in deployster.words("Unit", "After"):
        problems.append("deployster.service is not ordered after fleet.socket")
    check = "deployster-fleet-check.service"
    if not {check} <= deployster.words("Unit", "Requires") & deployster.words("Unit", "After"):
        problems.append(f"deployster.service does not require {check} and come after it")
    if "fleet.service" not in merged(by_name[check]).words("Unit", "Before"):
        problems.append(f"{check} is not ordered before fleet.service")
    order = [entry["name"] for entry in config["coreos"]["units"]]
    if order.index(check) > order.index("fleet.service"):
        problems.append(f"coreos-cloudinit would start fleet.service before {check}")
    for name, entry in by_name.items():
        unit = merged(entry)
        for key in ("After", "Wants", "Requires", "BindsTo", "PartOf"):
            if "etcd-member.service" in unit.words("Unit", key):
                problems.append(f"{name} has {key}=etcd-member.service, which nothing starts")
    if "etcd-member.service" in by_name and by_name["etcd-member.service"].get("command"):
        problems.append("etcd-member.service is started")
    return problems


def serial_start_problems(config: dict[str, Any]) -> list[str]:
    """coreos-cloudinit runs each unit command and waits for it: no command may wait for
    etcd's quorum (a Type=notify etcd) or without limit, and all of them together must fit in
    coreos-cloudinit's own limit, or the units after the one that overran never start."""
    problems = []
    total = 0.0
    for entry in config["coreos"]["units"]:
        name, command = entry["name"], entry.get("command")
        if not command:
            continue
        unit = merged(entry)
        kind = (unit.values("Service", "Type") or ["simple"])[-1]
        if kind == "notify" or ("content" not in entry and name in COREOS_QUORUM_UNITS):
            problems.append(f"{name}: `{command}` waits until etcd's cluster has formed")
        key = "TimeoutStopSec" if command == "stop" else "TimeoutStartSec"
        spans = unit.values("Service", key)
        timeout = seconds(spans[-1]) if spans else DEFAULT_TIMEOUT
        if math.isinf(timeout):
            problems.append(f"{name}: `{command}` can wait forever ({key}={spans[-1]})")
        total += timeout
    if config["coreos"].get("update", {}).get("reboot-strategy"):
        total += DEFAULT_TIMEOUT  # coreos-cloudinit stops or restarts locksmithd last
    if total > CLOUDINIT_TIMEOUT:
        problems.append(f"the unit commands may take {total:.0f} s, over {CLOUDINIT_TIMEOUT:.0f}")
    return problems


def hold_problems(config: dict[str, Any]) -> list[str]:
    """The node stays on the release it booted: update-engine masked and stopped, and the
    reboot strategy the string "off" (unquoted, YAML reads a boolean)."""
    problems = []
    strategy = config["coreos"].get("update", {}).get("reboot-strategy")
    if strategy != "off":
        problems.append(f'coreos.update.reboot-strategy is {strategy!r}, not the string "off"')
    engine = units(config).get("update-engine.service", {})
    if engine.get("mask") is not True or engine.get("command") != "stop":
        problems.append(f"update-engine.service is not masked and stopped: {engine}")
    return problems


def address_problems(config: dict[str, Any]) -> list[str]:
    """The private address: coreos-cloudinit's $private_ipv4 only as the default of one
    variable, which the operator's address file overrides, and that variable in every URL."""
    problems = []
    for name, entry in units(config).items():
        for text in unit_texts(entry):
            for line in text.splitlines():
                if (
                    "$private_ipv4" in line
                    and line.strip() != "Environment=PRIVATE_IPV4=$private_ipv4"
                ):
                    problems.append(f"{name} uses $private_ipv4 directly: {line.strip()}")
    etcd = units(config)[etcd_unit(config)]
    lines = [f"{k}={v}" for k, v in merged(etcd).sections.get("Service", [])]
    default, override = "Environment=PRIVATE_IPV4=$private_ipv4", f"EnvironmentFile=-{ADDRESS_FILE}"
    if default not in lines or override not in lines:
        problems.append(f"{etcd['name']} lacks {default} or {override}")
    argv = exec_argv(merged(etcd).values("Service", "ExecStart")[0])
    for flag in (
        "--advertise-client-urls",
        "--listen-client-urls",
        "--listen-peer-urls",
        "--initial-advertise-peer-urls",
    ):
        values = option_values(argv, flag)
        if not values or "${PRIVATE_IPV4}" not in values[0]:
            problems.append(f"{flag} does not use ${{PRIVATE_IPV4}}: {values}")
    return problems


CHECKS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "groups": group_problems,
    "boot": boot_problems,
    "ordering": ordering_problems,
    "serial start": serial_start_problems,
    "hold": hold_problems,
    "address": address_problems,
}


def _edit(name: str, old: str, new: str, dropin: bool = False) -> Callable[[dict], None]:
    def edit(config: dict[str, Any]) -> None:
        entry = units(config)[name]
        holder = entry["drop-ins"][0] if dropin else entry
        assert old in holder["content"], (name, old)
        holder["content"] = holder["content"].replace(old, new, 1)

    return edit


def _set(name: str, key: str, value: Any) -> Callable[[dict], None]:
    def edit(config: dict[str, Any]) -> None:
        units(config)[name][key] = value

    return edit


def _rename_etcd(config: dict[str, Any]) -> None:
    units(config)["etcd.service"]["name"] = "etcd3.service"


def _start_etcd_member(config: dict[str, Any]) -> None:
    config["coreos"]["units"].insert(0, {"name": "etcd-member.service", "command": "start"})


def _fleet_first(config: dict[str, Any]) -> None:
    entries = config["coreos"]["units"]
    fleet = next(entry for entry in entries if entry["name"] == "fleet.service")
    entries.remove(fleet)
    entries.insert(0, fleet)


def _unquoted_off(config: dict[str, Any]) -> None:
    text = CLOUD_CONFIG.read_text()
    assert 'reboot-strategy: "off"' in text
    config["coreos"]["update"] = load(text.replace('"off"', "off"))["coreos"]["update"]


def _open_fleet_socket(config: dict[str, Any]) -> None:
    config["coreos"]["units"].append(
        {
            "name": "fleet.socket",
            "drop-ins": [{"name": "30-open.conf", "content": "[Socket]\nSocketMode=0666\n"}],
        }
    )


FAULTS: list[tuple[str, str, Callable[[dict], None], str]] = [
    ("groups", "no fleet group", _edit("deployster.service", " --group-add 253", ""), "253"),
    ("groups", "no docker group", _edit("deployster.service", " --group-add 233", ""), "233"),
    ("groups", "a group name", _edit("deployster.service", "add 253", "add fleet"), "253"),
    ("groups", "socket opened to all", _open_fleet_socket, "SocketMode=0666"),
    ("boot", "etcd not enabled", _set("etcd.service", "enable", False), "etcd.service"),
    ("boot", "no [Install]", _edit("traefik.service", "[Install]", "[X-None]"), "traefik"),
    (
        "boot",
        "fleet not wanted at boot",
        _edit("deployster-fleet-check.service", "Wants=fleet.service", ""),
        "fleet.service",
    ),
    (
        "ordering",
        "fleet not after etcd",
        _edit("fleet.service", "After=etcd.service", "", dropin=True),
        "not ordered after etcd.service",
    ),
    ("ordering", "another etcd unit name", _rename_etcd, "etcd3.service"),
    ("ordering", "fleet started before the check", _fleet_first, "before"),
    (
        "ordering",
        "Deployster without the check",
        _edit(
            "deployster.service",
            "Requires=docker.service deployster-fleet-check.service",
            "Requires=docker.service",
        ),
        "deployster-fleet-check",
    ),
    (
        "ordering",
        "a dependency on etcd-member",
        _edit("traefik.service", "Wants=etcd.service", "Wants=etcd-member.service"),
        "etcd-member",
    ),
    ("serial start", "etcd-member started", _start_etcd_member, "etcd's cluster"),
    (
        "serial start",
        "etcd waits for its quorum",
        _edit("etcd.service", "[Service]", "[Service]\nType=notify"),
        "etcd's cluster",
    ),
    (
        "serial start",
        "no start timeout",
        _edit("deployster.service", "TimeoutStartSec=1min", "TimeoutStartSec=0"),
        "forever",
    ),
    (
        "serial start",
        "over coreos-cloudinit's limit",
        _edit("traefik.service", "TimeoutStartSec=3min", "TimeoutStartSec=9min"),
        "over 600",
    ),
    ("hold", "unquoted off", _unquoted_off, "False"),
    ("hold", "update-engine not masked", _set("update-engine.service", "mask", False), "mask"),
    (
        "address",
        "$private_ipv4 in a URL",
        _edit("etcd.service", "http://${PRIVATE_IPV4}:2380 \\", "http://$private_ipv4:2380 \\"),
        "directly",
    ),
    (
        "address",
        "no address file",
        _edit("etcd.service", f"EnvironmentFile=-{ADDRESS_FILE}\n", ""),
        ADDRESS_FILE,
    ),
]


@pytest.mark.parametrize("check", CHECKS)
def test_the_file_passes_the_check(check: str) -> None:
    assert CHECKS[check](load()) == []


@pytest.mark.parametrize(
    "check,edit,expected", [(c, e, x) for c, _, e, x in FAULTS], ids=[f for _, f, _, _ in FAULTS]
)
def test_the_check_finds_the_fault(check: str, edit: Callable[[dict], None], expected: str) -> None:
    config = load()
    edit(config)
    problems = CHECKS[check](config)
    assert any(expected in problem for problem in problems), problems


# --- Shell scripts the units run ------------------------------------------------------------


def _run(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/bin/sh", "-c", script], env=env, capture_output=True, text=True, timeout=10
    )


@pytest.mark.parametrize(
    "address,refused", [("", True), ("127.0.0.1", True), ("0.0.0.0", True), ("10.0.0.5", False)]
)
def test_etcd_refuses_to_start_without_a_private_address(address: str, refused: bool) -> None:
    etcd = UnitFile.parse(units(load())["etcd.service"]["content"])
    checks = [v for v in etcd.values("Service", "ExecStartPre") if v.startswith("/bin/sh")]
    assert len(checks) == 1
    done = _run(shell_script(checks[0]), {"PATH": "/usr/bin:/bin", "PRIVATE_IPV4": address})
    if refused:
        assert done.returncode == 1
        assert ADDRESS_FILE in done.stdout and "PRIVATE_IPV4=" in done.stdout
    else:
        assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


@pytest.mark.parametrize("fleet_installed", [True, False])
def test_the_fleet_check_fails_loudly_on_a_release_without_fleet(
    tmp_path: Path, fleet_installed: bool
) -> None:
    entry = units(load())["deployster-fleet-check.service"]
    unit = UnitFile.parse(entry["content"])
    assert unit.values("Service", "Type") == ["oneshot"]
    assert unit.values("Service", "StandardOutput") == ["journal+console"]
    (exec_start,) = unit.values("Service", "ExecStart")
    script = shell_script(exec_start)
    assert FLEET_UNIT_PATH in script
    fleet = tmp_path / "fleet.service"
    if fleet_installed:
        fleet.write_text("[Service]\n")
    done = _run(script.replace(FLEET_UNIT_PATH, str(fleet)), {"PATH": "/usr/bin:/bin"})
    if fleet_installed:
        assert (done.returncode, done.stdout) == (0, "")
    else:
        assert done.returncode == 1
        assert "ships no fleet" in done.stdout
        assert all(release in done.stdout for release in FLEET_RELEASES)


# --- Documentation --------------------------------------------------------------------------


def _readme_section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def _yaml_comments() -> str:
    return "\n".join(
        line.strip().lstrip("#")
        for line in CLOUD_CONFIG.read_text().splitlines()
        if line.strip().startswith("#")
    )


def multipart_advice(text: str) -> list[str]:
    """Sentences that speak of multipart user data or of more user-data parts without saying
    that coreos-cloudinit rejects them."""
    sentences = re.split(r"(?<=[.!?:;])\s+", " ".join(text.split()))
    pattern = re.compile(r"multi-?part|mime|user[- ]data part|second[^.]*\bpart\b", re.I)
    return [s for s in sentences if pattern.search(s) and "reject" not in s.lower()]


def test_no_multipart_advice_in_the_file_or_the_readme() -> None:
    for text in (_yaml_comments(), _readme_section("Deploying Deployster")):
        assert multipart_advice(text) == []
    # The check finds the advice the file used to give.
    old = "put on the node with your provisioning tool (or a second, private user-data part)"
    assert multipart_advice(old) == [old]
    assert multipart_advice("Multipart (MIME) user data is rejected.") == []


def test_the_readme_names_the_releases_and_an_after_boot_checklist() -> None:
    section = _readme_section("Deploying Deployster")
    assert all(release in section for release in FLEET_RELEASES)
    # The releases the fleet check names are the ones the README names.
    check = units(load())["deployster-fleet-check.service"]["content"]
    assert set(re.findall(r"\b1\d{3}\.\d+\.\d+\b", check)) <= set(
        re.findall(r"\b1\d{3}\.\d+\.\d+\b", section)
    )
    for needed in (ADDRESS_FILE, "/etc/deployster/etcd.env", "write_files", "$private_ipv4"):
        assert needed in section, needed
    commands = "\n".join(re.findall(r"```bash\n(.*?)```", section, re.S))
    for command in ("systemctl", "etcdctl", "fleetctl", "/readyz", "update-engine"):
        assert command in commands, command


def test_no_doc_says_fleets_socket_is_world_writable() -> None:
    for text in (DOCKERFILE.read_text(), _readme_section("Deploying Deployster")):
        assert "0666" not in text and "world-writable" not in text
        assert str(FLEET_GID) in text and "0660" in text


# --- The units themselves -------------------------------------------------------------------


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
        (system / name).write_text(f"[Unit]\nDescription=stub of Container Linux's {name}\n{text}")
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
    commands = {name: unit.get("command") for name, unit in units(config).items()}
    assert commands == {
        "update-engine.service": "stop",
        "deployster-fleet-check.service": "start",
        "etcd.service": "start",
        "fleet.service": "start",
        "traefik.service": "start",
        "vulcand.service": None,
        "deployster.service": "start",
    }


def test_every_embedded_unit_is_valid_systemd(tmp_path: Path) -> None:
    assert verify(load(), tmp_path) == ""


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
            "fleet.service",
            "Environment=FLEET_METADATA",
            "Enviroment=FLEET_METADATA",
            True,
            "Unknown key 'Enviroment'",
        ),
        ("etcd.service", "TimeoutStartSec=30s", "TimeoutStartSec=soon", False, "TimeoutStartSec"),
    ],
)
def test_a_broken_unit_fails_the_check(
    tmp_path: Path, name: str, old: str, new: str, dropin: bool, expected: str
) -> None:
    config = load()
    _edit(name, old, new, dropin)(config)
    assert expected in verify(config, tmp_path)


def _serve_flags() -> set[str]:
    help_text = subprocess.run(
        [sys.executable, "-m", "deployster", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(re.findall(r"(?<![\w-])(--?[a-z][a-z0-9-]*)", help_text))


def test_every_flag_of_the_deployster_unit_exists_in_serve_help() -> None:
    argv = deployster_argv(load())
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
    config = load()
    by_name = units(config)
    deployster = UnitFile.parse(by_name["deployster.service"]["content"])
    # Required files: no "-".
    assert deployster.values("Service", "EnvironmentFile") == ["/etc/deployster/env"]
    assert deployster.values("Unit", "ConditionPathExists") == ["/etc/deployster/env"]
    argv = deployster_argv(config)
    assert option_values(argv, "--env-file") == ["/etc/deployster/env"]
    assert not {"-password", "--password", "-username", "--username"} & set(argv)
    etcd = UnitFile.parse(by_name["etcd.service"]["content"])
    assert "/etc/deployster/etcd.env" in etcd.values("Service", "EnvironmentFile")
    etcd_argv = exec_argv(etcd.values("Service", "ExecStart")[0])
    assert option_values(etcd_argv, "--env-file") == ["/etc/deployster/etcd.env"]
    # No secret value anywhere: no password or discovery token assigned outside comments, and
    # no files written from the user data (which is not private on most providers).
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert not re.search(r"(PASSWORD|SECRET|TOKEN)\w*=", code, re.IGNORECASE)
    assert "discovery.etcd.io/" not in code
    assert "write_files" not in config


def test_etcd_keeps_the_v2_api_for_fleet() -> None:
    config = load()
    argv = exec_argv(merged(units(config)[etcd_unit(config)]).values("Service", "ExecStart")[0])
    assert argv[:2] == ["/usr/bin/docker", "run"]
    assert option_values(argv, "--network") == ["host"]
    assert argv[argv.index("${ETCD_IMAGE}") + 1] == "/usr/local/bin/etcd"
    env = UnitFile.parse(units(config)["etcd.service"]["content"]).values("Service", "Environment")
    (reference,) = [value.partition("=")[2] for value in env if value.startswith("ETCD_IMAGE=")]
    # etcd 3.5: the last minor version with the v2 API.
    assert re.fullmatch(r"[\w.-]+(/[\w.-]+)+:v3\.5\.\d+", reference), reference
    assert "http://127.0.0.1:2379" in option_values(argv, "--listen-client-urls")[0]


def test_the_router_settings_agree_with_deployster() -> None:
    config = units(load())
    argv = deployster_argv(load())
    flags = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}
    traefik = UnitFile.parse(config["traefik.service"]["content"]).values("Service", "ExecStart")[0]
    assert f"--providers.etcd.rootKey={flags['--traefik-root']}" in traefik
    assert (
        f"--entryPoints.traefik.address={flags['--traefik-api'].removeprefix('http://')}" in traefik
    )
    vulcand = UnitFile.parse(config["vulcand.service"]["content"]).values("Service", "ExecStart")[0]
    assert f"-etcdKey={Settings.model_fields['vulcand_prefix'].default}" in vulcand
    assert "-etcdApiVer=3" in vulcand
