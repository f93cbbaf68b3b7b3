"""A deploy record's progress events are capped: the record never grows without bound."""

from deployster.records import MAX_EVENTS, DeployRecord


def test_events_keep_the_newest_and_count_the_dropped() -> None:
    record = DeployRecord(
        id="d1",
        service="web",
        version="v1",
        timestamp="2026.01.01-00.00.00",
        instance_count=100,
        destroy_previous=True,
    )
    small = len(record.model_dump_json())
    for n in range(MAX_EVENTS + 50):
        record.note("instance_ready", f"instance {n} answers its health check " + "x" * 100)
    assert len(record.events) == MAX_EVENTS
    assert record.events_dropped == 50
    assert [e.seq for e in record.events] == list(range(51, MAX_EVENTS + 51))
    assert record.public()["events_dropped"] == 50
    for _ in range(1000):
        record.note("routed", "y" * 100)
    assert record.events[-1].seq == MAX_EVENTS + 1050  # SSE ids keep counting every event
    assert len(record.model_dump_json()) < small + MAX_EVENTS * 400
