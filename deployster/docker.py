"""The Docker Engine API: the one place that knows its wire format (tasks run through it).

Deployster speaks the versioned API (``/v1.41``, which Docker and podman's compatible service
both answer) over a unix socket (``unix:///var/run/docker.sock``, the default) or TCP
(``http://HOST:PORT``, ``tcp://HOST:PORT``). What the wire needs and this module handles:

- **Pulls answer 200 even when they fail**: ``POST /images/create`` streams JSON progress
  messages, and a failure is a message with ``error`` / ``errorDetail`` (`docs/
  containers.md` §6.4). :class:`PullStream` reads the stream and raises :class:`PullError`.
- **Output is framed** when the container has no TTY: each frame is an 8-byte header (the
  stream, 1 = stdout and 2 = stderr, three zero bytes, the payload size as a big-endian
  uint32) and the payload; a frame may span HTTP chunks, and a chunk may hold many frames
  (§6.2). :class:`FrameDecoder` turns chunks into :class:`Frame` objects.
- **podman's deviations** (§7): a kill of a container that is no longer running is a 500 (409
  on Docker), ``AutoRemove`` is not to be trusted, and a pull from a registry it does not know
  is a 200 with an error message. The calls below accept either engine's answer.

Errors come out typed: :class:`DockerUnreachableError` (no engine at the endpoint),
:class:`DockerNotFoundError` (404), :class:`PullError`, and :class:`DockerError` for any other failure;
each message is a sentence fragment that names the engine's own words.
"""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from deployster.errors import PermanentError, TemporaryError

API_VERSION = "1.41"
DEFAULT_ENDPOINT = "unix:///var/run/docker.sock"
STDOUT, STDERR = 1, 2
# Calls that answer at once get this long; following logs and waiting for an exit get no
# limit (a task runs up to its own timeout, which the caller enforces), and neither does a
# pull, as long as the engine keeps sending progress.
CALL_TIMEOUT = 60.0
PULL_IDLE_TIMEOUT = 300.0


class DockerError(Exception):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class DockerUnreachableError(DockerError, TemporaryError):
    """Nothing answers at the endpoint (yet)."""


class DockerNotFoundError(DockerError, PermanentError):
    """The engine answered 404: no such container or image."""


class PullError(DockerError, PermanentError):
    """The pull stream reported an error (its HTTP status was 200)."""


# -- wire formats -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    stream: int  # STDOUT or STDERR
    data: bytes


class FrameDecoder:
    """Turns the chunks of a non-TTY output stream into frames, whatever the chunk borders."""

    HEADER = struct.Struct(">BxxxL")

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, chunk: bytes) -> list[Frame]:
        self._buffer += chunk
        frames: list[Frame] = []
        offset = 0
        size = self.HEADER.size
        while len(self._buffer) - offset >= size:
            stream, length = self.HEADER.unpack_from(self._buffer, offset)
            end = offset + size + length
            if len(self._buffer) < end:
                break
            frames.append(Frame(stream, bytes(self._buffer[offset + size : end])))
            offset = end
        del self._buffer[:offset]
        return frames

    @property
    def pending(self) -> int:
        """Bytes of a frame not yet complete (non-zero at the end means a cut stream)."""
        return len(self._buffer)


class PullStream:
    """Reads the JSON messages of a pull and raises :class:`PullError` on an error message.

    Docker separates the messages with ``\\r\\n``, podman with ``\\n``; this reads consecutive
    JSON values, so either works, across chunk borders.
    """

    _decoder = json.JSONDecoder()

    def __init__(self) -> None:
        self._text = ""
        self._bytes = b""
        self.last_status = ""

    def feed(self, chunk: bytes) -> None:
        data = self._bytes + chunk
        try:
            text = data.decode()
            self._bytes = b""
        except UnicodeDecodeError as exc:  # a multi-byte character cut by the chunk border
            text, self._bytes = data[: exc.start].decode(), data[exc.start :]
        self._text += text
        while True:
            stripped = self._text.lstrip()
            if not stripped:
                self._text = ""
                return
            try:
                message, end = self._decoder.raw_decode(stripped)
            except ValueError:
                self._text = stripped  # incomplete: wait for the next chunk
                return
            self._text = stripped[end:]
            self._check(message)

    def finish(self) -> None:
        if self._text.strip() or self._bytes:
            raise PullError(
                f"the pull stream ended in the middle of a message: {self._text[:200]!r}"
            )

    def _check(self, message: Any) -> None:
        if not isinstance(message, dict):
            return
        detail = message.get("errorDetail")
        error = message.get("error") or (
            detail.get("message") if isinstance(detail, dict) else None
        )
        if error:
            raise PullError(str(error))
        if isinstance(message.get("status"), str):
            self.last_status = message["status"]


def split_image(image: str) -> tuple[str, str]:
    """``fromImage`` and ``tag`` of a pull: ``host:5000/repo:v1`` -> (``host:5000/repo``, ``v1``).

    A digest reference (``repo@sha256:...``) is pulled as it is, with no tag.
    """
    if "@" in image:
        return image, ""
    repo, colon, tag = image.rpartition(":")
    if not colon or "/" in tag:  # the colon was a registry's port, not a tag
        return image, "latest"
    return repo, tag


@dataclass(frozen=True)
class ContainerSpec:
    """What a task container is created with (``POST /containers/create``)."""

    image: str
    cmd: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict, repr=False)  # values may be secrets
    labels: Mapping[str, str] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {
            "Image": self.image,
            "Cmd": list(self.cmd),
            "Env": [f"{key}={value}" for key, value in self.env.items()],
            "Labels": dict(self.labels),
            # No TTY: stdout and stderr arrive framed and apart, as they were written.
            "Tty": False,
            "AttachStdout": True,
            "AttachStderr": True,
            "OpenStdin": False,
            # AutoRemove is not trusted (podman reports exit 0 with it); the caller removes.
            "HostConfig": {"AutoRemove": False},
        }


@dataclass(frozen=True)
class ContainerSummary:
    """One entry of ``GET /containers/json``."""

    id: str
    names: tuple[str, ...]
    state: str  # created, running, exited, ...
    labels: Mapping[str, str]

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> ContainerSummary:
        return cls(
            id=str(data.get("Id", "")),
            names=tuple(n.lstrip("/") for n in data.get("Names") or ()),
            state=str(data.get("State", "")),
            labels=dict(data.get("Labels") or {}),
        )


@dataclass(frozen=True)
class ExitStatus:
    code: int
    error: str = ""  # the engine's State.Error, empty when the process simply ended


def _error_message(body: bytes) -> str:
    """The engine's sentence: Docker sends ``{"message"}``, podman also ``cause``."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode(errors="replace").strip() or "no message"
    if isinstance(data, dict) and data.get("message"):
        return str(data["message"])
    return body.decode(errors="replace").strip()


# -- the client -------------------------------------------------------------------------------


def parse_endpoint(endpoint: str) -> tuple[str | None, str]:
    """The unix socket's path (None over TCP) and the base URL of requests; ValueError with a
    sentence for an endpoint of another form."""
    url = urlsplit(endpoint)
    if url.scheme == "unix" and url.path:
        return url.path, "http://docker"  # the host is ignored on a unix socket
    if url.scheme in ("http", "tcp") and url.hostname:
        return None, f"http://{url.netloc}"
    if url.scheme == "https" and url.hostname:
        return None, f"https://{url.netloc}"
    raise ValueError(
        f"The Docker endpoint {endpoint!r} is not valid: use unix:///PATH, "
        "http://HOST:PORT (or tcp://HOST:PORT) or https://HOST:PORT."
    )


class DockerClient:
    """A Docker Engine API client for the calls tasks need."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT) -> None:
        socket, base = parse_endpoint(endpoint)
        self._connector: aiohttp.BaseConnector = (
            aiohttp.UnixConnector(path=socket) if socket else aiohttp.TCPConnector()
        )
        self.endpoint = endpoint
        self._base = f"{base}/v{API_VERSION}"
        # No session-wide deadline: each call sets its own.
        self._session = aiohttp.ClientSession(
            connector=self._connector, timeout=aiohttp.ClientTimeout(total=None)
        )

    async def close(self) -> None:
        await self._session.close()

    async def _call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        ok: Sequence[int] = (200,),
    ) -> bytes:
        try:
            async with self._session.request(
                method,
                self._base + path,
                params=params,
                json=body,
                timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT),
            ) as response:
                data = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._unreachable(exc) from exc
        if status in ok:
            return data
        message = _error_message(data)
        if status == 404:
            raise DockerNotFoundError(message, status)
        raise DockerError(message, status)

    def _unreachable(self, exc: BaseException) -> DockerUnreachableError:
        if isinstance(exc, TimeoutError):
            return DockerUnreachableError(
                f"the Docker engine at {self.endpoint} did not answer in time"
            )
        return DockerUnreachableError(
            f"the Docker engine at {self.endpoint} cannot be reached ({exc})"
        )

    async def ping(self) -> None:
        await self._call("GET", "/_ping")

    async def pull(self, image: str) -> str:
        """Pull ``image``; returns the last status line ("Download complete", ...)."""
        repo, tag = split_image(image)
        params = {"fromImage": repo, **({"tag": tag} if tag else {})}
        stream = PullStream()
        try:
            async with self._session.post(
                self._base + "/images/create",
                params=params,
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_read=PULL_IDLE_TIMEOUT, sock_connect=CALL_TIMEOUT
                ),
            ) as response:
                if response.status != 200:
                    message = _error_message(await response.read())
                    raise PullError(message, response.status)
                async for chunk in response.content.iter_any():
                    stream.feed(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._unreachable(exc) from exc
        stream.finish()
        return stream.last_status

    async def image_entrypoint(self, image: str) -> list[str]:
        """The image's ENTRYPOINT (empty when it has none)."""
        data = json.loads(await self._call("GET", f"/images/{image}/json"))
        return list((data.get("Config") or {}).get("Entrypoint") or [])

    async def create(self, name: str, spec: ContainerSpec) -> str:
        data = await self._call(
            "POST", "/containers/create", params={"name": name}, body=spec.to_wire(), ok=(201,)
        )
        return str(json.loads(data)["Id"])

    async def start(self, container: str) -> None:
        # 304: already started, which is what was asked.
        await self._call("POST", f"/containers/{container}/start", ok=(204, 304))

    async def logs(self, container: str) -> AsyncIterator[Frame]:
        """Follow stdout and stderr from the start until the container exits."""
        decoder = FrameDecoder()
        params = {"follow": "1", "stdout": "1", "stderr": "1"}
        try:
            async with self._session.get(
                f"{self._base}/containers/{container}/logs",
                params=params,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=CALL_TIMEOUT),
            ) as response:
                if response.status != 200:
                    message = _error_message(await response.read())
                    raise (DockerNotFoundError if response.status == 404 else DockerError)(
                        message, response.status
                    )
                async for chunk in response.content.iter_any():
                    for frame in decoder.feed(chunk):
                        yield frame
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._unreachable(exc) from exc

    async def wait(self, container: str) -> ExitStatus:
        """Wait until the container is not running; its exit code and the engine's error."""
        try:
            async with self._session.post(
                f"{self._base}/containers/{container}/wait",
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=CALL_TIMEOUT),
            ) as response:
                body = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._unreachable(exc) from exc
        if status != 200:
            raise (DockerNotFoundError if status == 404 else DockerError)(
                _error_message(body), status
            )
        data = json.loads(body)
        error = data.get("Error") or {}
        return ExitStatus(
            int(data["StatusCode"]),
            str(error.get("Message") or "") if isinstance(error, dict) else "",
        )

    async def kill(self, container: str) -> None:
        """SIGKILL; a container that already stopped is not an error (Docker 409, podman 500)."""
        try:
            await self._call("POST", f"/containers/{container}/kill", ok=(204,))
        except DockerError as exc:
            if exc.status in (409, 500) and "running" in exc.message:
                return
            raise

    async def remove(self, container: str) -> None:
        """Force-remove (kills it if it still runs); a container that is gone is not an error."""
        try:
            await self._call(
                "DELETE", f"/containers/{container}", params={"force": "1"}, ok=(200, 204)
            )
        except DockerNotFoundError:
            return

    async def list_containers(self, labels: Mapping[str, str]) -> list[ContainerSummary]:
        """Every container, running or not, that carries all of ``labels``."""
        filters = {"label": [f"{key}={value}" for key, value in labels.items()]}
        data = await self._call(
            "GET", "/containers/json", params={"all": "1", "filters": json.dumps(filters)}
        )
        return [ContainerSummary.from_wire(item) for item in json.loads(data)]
