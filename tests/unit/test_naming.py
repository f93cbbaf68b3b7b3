import re
from datetime import UTC, datetime

import pytest

from deployster.naming import (
    MAX_UNIT_NAME,
    InvalidNameError,
    UnitName,
    check_length,
    format_timestamp,
    parse_timestamp,
    validate_service,
    validate_timestamp,
    validate_version,
)


def test_formats_the_original_unit_name_and_ids() -> None:
    unit = UnitName.build("hello-world", "0fbb804", "2015.03.02-00.31.45", 1)
    assert str(unit) == "hello-world:0fbb804:2015.03.02-00.31.45@1.service"
    assert unit.container == "hello-world-0fbb804-2015.03.02-00.31.45-1"
    assert unit.description == "hello-world-0fbb804-2015.03.02-00.31.45"
    assert unit.release == "0fbb804:2015.03.02-00.31.45"


@pytest.mark.parametrize(
    "parts",
    [
        ("hello-world", "0fbb804", "2015.03.02-00.31.45", 1),
        ("a", "v1.2.3-rc.1", "2026.11.26-23.59.59", 12),
        ("my_svc.api", "_tag", "1999.01.01-00.00.00", 100),
    ],
)
def test_parse_and_format_round_trip(parts: tuple[str, str, str, int]) -> None:
    unit = UnitName.build(*parts)
    assert UnitName.parse(str(unit)) == unit


@pytest.mark.parametrize(
    "name",
    [
        "vulcand.service",
        "hello:v1@1.service",  # one colon: not managed
        "a:b:c:d@1.service",  # three colons
        "hello:v1:2015.03.02-00.31.45@x.service",
        "hello:v1:2015.03.02-00.31.45@1.timer",
        "hello:v1:2015.03.02-00.31.45.service",
    ],
)
def test_unmanaged_names_are_not_parsed(name: str) -> None:
    assert UnitName.parse(name) is None


def test_parse_follows_the_original_rules_for_instance_and_timestamp() -> None:
    parsed = UnitName.parse("svc:ver:2015.03.02-00.31.45@3.service")
    assert parsed == UnitName("svc", "ver", "2015.03.02-00.31.45", 3)


@pytest.mark.parametrize("bad", ["", "-svc", "svc-", "a:b", "a@b", "a b", "ä", "svc/x", "a\\b"])
def test_invalid_service_names_are_refused_with_a_sentence(bad: str) -> None:
    with pytest.raises(InvalidNameError, match="Service name"):
        validate_service(bad)


@pytest.mark.parametrize("bad", ["", ".v1", "-v1", "v:1", "v@1", "v 1", "x" * 129])
def test_invalid_versions_are_refused(bad: str) -> None:
    with pytest.raises(InvalidNameError, match="Version"):
        validate_version(bad)


@pytest.mark.parametrize("bad", ["2015-03-02", "2015.13.02-00.31.45", "2015.03.02-25.00.00", "now"])
def test_invalid_timestamps_are_refused(bad: str) -> None:
    with pytest.raises(InvalidNameError, match=re.escape("YYYY.MM.DD-HH.MM.SS")):
        validate_timestamp(bad)


def test_timestamp_layout_is_utc() -> None:
    moment = datetime(2015, 3, 2, 0, 31, 45, tzinfo=UTC)
    assert format_timestamp(moment) == "2015.03.02-00.31.45"
    assert parse_timestamp("2015.03.02-00.31.45") == moment


def test_unit_names_longer_than_systemds_limit_are_refused() -> None:
    with pytest.raises(InvalidNameError, match="255"):
        UnitName.build("s" * 120, "v" * 128, "2015.03.02-00.31.45", 1)


@pytest.mark.parametrize(
    "bad",
    [
        "\uff12\uff10\uff12\uff16.01.01-00.00.00",  # full-width digits
        "2026.01.01-00.00.0\u0663",  # an Arabic-Indic digit
        "2026.02.30-00.00.00",  # no such day
    ],
)
def test_timestamps_take_ascii_digits_of_a_real_date_only(bad: str) -> None:
    with pytest.raises(InvalidNameError):
        validate_timestamp(bad)
    with pytest.raises(InvalidNameError):
        UnitName.parse_valid(f"web:v1:{bad}@1.service")


def test_the_length_check_counts_the_largest_instance_number() -> None:
    service, stamp = "s" * 120, "2026.01.01-00.00.00"
    fits = MAX_UNIT_NAME - len(f"{service}::{stamp}@100.service")
    check_length(service, "v" * fits, stamp, 100)
    with pytest.raises(InvalidNameError, match="instance 100"):
        check_length(service, "v" * (fits + 1), stamp, 100)
    UnitName.build(service, "v" * (fits + 1), stamp, 99)


def test_a_unit_name_with_a_non_ascii_instance_is_not_managed() -> None:
    assert UnitName.parse("web:v1:2026.01.01-00.00.00@\u00b2.service") is None
    with pytest.raises(InvalidNameError, match="not a unit name"):
        UnitName.parse_valid("web:v1:2026.01.01-00.00.00@\u00b2.service")


def test_a_service_name_is_at_most_128_characters() -> None:
    assert validate_service("a" * 128) == "a" * 128
    with pytest.raises(InvalidNameError, match="at most 128"):
        validate_service("a" * 129)
