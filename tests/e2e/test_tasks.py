"""One-off tasks end to end: Deployster against podman's Docker Engine API, images pulled from
a local registry, real etcd for the records (docs/containers.md, docs/compatibility.md
§2.5 and §6)."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from typing import Any

import pytest
from e2e.conftest import PASSWORD, Images, TasksApi, settings_for, tasks_api_for
from e2e.podman import Podman
from helpers import Receiver, eventually, wait_http

from deployster.launchers import EtcdServer, free_port
from deployster.policy import ServicePolicy
from deployster.records import TaskRecord, TaskState


async def test_exit_code_output_and_record(tasks_api: TasksApi, podman: Podman) -> None:
    status, body = await tasks_api.run(
        {"version": "v1", "command": "echo out1; echo err1 >&2; sleep 0.2; echo out2; exit 7"}
    )
    assert status == 200, body
    assert body == b"out1\nerr1\nout2\n\nExited (7) \n"
    [record] = await tasks_api.records()
    assert (record["state"], record["exit_code"]) == ("failed", 7)
    assert record["output"] == "out1\nerr1\nout2\n"
    assert record["command"] == [
        "/bin/sh",
        "-c",
        "echo out1; echo err1 >&2; sleep 0.2; echo out2; exit 7",
    ]
    assert record["image"] == f"{tasks_api.images.prefix}/{tasks_api.service}:v1"
    assert record["container"].startswith(f"{tasks_api.service}-v1-task-")
    assert record["started_at"] and record["finished_at"]
    assert podman.containers(f"deployster.task={record['id']}") == []


async def test_argv_env_and_success(tasks_api: TasksApi) -> None:
    status, body = await tasks_api.run(
        {
            "version": "v1",
            "command": ["sh", "-c", 'echo "$GREETING, $1"', "ignored-0", "world"],
            "env": {"GREETING": "hello"},
            "timeout": 30,
        }
    )
    assert (status, body) == (200, b"hello, world\n\nExited (0) \n")
    [record] = await tasks_api.records()
    assert (record["state"], record["exit_code"], record["timeout"]) == ("succeeded", 0, 30)
    assert record["env"] == ["GREETING"]  # names only: values may be secrets
    assert "hello" not in str(record["command"]) + str(record["env"])


async def test_a_shell_wrapper_entrypoint_gets_the_command_as_one_argument(
    tasks_api: TasksApi, images: Images
) -> None:
    images.publish(tasks_api.service, "wrapped", images.wrapped)
    status, body = await tasks_api.run({"version": "wrapped", "command": "echo $((6 * 7))"})
    assert (status, body) == (200, b"42\n\nExited (0) \n")
    [record] = await tasks_api.records()
    assert record["command"] == ["echo $((6 * 7))"]  # the original's Cmd: [command]


async def test_timeout_kills_removes_and_reports_124(tasks_api: TasksApi, podman: Podman) -> None:
    started = time.monotonic()
    status, body = await tasks_api.run(
        {"version": "v1", "command": "echo started; sleep 300", "timeout": 2}
    )
    elapsed = time.monotonic() - started
    assert status == 200
    assert (
        body
        == b"started\n\nExited (124) The task timed out after 2s. Forcefully removing container.\n"
    )
    assert 2 <= elapsed < 10
    [record] = await tasks_api.records()
    assert (record["state"], record["exit_code"], record["output"]) == (
        "timed_out",
        124,
        "started\n",
    )
    # The trailer is sent once the container is removed.
    assert podman.containers(f"deployster.task={record['id']}") == []
    metrics = await (await tasks_api.client.get("/metrics", headers=tasks_api.headers)).text()
    assert 'deployster_tasks_total{exit_code="124",state="timed_out"} 1.0' in metrics


async def test_image_is_pulled_from_the_registry(tasks_api: TasksApi, podman: Podman) -> None:
    image = f"{tasks_api.images.prefix}/{tasks_api.service}:only-in-registry"
    tasks_api.images.publish(tasks_api.service, "only-in-registry")
    assert not podman.image_exists(image)
    status, body = await tasks_api.run({"version": "only-in-registry", "command": "echo pulled"})
    assert (status, body) == (200, b"pulled\n\nExited (0) \n")
    assert podman.image_exists(image)


async def test_an_image_that_cannot_be_pulled_is_a_502_before_any_output(
    tasks_api: TasksApi,
) -> None:
    status, body = await tasks_api.run({"version": "never-pushed", "command": "true"})
    assert status == 502
    description = json.loads(body)["description"]
    assert description.startswith(
        f"The image {tasks_api.images.prefix}/{tasks_api.service}:never-pushed could not be pulled: "
    )
    assert "manifest unknown" in description or "not found" in description
    [record] = await tasks_api.records()
    assert (record["state"], record["exit_code"]) == ("error", None)
    assert record["error"] == description


async def test_a_dropped_client_does_not_stop_the_task_and_follow_reattaches(
    tasks_api: TasksApi,
) -> None:
    response = await tasks_api.client.post(
        tasks_api.url(),
        headers=tasks_api.headers,
        json={"task": {"version": "v1", "command": "echo first; sleep 2; echo second; exit 5"}},
    )
    assert response.status == 200
    task_id = response.headers["X-Task-Id"]
    assert response.headers["Location"] == tasks_api.url(f"/{task_id}")
    assert await response.content.readuntil(b"\n") == b"first\n"
    response.close()  # the CI runner's connection drops

    running = await tasks_api.record(task_id)
    assert running["state"] == "running"
    follow = await tasks_api.client.get(
        tasks_api.url(f"/{task_id}?follow=1"), headers=tasks_api.headers
    )
    assert follow.status == 200
    assert await follow.read() == b"first\nsecond\n\nExited (5) \n"
    record = await tasks_api.record(task_id)
    assert (record["state"], record["exit_code"], record["output"]) == (
        "failed",
        5,
        "first\nsecond\n",
    )
    # Following a finished task gives the kept output and the trailer.
    again = await tasks_api.client.get(
        tasks_api.url(f"/{task_id}?follow=1"), headers=tasks_api.headers
    )
    assert await again.read() == b"first\nsecond\n\nExited (5) \n"


async def test_exclusive_tasks_never_overlap(tasks_api: TasksApi) -> None:
    store = tasks_api.deployster.store
    await store.save_policy(tasks_api.service, ServicePolicy(exclusive_tasks=True))
    first = await tasks_api.client.post(
        tasks_api.url(),
        headers=tasks_api.headers,
        json={"task": {"version": "v1", "command": "sleep 30", "timeout": 3}},
    )
    assert first.status == 200
    first_id = first.headers["X-Task-Id"]
    status, body = await tasks_api.run({"version": "v1", "command": "echo overlap"})
    assert status == 409
    description = json.loads(body)["description"]
    assert f"is running task {first_id}" in description and "exclusive_tasks" in description
    assert (await first.read()).endswith(
        b"\nExited (124) The task timed out after 3s. Forcefully removing container.\n"
    )
    status, body = await tasks_api.run({"version": "v1", "command": "echo next"})
    assert (status, body) == (200, b"next\n\nExited (0) \n")


async def test_without_the_policy_tasks_of_a_service_run_side_by_side(tasks_api: TasksApi) -> None:
    results = await asyncio.gather(
        *(tasks_api.run({"version": "v1", "command": f"sleep 2; echo {n}"}) for n in range(3))
    )
    assert sorted(results) == [(200, f"{n}\n\nExited (0) \n".encode()) for n in range(3)]
    records = await tasks_api.records()
    assert len({r["container"] for r in records}) == 3  # one name per task, no conflict
    # They overlapped: each started before any had finished.
    assert max(r["started_at"] for r in records) < min(r["finished_at"] for r in records)


@pytest.mark.parametrize(
    ("task", "fragment"),
    [
        ({"version": "v1"}, "'task.command' is required"),
        ({"version": "v1", "command": ""}, "the command is empty"),
        ({"version": "v1", "command": []}, "the command is empty"),
        (
            {"version": "v1", "command": "true", "timeout": 601},
            "longer than this server's limit of 600 s",
        ),
        ({"version": "v1", "command": "true", "timeout": 0}, "'task.timeout'"),
        ({"version": "v1", "command": "true", "env": {"1BAD": "x"}}, "'1BAD' is not valid"),
        ({"version": "v1", "command": "true", "timout": 5}, "'task.timout'"),
        ({"version": "bad tag", "command": "true"}, "Version 'bad tag' is not valid"),
    ],
)
async def test_bad_input_is_a_400_and_runs_nothing(
    tasks_api: TasksApi, task: dict[str, Any], fragment: str
) -> None:
    status, body = await tasks_api.run(task)
    assert status == 400, body
    assert fragment in json.loads(body)["description"]
    assert await tasks_api.records() == []


async def test_unknown_task_is_a_404(tasks_api: TasksApi) -> None:
    response = await tasks_api.client.get(tasks_api.url("/nope"), headers=tasks_api.headers)
    assert response.status == 404
    assert (await response.json())["error"] == "not_found"


async def test_docker_unreachable_is_a_502(
    aiohttp_client: Any,
    etcd_endpoint: str,
    podman: Podman,
    images: Images,
    etcd_prefix: str,
    tmp_path: Any,
) -> None:
    settings = settings_for(
        etcd_endpoint,
        podman,
        images,
        etcd_prefix,
        docker_endpoint=f"unix://{tmp_path}/no-docker.sock",
    )
    async with tasks_api_for(aiohttp_client, settings, images) as api:
        status, body = await api.run({"version": "v1", "command": "true"})
    assert status == 502
    assert "cannot be reached" in json.loads(body)["description"]


async def test_a_restarted_server_adopts_and_reaps_its_task_containers(
    aiohttp_client: Any,
    etcd_endpoint: str,
    podman: Podman,
    images: Images,
    etcd_prefix: str,
) -> None:
    settings = settings_for(etcd_endpoint, podman, images, etcd_prefix)
    service = f"svc-{secrets.token_hex(3)}"
    images.publish(service, "v1")
    async with tasks_api_for(aiohttp_client, settings, images, service) as first:
        ends = await first.client.post(
            first.url(),
            headers=first.headers,
            json={
                "task": {
                    "version": "v1",
                    "command": "echo one; sleep 2; echo two; exit 9",
                    "timeout": 60,
                }
            },
        )
        hangs = await first.client.post(
            first.url(),
            headers=first.headers,
            json={"task": {"version": "v1", "command": "echo hanging; sleep 300", "timeout": 6}},
        )
        assert (ends.status, hangs.status) == (200, 200)
        ends_id, hangs_id = ends.headers["X-Task-Id"], hangs.headers["X-Task-Id"]
        # A record whose container never came to be (the server died before creating it).
        lost = TaskRecord(
            id="20000101-000000-lost",
            service=service,
            version="v1",
            image="x",
            command=["true"],
            timeout=600,
            state=TaskState.RUNNING,
        )
        await first.deployster.tasks.store.save(lost)
    # The server is gone; its task containers run on.
    assert len(podman.containers(f"deployster.etcd-prefix={etcd_prefix}")) == 2
    await asyncio.sleep(2.5)  # the first task exits while no server follows it

    async with tasks_api_for(aiohttp_client, settings, images, service) as second:

        async def finished(task_id: str) -> dict[str, Any] | None:
            record = await second.record(task_id)
            return record if record["state"] not in ("pending", "running") else None

        ended = await eventually(lambda: finished(ends_id), timeout=20)
        assert (ended["state"], ended["exit_code"], ended["output"]) == ("failed", 9, "one\ntwo\n")
        timed_out = await eventually(lambda: finished(hangs_id), timeout=20)
        assert (timed_out["state"], timed_out["exit_code"]) == ("timed_out", 124)
        assert timed_out["output"] == "hanging\n"
        gone = await second.record(lost.id)
        assert gone["state"] == "error" and "outcome is unknown" in gone["error"]
        assert podman.containers(f"deployster.etcd-prefix={etcd_prefix}") == []


ENV = {**os.environ, "DEPLOYSTER_PASSWORD": PASSWORD}


def serve(
    tmp_path: Any,
    *,
    port: int,
    etcd_server: EtcdServer,
    podman: Podman,
    images: Images,
    etcd_prefix: str,
) -> subprocess.Popen[bytes]:
    """`deployster serve` as a user starts it, with its log in tmp_path/serve.log."""
    with open(tmp_path / "serve.log", "wb") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "deployster",
                "serve",
                "--listen",
                f"127.0.0.1:{port}",
                "--etcd",
                etcd_server.endpoint,
                "--etcd-prefix",
                etcd_prefix,
                "--template",
                "workload",
                "--fleet-endpoint",
                "http://127.0.0.1:9",
                "-registry-url",
                images.prefix,
                "--docker-endpoint",
                podman.endpoint,
                "--log-format",
                "json",
            ],
            stdout=out,
            stderr=out,
            env=ENV,
        )


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_output_streams_live_over_more_than_a_minute(
    tmp_path: Any,
    etcd_server: EtcdServer,
    podman: Podman,
    images: Images,
    etcd_prefix: str,
) -> None:
    """`deployster serve` and `deployctl run` as a user runs them: the original cut the stream
    after 60 s; here every line arrives as it is written and deployctl exits with the code."""
    service = f"svc-{secrets.token_hex(3)}"
    images.publish(service, "v1")
    port = free_port()
    server = serve(
        tmp_path,
        port=port,
        etcd_server=etcd_server,
        podman=podman,
        images=images,
        etcd_prefix=etcd_prefix,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", server, tmp_path / "serve.log", timeout=30)
        script = "i=0; while [ $i -lt 13 ]; do i=$((i+1)); echo tick $i; sleep 5; done; exit 3"
        started = time.monotonic()
        ctl = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "deployster.ctl",
            "--url",
            f"http://127.0.0.1:{port}",
            "run",
            "--timeout",
            "120",
            service,
            "v1",
            script,
            stdout=asyncio.subprocess.PIPE,
            env=ENV,
        )
        assert ctl.stdout is not None
        arrivals: list[tuple[float, bytes]] = []
        while line := await ctl.stdout.readline():
            arrivals.append((time.monotonic() - started, line))
        code = await ctl.wait()
    finally:
        server.terminate()
        server.wait(30)
    lines = [line for _, line in arrivals]
    assert lines == [f"tick {i}\n".encode() for i in range(1, 14)] + [b"\n", b"Exited (3) \n"]
    assert code == 3
    ticks = [at for at, _ in arrivals[:13]]
    assert ticks[0] < 10  # pull, create and start included
    for i, at in enumerate(ticks):  # each line when written (every 5 s), not at the end
        assert at - ticks[0] == pytest.approx(5 * i, abs=2.5), [round(t, 1) for t in ticks]
    assert arrivals[-1][0] - ticks[0] > 60


async def test_stopping_the_server_ends_streams_at_once_and_leaves_the_task_running(
    tmp_path: Any,
    etcd_server: EtcdServer,
    podman: Podman,
    images: Images,
    etcd_prefix: str,
) -> None:
    service = f"svc-{secrets.token_hex(3)}"
    images.publish(service, "v1")
    port = free_port()
    server = serve(
        tmp_path,
        port=port,
        etcd_server=etcd_server,
        podman=podman,
        images=images,
        etcd_prefix=etcd_prefix,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", server, tmp_path / "serve.log", timeout=30)
        ctl = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "deployster.ctl",
            "--url",
            f"http://127.0.0.1:{port}",
            "run",
            service,
            "v1",
            "echo working; sleep 60",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=ENV,
        )
        assert ctl.stdout is not None
        assert await asyncio.wait_for(ctl.stdout.readline(), 30) == b"working\n"
        stopping = time.monotonic()
        server.terminate()
        assert await asyncio.wait_for(ctl.wait(), 20) == 1  # no trailer: the outcome is unknown
        assert server.wait(20) == 0
        assert time.monotonic() - stopping < 15
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    # The task itself runs on, for the next start to adopt.
    [container] = podman.containers(f"deployster.etcd-prefix={etcd_prefix}")
    assert container["State"] == "running"
    podman.cli("rm", "--force", "--time", "0", str(container["Id"]))


async def test_a_finished_task_notifies_its_exit_code(
    aiohttp_client: Any, etcd_endpoint: str, podman: Podman, images: Images, etcd_prefix: str
) -> None:
    receiver = Receiver(free_port())
    await receiver.start()
    try:
        settings = settings_for(
            etcd_endpoint, podman, images, etcd_prefix, notify_url=[receiver.url]
        )
        async with tasks_api_for(aiohttp_client, settings, images) as api:
            images.publish(api.service, "v1")
            status, _ = await api.run({"version": "v1", "command": "exit 3"})
            assert status == 200
            [got] = await receiver.received(1)
        body = got.json
        assert (got.event, body["event"], body["service"]) == (
            "task.finished",
            "task.finished",
            api.service,
        )
        assert (body["task"]["state"], body["task"]["exit_code"]) == ("failed", 3)
        assert body["link"].endswith(f"/v1/services/{api.service}/tasks/{body['task']['id']}")
    finally:
        await receiver.stop()
