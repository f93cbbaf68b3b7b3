"""One-off tasks (migrations) from a service's image, through the Docker Engine API.

A task is a plain container on the Docker engine at ``--docker-endpoint``, never a fleet unit
(as in the original, `docs/compatibility.md` §6, minus the weaknesses of §11):

1. **Record** the task in etcd (``pending``). With the service's policy
   ``exclusive_tasks``, first take the service's task lock (an etcd key on a kept-alive
   lease): a second task while one runs is refused with 409 naming it.
2. **Pull** ``<prefix>/<service>:<version>`` and read the pull stream for errors (the HTTP
   status is 200 even when a pull fails). A failure here, before anything ran, is the
   caller's answer: 502 with the engine's words.
3. **Create** a container with a name unique to the task (``<service>-<version>-task-<id>``)
   and labels naming the task, its service and this server's etcd prefix, then **start** it.
   A command given as a string runs under ``/bin/sh -c``, unless the image has an
   ENTRYPOINT: then it is passed as one argument, as the original did (images built for it
   have a shell wrapper such as ``bash -l -c`` as their entrypoint). A list is the argv.
4. **Follow** stdout and stderr as they come (framed, ``deployster.docker``), fan them out to
   every follower and keep a bounded tail in the record (written every few seconds), while
   waiting for the exit. At the task's limit the container is killed: exit code 124, as GNU
   ``timeout`` and the original reported it.
5. **Remove** the container (force), record the outcome, release the lock, and send the
   trailer: ``\\nExited (N) <error>\\n``, or the original's 124 sentence, byte for byte.

The run belongs to the server, not to the HTTP request that asked for it: a client that
disconnects (a CI runner's connection dropped) stops receiving output, and the task goes on
to its end; its record keeps the outcome, and ``GET .../tasks/{id}?follow=1`` re-attaches.

When the server stops, running tasks are left running (stopping Deployster must not kill a
migration half-way); the next start finds every container carrying its prefix label: a
running one is followed again up to its original deadline, an exited one has its exit code
and output recorded, and every one is removed. A record left ``pending`` or ``running``
without a container is closed as an error. One server per etcd prefix and Docker engine:
another server with the same prefix would adopt this one's containers.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from deployster.aio import cancel_and_wait
from deployster.bus import EventBus
from deployster.docker import (
    ContainerSpec,
    DockerClient,
    DockerError,
    DockerUnreachableError,
    PullError,
)
from deployster.etcd import EtcdError, LeaseKeeper
from deployster.events import TaskFinished, now
from deployster.metrics import Metrics
from deployster.records import TaskRecord, TaskState, new_task_id
from deployster.store import LOCK_TTL, Store, TaskStore
from deployster.units import image_name

log = structlog.get_logger(__name__)

DEFAULT_TIMEOUT = 600.0  # the original's 10 minutes
LABEL_TASK = "deployster.task"
LABEL_SERVICE = "deployster.service"
LABEL_PREFIX = "deployster.etcd-prefix"
TIMEOUT_EXIT_CODE = 124


@dataclass(frozen=True)
class TaskConfig:
    image_prefix: str
    etcd_prefix: str
    max_timeout: float = DEFAULT_TIMEOUT  # the longest limit a task may ask for
    output_tail: int = 64 * 1024  # bytes of output kept in the record and for late followers
    keep_records: int = 100  # finished records kept per service
    save_interval: float = 2.0  # how often a running task's output tail is written
    # After the exit, how long the output still on its way may take to arrive.
    drain_timeout: float = 10.0


@dataclass(frozen=True)
class TaskSpec:
    """A task as asked for: the API's ``{"task": {...}}`` after validation."""

    service: str
    version: str
    command: str | Sequence[str]
    timeout: float | None = None
    env: Mapping[str, str] = field(default_factory=dict, repr=False)
    actor: str = ""


class TaskRejectedError(Exception):
    """The task cannot run as asked; nothing runs. ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.description = description


# -- the stream's bytes -----------------------------------------------------------------------


def go_duration(seconds: float) -> str:
    """``seconds`` as Go's ``time.Duration.String`` writes it: 600 -> ``10m0s``, 2 -> ``2s``."""

    def number(value: float) -> str:
        return f"{value:.9f}".rstrip("0").rstrip(".")

    if seconds < 1:
        return f"{number(seconds * 1000)}ms" if seconds else "0s"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{number(secs)}s"
    if hours:
        return f"{int(hours)}h{int(minutes)}m{text}"
    if minutes:
        return f"{int(minutes)}m{text}"
    return text


def trailer(record: TaskRecord) -> bytes:
    """The end of a task's stream, as the original wrote it (§2.5)."""
    if record.state is TaskState.TIMED_OUT:
        text = (
            f"\nExited ({TIMEOUT_EXIT_CODE}) The task timed out after "
            f"{go_duration(record.timeout)}. Forcefully removing container.\n"
        )
    elif record.exit_code is not None:
        text = f"\nExited ({record.exit_code}) {record.error}\n"
    else:
        text = f"ERROR: {record.error}\n"
    if record.cleanup_error:
        text += f"WARNING: Container could not be cleaned up ({record.cleanup_error})\n"
    return text.encode()


class OutputTail:
    """The last ``limit`` bytes of a task's output."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.truncated = False

    def append(self, chunk: bytes) -> None:
        self.data += chunk
        if len(self.data) > self.limit:
            del self.data[: len(self.data) - self.limit]
            self.truncated = True

    def text(self) -> str:
        data = bytes(self.data)
        if self.truncated:  # the cut may have split a UTF-8 character: skip its rest
            while data and 0x80 <= data[0] < 0xC0:
                data = data[1:]
        return data.decode(errors="replace")


class _Follower:
    """One reader of a task's output. A reader that falls more than ``MAX_PENDING`` bytes
    behind is cut off with a line saying so, rather than holding the output in memory."""

    MAX_PENDING = 8 * 1024 * 1024

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        self._pending = 0
        self._wake = asyncio.Event()
        self._closed = False
        self._lagged = False

    def push(self, chunk: bytes) -> None:
        if self._closed:
            return
        if self._pending + len(chunk) > self.MAX_PENDING:
            self._chunks.clear()
            self._lagged = self._closed = True
        else:
            self._chunks.append(chunk)
            self._pending += len(chunk)
        self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    async def chunks(self, task_url: str) -> AsyncIterator[bytes]:
        while True:
            while self._chunks:
                chunk = self._chunks.popleft()
                self._pending -= len(chunk)
                yield chunk
            if self._closed:
                if self._lagged:
                    yield (
                        f"\nERROR: this client read the output too slowly and was cut off; the task "
                        f"goes on: GET {task_url}?follow=1 re-attaches\n"
                    ).encode()
                return
            self._wake.clear()
            await self._wake.wait()


class TaskRun:
    """A task this server runs: its record, its output tail, and the readers of its output."""

    def __init__(self, record: TaskRecord, tail_limit: int) -> None:
        self.record = record
        self.output = OutputTail(tail_limit)
        # Resolved once the container runs, or with TaskRejectedError when it never will.
        self.started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.finished = asyncio.Event()
        self._trailer = b""
        self._followers: set[_Follower] = set()

    @property
    def url(self) -> str:
        return f"/v1/services/{self.record.service}/tasks/{self.record.id}"

    def publish(self, chunk: bytes) -> None:
        self.output.append(chunk)
        for follower in self._followers:
            follower.push(chunk)

    def finish(self, end: bytes) -> None:
        """The task ended: ``end`` is the trailer (empty when this server stops following)."""
        self._trailer = end
        for follower in self._followers:
            follower.push(end)
            follower.close()
        self.finished.set()

    async def follow(self) -> AsyncIterator[bytes]:
        """The output from the start (as far as the tail reaches), live, then the trailer."""
        backlog = bytes(self.output.data)
        if self.finished.is_set():
            yield backlog + self._trailer
            return
        follower = _Follower()
        self._followers.add(follower)
        try:
            if backlog:
                yield backlog
            async for chunk in follower.chunks(self.url):
                yield chunk
        finally:
            self._followers.discard(follower)


# -- the runner -------------------------------------------------------------------------------


def container_name(service: str, version: str, task_id: str) -> str:
    """The original's ``<service>-<version>-task``, made unique by the task id."""
    return f"{service}-{version}-task-{task_id}"


class TaskRunner:
    """Runs tasks, follows their output, records them, and adopts what a previous run left."""

    def __init__(
        self,
        docker: DockerClient,
        *,
        store: TaskStore,
        policies: Store,
        config: TaskConfig,
        metrics: Metrics | None = None,
        bus: EventBus | None = None,
    ) -> None:
        self.docker = docker
        self.bus = bus
        self.metrics = metrics
        self.store = store
        self.policies = policies
        self.config = config
        self._runs: dict[str, TaskRun] = {}
        self._work: set[asyncio.Task[None]] = set()
        self._leases: dict[str, LeaseKeeper] = {}

    def running(self, task_id: str) -> TaskRun | None:
        """The run of a task this server follows now."""
        return self._runs.get(task_id)

    async def submit(self, spec: TaskSpec) -> TaskRun:
        """Start a task; returns once its container runs. Raises TaskRejectedError (nothing runs)
        or EtcdError (nothing was recorded)."""
        limit = self.config.max_timeout
        timeout = spec.timeout if spec.timeout is not None else min(DEFAULT_TIMEOUT, limit)
        if timeout > limit:
            raise TaskRejectedError(
                400,
                f"The timeout of {timeout:g} s is longer than this server's limit of "
                f"{limit:g} s (-task-max-timeout); ask for {limit:g} s or less.",
            )
        task_id = new_task_id()
        record = TaskRecord(
            id=task_id,
            service=spec.service,
            version=spec.version,
            image=image_name(self.config.image_prefix, spec.service, spec.version),
            command=[spec.command] if isinstance(spec.command, str) else list(spec.command),
            timeout=timeout,
            env=sorted(spec.env),
            actor=spec.actor,
            container=container_name(spec.service, spec.version, task_id),
        )
        policy = await self.policies.get_policy(spec.service)
        if policy.exclusive_tasks:
            await self._lock(record)
        try:
            await self.store.save(record)
        except EtcdError:
            await self._unlock(record)
            raise
        run = TaskRun(record, self.config.output_tail)
        self._runs[task_id] = run
        self._spawn(run, self._run(run, spec))
        # The run goes on if this caller goes away: shield it from the caller's cancellation.
        await asyncio.shield(run.started)
        return run

    async def start(self) -> int:
        """Adopt the task containers a previous run of this server left; returns how many are
        followed again. A Docker engine that cannot be reached is logged, not fatal: Docker
        is needed for tasks only."""
        try:
            containers = await self.docker.list_containers({LABEL_PREFIX: self.config.etcd_prefix})
        except DockerError as exc:
            log.warning("task_containers_not_listed", reason=exc.message)
            return 0
        adopted: set[str] = set()
        for container in containers:
            task_id = container.labels.get(LABEL_TASK, "")
            service = container.labels.get(LABEL_SERVICE, "")
            if task_id in self._runs:
                continue
            record = await self.store.get(service, task_id) if task_id and service else None
            if record is None or record.state.finished or container.state == "created":
                if record is not None and not record.state.finished:
                    record.state = TaskState.ERROR
                    record.error = "Deployster stopped before the task's container started."
                    await self._save(record)
                await self._remove_quietly(container.id, task_id=task_id, service=service)
                log.info(
                    "task_container_reaped",
                    container=container.id[:12],
                    task_id=task_id,
                    service=service,
                )
                continue
            adopted.add(task_id)
            record.state = TaskState.RUNNING
            record.started_at = record.started_at or now()
            run = TaskRun(record, self.config.output_tail)
            run.started.set_result(None)
            self._runs[task_id] = run
            if (await self.policies.get_policy(service)).exclusive_tasks:
                await self._lock(record, adopt=True)
            log.info("task_adopted", task_id=task_id, service=service, container=container.id[:12])
            self._spawn(run, self._follow(run, container.id))
        for record in await self.store.list_tasks():
            if (
                not record.state.finished
                and record.id not in adopted
                and record.id not in self._runs
            ):
                record.state = TaskState.ERROR
                record.error = (
                    "The task's container is gone (Deployster stopped before creating it, "
                    "or someone removed it); its outcome is unknown."
                )
                await self._save(record)
        return len(adopted)

    async def close(self) -> None:
        """Stop following (the containers run on, for the next start to adopt); idempotent."""
        await cancel_and_wait(*self._work)
        for keeper in self._leases.values():
            await keeper.stop()
        await self.docker.close()

    # -- one task -----------------------------------------------------------------------

    def _spawn(self, run: TaskRun, work: Coroutine[Any, Any, None]) -> None:
        record = run.record

        async def supervised() -> None:
            with structlog.contextvars.bound_contextvars(task_id=record.id, service=record.service):
                try:
                    await work
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.exception("task_runner_failed")
                    # Nobody may wait forever on a run that failed this way.
                    self._runs.pop(record.id, None)
                    if not run.started.done():
                        run.started.set_exception(exc)
                    if not run.finished.is_set():
                        run.finish(
                            b"ERROR: Deployster failed while following the task; the server log "
                            b"has the details.\n"
                        )

        task = asyncio.create_task(supervised(), name=f"task:{record.id}")
        self._work.add(task)
        task.add_done_callback(self._work.discard)

    async def _run(self, run: TaskRun, spec: TaskSpec) -> None:
        record = run.record
        try:
            try:
                await self.docker.pull(record.image)
                record.command = await self._command(record.image, spec.command)
                container = await self.docker.create(
                    record.container,
                    ContainerSpec(
                        image=record.image,
                        cmd=record.command,
                        env=dict(spec.env),
                        labels=self._labels(record),
                    ),
                )
            except DockerError as exc:
                raise TaskRejectedError(502, self._start_failure(record, exc)) from None
            try:
                await self.docker.start(container)
            except DockerError as exc:
                await self._remove_quietly(container)
                raise TaskRejectedError(502, self._start_failure(record, exc)) from None
        except TaskRejectedError as exc:
            record.state = TaskState.ERROR
            record.error = exc.description
            log.warning("task_not_started", reason=exc.description)
            await self._save(record)
            await self._end(run)
            run.started.set_exception(exc)
            return
        except asyncio.CancelledError:
            run.started.cancel()  # the server stops: its caller must not wait on
            raise
        record.state = TaskState.RUNNING
        record.started_at = now()
        await self._save(record)
        log.info(
            "task_started",
            version=record.version,
            container=record.container,
            timeout=record.timeout,
            env_names=record.env,
        )
        run.started.set_result(None)
        await self._follow(run, container)

    async def _command(self, image: str, command: str | Sequence[str]) -> list[str]:
        if not isinstance(command, str):
            return list(command)
        if await self.docker.image_entrypoint(image):
            return [command]  # the original's form, for images with a shell-wrapper entrypoint
        return ["/bin/sh", "-c", command]

    def _labels(self, record: TaskRecord) -> dict[str, str]:
        return {
            LABEL_TASK: record.id,
            LABEL_SERVICE: record.service,
            LABEL_PREFIX: self.config.etcd_prefix,
        }

    @staticmethod
    def _start_failure(record: TaskRecord, exc: DockerError) -> str:
        if isinstance(exc, PullError):
            return f"The image {record.image} could not be pulled: {exc.message}"
        if isinstance(exc, DockerUnreachableError):
            return f"The task cannot start: {exc.message}"
        return f"The task's container could not be started: {exc.message}"

    async def _follow(self, run: TaskRun, container: str) -> None:
        """Follow a started container to its end (or its deadline), then clean up and record."""
        record = run.record
        assert record.started_at is not None
        deadline = record.started_at.timestamp() + record.timeout
        pump = asyncio.create_task(self._pump(run, container))
        # The outcome reaches the record only once the output is in and the container gone,
        # so that a reader never sees a finished record without its output.
        state, exit_code, error = TaskState.ERROR, None, ""
        try:
            try:
                async with asyncio.timeout(max(0.0, deadline - time.time())):
                    status = await self.docker.wait(container)
                state = TaskState.SUCCEEDED if status.code == 0 else TaskState.FAILED
                exit_code, error = status.code, status.error
            except TimeoutError:
                state, exit_code = TaskState.TIMED_OUT, TIMEOUT_EXIT_CODE
                log.warning("task_timed_out", timeout=record.timeout)
                try:
                    await self.docker.kill(container)
                except DockerError as exc:  # the forced removal below kills it as well
                    log.warning("task_not_killed", reason=exc.message)
            # The output still on its way ends with the container's stream.
            await asyncio.wait([pump], timeout=self.config.drain_timeout)
        except DockerError as exc:
            state, exit_code = TaskState.ERROR, None
            error = f"Docker failed while the task ran: {exc.message}"
            log.warning("task_lost", reason=exc.message)
        except asyncio.CancelledError:
            pump.cancel()
            run.finish(b"")  # the server stops: the container runs on, to be adopted
            raise
        finally:
            if not pump.done():
                pump.cancel()
        try:
            await self.docker.remove(container)
        except DockerError as exc:
            record.cleanup_error = exc.message
            log.warning(
                "task_container_not_removed", container=record.container, reason=exc.message
            )
        record.output = run.output.text()
        record.output_truncated = run.output.truncated
        record.state, record.exit_code, record.error = state, exit_code, error
        await self._save(record)
        log.info("task_finished", state=record.state, exit_code=record.exit_code)
        await self._end(run)

    async def _pump(self, run: TaskRun, container: str) -> None:
        record = run.record
        last_save = time.monotonic()
        try:
            async for frame in self.docker.logs(container):
                if frame.data:
                    run.publish(frame.data)
                if time.monotonic() - last_save >= self.config.save_interval:
                    last_save = time.monotonic()
                    record.output = run.output.text()
                    record.output_truncated = run.output.truncated
                    try:
                        async with asyncio.timeout(self.config.save_interval):
                            await self.store.save(record)
                    except (EtcdError, TimeoutError) as exc:
                        log.warning("task_output_not_saved", reason=str(exc))
        except DockerError as exc:
            log.warning("task_output_lost", reason=exc.message)

    async def _end(self, run: TaskRun) -> None:
        if self.metrics is not None:
            self.metrics.task_ended(run.record.state, run.record.exit_code)
        if self.bus is not None and run.record.state.finished:
            self.bus.publish(TaskFinished(service=run.record.service, task_id=run.record.id))
        await self._unlock(run.record)
        self._runs.pop(run.record.id, None)
        run.finish(trailer(run.record))
        try:
            await self.store.prune(run.record.service, self.config.keep_records)
        except EtcdError as exc:
            log.warning("task_records_not_pruned", reason=str(exc))

    async def _save(self, record: TaskRecord, patience: float = 30.0) -> None:
        """Write the record, retrying while etcd is away (the run has no caller to tell)."""
        deadline = time.monotonic() + patience
        delay = 0.2
        while True:
            try:
                await self.store.save(record)
                return
            except EtcdError as exc:
                if time.monotonic() >= deadline:
                    log.error("task_record_not_saved", state=record.state, reason=str(exc))
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _remove_quietly(self, container: str, **context: str) -> None:
        try:
            await self.docker.remove(container)
        except DockerError as exc:
            log.warning(
                "task_container_not_removed",
                container=container[:12],
                reason=exc.message,
                **context,
            )

    # -- the per-service task lock ------------------------------------------------------

    async def _lock(self, record: TaskRecord, adopt: bool = False) -> None:
        held = await self.store.locks.take(
            record.service,
            record.id,
            actor=record.actor,
            reason=f"a task of version {record.version}",
            ttl=LOCK_TTL,
            adopt=adopt,
        )
        if isinstance(held, LeaseKeeper):
            self._leases[record.id] = held
            return
        if adopt:  # it runs already: nothing to refuse
            log.warning("task_lock_held_elsewhere", holder=held.holder)
            return
        raise TaskRejectedError(
            409,
            f"Service {record.service!r} is running task {held.holder} ({held.reason}, by "
            f"{held.actor or 'unknown'}, since {held.since:%Y-%m-%d %H:%M:%S} UTC), and its policy "
            "forbids overlapping tasks (exclusive_tasks); wait for it to finish "
            f"(GET /v1/services/{record.service}/tasks/{held.holder}?follow=1), then run again.",
        )

    async def _unlock(self, record: TaskRecord) -> None:
        keeper = self._leases.pop(record.id, None)
        if keeper is None:
            return
        try:
            await keeper.revoke()
        except Exception as exc:  # the key goes with the lease's TTL anyway
            log.warning("task_lock_not_released", reason=str(exc))
