"""The Docker Engine API's wire formats: output frames and pull streams (docs/containers.md
§6.2, §6.4), split at every possible chunk border."""

from __future__ import annotations

import struct

import pytest

from deployster.docker import (
    STDERR,
    STDOUT,
    ContainerSpec,
    Frame,
    FrameDecoder,
    PullError,
    PullStream,
    split_image,
)

# Captured from podman for `echo out1; echo err1 >&2; ...; echo out2` (containers.md §6.2).
CAPTURED = bytes.fromhex(
    "01000000000000056f7574310a0200000000000005657272310a01000000000000056f7574320a"
)
EXPECTED = [Frame(STDOUT, b"out1\n"), Frame(STDERR, b"err1\n"), Frame(STDOUT, b"out2\n")]


def frame(stream: int, payload: bytes) -> bytes:
    return struct.pack(">BxxxL", stream, len(payload)) + payload


def decode(chunks: list[bytes]) -> tuple[list[Frame], int]:
    decoder = FrameDecoder()
    frames = [f for chunk in chunks for f in decoder.feed(chunk)]
    return frames, decoder.pending


def test_captured_stream_in_one_chunk() -> None:
    assert decode([CAPTURED]) == (EXPECTED, 0)


@pytest.mark.parametrize("border", range(1, len(CAPTURED)))
def test_frames_split_at_any_border(border: int) -> None:
    assert decode([CAPTURED[:border], CAPTURED[border:]]) == (EXPECTED, 0)


def test_one_byte_at_a_time() -> None:
    assert decode([CAPTURED[i : i + 1] for i in range(len(CAPTURED))]) == (EXPECTED, 0)


def test_empty_payload_and_both_streams() -> None:
    stream = frame(STDOUT, b"") + frame(STDERR, b"e") + frame(STDOUT, b"")
    assert decode([stream]) == ([Frame(STDOUT, b""), Frame(STDERR, b"e"), Frame(STDOUT, b"")], 0)


def test_large_frame_over_many_chunks() -> None:
    payload = bytes(range(256)) * 1000  # 256 kB, header bytes inside the payload included
    data = frame(STDERR, payload) + frame(STDOUT, b"after")
    chunks = [data[i : i + 4093] for i in range(0, len(data), 4093)]
    assert decode(chunks) == ([Frame(STDERR, payload), Frame(STDOUT, b"after")], 0)


def test_a_cut_stream_leaves_bytes_pending() -> None:
    frames, pending = decode([CAPTURED[:-2]])
    assert frames == EXPECTED[:2]
    assert pending == len(CAPTURED) - 2 - 26


def test_payload_size_is_big_endian() -> None:
    payload = b"x" * 0x0102
    assert decode([frame(STDOUT, payload)]) == ([Frame(STDOUT, payload)], 0)
    assert frame(STDOUT, payload)[:8] == b"\x01\x00\x00\x00\x00\x00\x01\x02"


# -- pulls --------------------------------------------------------------------------------

# podman's answer to a pull it cannot do: HTTP 200 and one JSON line (containers.md §6.4).
OFFLINE = (
    b'{"progressDetail":{},"errorDetail":{"message":"initializing source docker://alpine:3.19: '
    b'pinging container registry registry-1.docker.io: dial tcp: lookup registry-1.docker.io: no such host"},'
    b'"error":"initializing source docker://alpine:3.19: pinging container registry registry-1.docker.io: '
    b'dial tcp: lookup registry-1.docker.io: no such host"}\n'
)
PROGRESS = (
    b'{"status":"Pulling fs layer","progressDetail":{},"id":"a1b2"}\r\n'
    b'{"status":"Download complete","progressDetail":{},"id":"a1b2"}\r\n'
    b'{"status":"Digest: sha256:0123"}\n'
    b'{"status":"Status: Downloaded newer image for acme/hello:v1"}\n'
)


def pull(chunks: list[bytes]) -> str:
    stream = PullStream()
    for chunk in chunks:
        stream.feed(chunk)
    stream.finish()
    return stream.last_status


def test_pull_error_line_raises_with_the_engines_words() -> None:
    with pytest.raises(PullError, match="no such host"):
        pull([OFFLINE])


def test_error_detail_alone_is_an_error() -> None:
    with pytest.raises(PullError, match="manifest unknown"):
        pull([b'{"status":"Pulling"}\n{"errorDetail":{"message":"manifest unknown"}}\n'])


@pytest.mark.parametrize("border", range(1, len(PROGRESS), 7))
def test_progress_split_anywhere_is_a_success(border: int) -> None:
    assert (
        pull([PROGRESS[:border], PROGRESS[border:]])
        == "Status: Downloaded newer image for acme/hello:v1"
    )


@pytest.mark.parametrize("border", range(1, len(OFFLINE), 11))
def test_error_split_anywhere_is_found(border: int) -> None:
    with pytest.raises(PullError):
        pull([PROGRESS, OFFLINE[:border], OFFLINE[border:]])


def test_multibyte_character_split_between_chunks() -> None:
    line = '{"status":"Pulling ü"}\n'.encode()
    cut = line.index("ü".encode()) + 1
    assert pull([line[:cut], line[cut:]]) == "Pulling ü"


def test_a_stream_cut_inside_a_message_is_an_error() -> None:
    with pytest.raises(PullError, match="ended in the middle"):
        pull([PROGRESS, b'{"status":"Extrac'])


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        ("deployster/hello:v1", ("deployster/hello", "v1")),
        ("127.0.0.1:5000/acme/hello:v1", ("127.0.0.1:5000/acme/hello", "v1")),
        ("127.0.0.1:5000/acme/hello", ("127.0.0.1:5000/acme/hello", "latest")),
        ("hello", ("hello", "latest")),
        ("acme/hello@sha256:" + "a" * 64, ("acme/hello@sha256:" + "a" * 64, "")),
    ],
)
def test_split_image(image: str, expected: tuple[str, str]) -> None:
    assert split_image(image) == expected


def test_container_spec_wire_form() -> None:
    wire = ContainerSpec(
        image="r/s:v", cmd=["sh", "-c", "x"], env={"A": "1=2"}, labels={"l": "v"}
    ).to_wire()
    assert wire["Cmd"] == ["sh", "-c", "x"]
    assert wire["Env"] == ["A=1=2"]
    assert wire["Tty"] is False and wire["AttachStdout"] and wire["AttachStderr"]
    assert wire["HostConfig"] == {"AutoRemove": False}
