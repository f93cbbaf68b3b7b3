"""deployctl's pieces for following deploys: the SSE parser and the tables."""

from deployster.ctl import SseParser, progress_line, releases_table, status_text


def feed_all(parser: SseParser, text: str) -> list[dict[str, str]]:
    return [e for line in text.splitlines(keepends=True) if (e := parser.feed(line)) is not None]


def test_sse_events_with_ids_comments_and_multiline_data() -> None:
    stream = (
        ": ping\r\n\r\n"
        'id: 1\r\nevent: planned\r\ndata: {"a": 1}\r\n\r\n'
        "data: line one\ndata:line two\n\n"
        "event: ignored-without-data\n\n"
    )
    events = feed_all(SseParser(), stream)
    assert events == [
        {"id": "1", "event": "planned", "data": '{"a": 1}'},
        {"data": "line one\nline two"},
    ]


def test_sse_event_split_across_reads_is_assembled_once_complete() -> None:
    parser = SseParser()
    assert parser.feed("id: 7\n") is None
    assert parser.feed("data: x\n") is None
    assert parser.feed("\n") == {"id": "7", "data": "x"}


def test_progress_line_shows_the_time_since_the_first_event() -> None:
    first = {"at": "2026-11-26T12:00:00Z", "kind": "planned", "message": "3 instance(s) of v2"}
    later = {"at": "2026-11-26T12:00:02.5Z", "kind": "routed", "message": "all routed"}
    started = 1795694400.0  # 2026-11-26T12:00:00Z
    assert progress_line(first, started) == "[+   0.0s] planned: 3 instance(s) of v2"
    assert progress_line(later, started) == "[+   2.5s] routed: all routed"
    assert progress_line({"kind": "x", "message": "y"}, started) == "[        ] x: y"


def test_progress_line_indents_log_lines_and_prints_them_once() -> None:
    reason = "unit web@1.service failed (systemd failed/failed); its last log lines:\n  sh[7]: boom"
    rolling = {"kind": "rolling_back", "message": reason}
    assert progress_line(rolling, None) == (
        "[        ] rolling_back: unit web@1.service failed (systemd failed/failed); "
        "its last log lines:\n             sh[7]: boom"
    )
    rolled = {"kind": "rolled_back", "message": reason}
    assert progress_line(rolled, None, previous=reason) == (
        "[        ] rolled_back: unit web@1.service failed (systemd failed/failed); "
        "its last log lines: (log lines above)"
    )
    # A one-line message that repeats is printed whole.
    assert progress_line({"kind": "b", "message": "same"}, None, "same") == "[        ] b: same"


def test_releases_table_marks_the_live_release() -> None:
    deploys = [
        {
            "id": "d3",
            "version": "v3",
            "state": "rolled_back",
            "source": "api",
            "created_at": "2026-11-26T12:03:00Z",
            "units": ["a"],
            "error": "instance a failed",
        },
        {
            "id": "d2",
            "version": "v2",
            "state": "succeeded",
            "source": "rollback",
            "created_at": "2026-11-26T12:02:00Z",
            "units": ["a", "b"],
            "error": None,
        },
        {
            "id": "d1",
            "version": "v1",
            "state": "succeeded",
            "source": "api",
            "created_at": "2026-11-26T12:01:00Z",
            "units": ["a", "b"],
            "error": None,
        },
    ]
    lines = releases_table(deploys).splitlines()
    assert lines[0].split() == [
        "Deploy",
        "Version",
        "State",
        "Source",
        "Created",
        "Instances",
        "Error",
    ]
    assert lines[1].split() == [
        "d3",
        "v3",
        "rolled_back",
        "api",
        "2026-11-26",
        "12:03:00",
        "1",
        "instance",
        "a",
        "failed",
    ]
    assert lines[2].startswith("*") and lines[2].split()[1:4] == ["d2", "v2", "succeeded"]
    assert not lines[3].startswith("*")


def test_status_text_with_and_without_instances() -> None:
    services = [
        {
            "name": "web",
            "live": {"version": "v2"},
            "latest_deploy": {"id": "d2", "version": "v2", "state": "succeeded"},
            "instances": [
                {
                    "unit": "u1",
                    "url": "http://h:1",
                    "healthy": True,
                    "routed": True,
                    "last_probe": "HTTP 200 in 3 ms",
                },
                {
                    "unit": "u2",
                    "url": "http://h:2",
                    "healthy": False,
                    "routed": False,
                    "last_probe": "connection refused",
                },
            ],
        },
        {
            "name": "api",
            "live": None,
            "latest_deploy": {"id": "d9", "version": "v1", "state": "failed"},
            "instances": [],
        },
    ]
    short = status_text(services, detail=False).splitlines()
    assert [line.split() for line in short[1:]] == [
        ["web", "v2", "d2", "(v2)", "succeeded", "1/2"],
        ["api", "-", "d9", "(v1)", "failed", "0/0"],
    ]
    detail = status_text(services[:1], detail=True)
    assert "u2    http://h:2  no       no      connection refused\n" in detail


def test_releases_table_keeps_a_failed_units_log_lines_on_its_row() -> None:
    error = "unit a failed (systemd failed/failed); its last log lines:\n  sh[7]: boom\n  done"
    deploys = [{"id": "d1", "version": "v1", "state": "rolled_back", "error": error}]
    lines = releases_table(deploys).splitlines()
    assert len(lines) == 2
    assert lines[1].endswith("its last log lines: | sh[7]: boom | done")
