"""fleet's JSON shapes read as Go's encoding/json reads them, one page at a time (`decode_page`)."""

from __future__ import annotations

import json
from typing import Any

import hypothesis
import pydantic
import pytest
from hypothesis import strategies as st

from deployster.fleet import Machine, MachinePage, Unit, UnitOption, UnitPage, decode_page


def test_keys_are_read_case_insensitively_the_last_spelling_winning() -> None:
    text = json.dumps(
        {
            "UNITS": [
                {
                    "Name": "a.service",
                    "OPTIONS": [{"SECTION": "Service", "Name": "ExecStart", "vAlUe": "/bin/true"}],
                    "desiredstate": "launched",
                    "MachineId": "m1",
                    "currentState": "loaded",
                    "CURRENTSTATE": "launched",
                }
            ],
            "NextPageToken": "t",
        }
    )
    page = decode_page(UnitPage, text)
    assert page.next_page_token == "t"
    assert page.units == (
        Unit(
            name="a.service",
            options=(UnitOption(section="Service", name="ExecStart", value="/bin/true"),),
            desired_state="launched",
            current_state="launched",
            machine_id="m1",
        ),
    )


@pytest.mark.parametrize(
    "text",
    [
        '{"units": [{"name": "a.service", "color": "red", "options": null, "machineID": null}]}',
        '{"units": [{"name": "a.service", "machineID": null}], "nextPageToken": null}',
        '{"units": [{"name": "a.service", "options": [{"section": null, "value": null}]}]}',
    ],
)
def test_unknown_keys_are_ignored_and_null_leaves_a_field_empty(text: str) -> None:
    (unit,) = decode_page(UnitPage, text).units
    assert unit.name == "a.service" and unit.machine_id == ""
    assert unit.options in ((), (UnitOption(),))


def test_metadata_keys_are_data_not_folded() -> None:
    text = '{"machines": [{"id": "m1", "Metadata": {"Disk": "ssd", "name": "x"}}]}'
    (machine,) = decode_page(MachinePage, text).machines
    assert machine == Machine(id="m1", metadata={"Disk": "ssd", "name": "x"})


@pytest.mark.parametrize(
    "text",
    [
        '{"units": [{"name": 1}]}',
        '{"units": [{"name": "a", "options": [{"value": ["x"]}]}]}',
        '{"units": [{"name": "a", "options": "ExecStart=/bin/true"}]}',
        '{"units": {"name": "a"}}',
        '{"units": ["a.service"]}',
        "[]",
        '{"nextPageToken": 3}',
    ],
)
def test_a_wrong_type_is_an_error(text: str) -> None:
    with pytest.raises(pydantic.ValidationError):
        decode_page(UnitPage, text)


@pytest.mark.parametrize("text", ["", '{"units": [', "<html>502</html>", '{"units": []} {}'])
def test_text_that_is_not_json_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        decode_page(UnitPage, text)


def test_units_with_equal_options_share_them_and_others_do_not() -> None:
    options = [{"section": "Service", "name": "ExecStart", "value": "/bin/true"}]
    other = [{"section": "Service", "value": "ExecStart", "name": "/bin/true"}]  # same values
    text = json.dumps(
        {
            "units": [
                {"name": "a@1.service", "options": options},
                {"name": "a@2.service", "options": options},
                {"name": "b.service", "options": other},
            ]
        }
    )
    a1, a2, b = decode_page(UnitPage, text).units
    assert a1.options is a2.options
    assert b.options == (UnitOption(section="Service", name="/bin/true", value="ExecStart"),)


# Any page, garbage included: a page reads as its units would one at a time.

KEYS = ["name", "NAME", "Name", "options", "Options", "desiredState", "DESIREDSTATE", "machineID"]
OPTION_KEYS = ["section", "Section", "name", "NAME", "value", "VALUE", "other"]
VALUES = st.one_of(
    st.sampled_from(["", "a", "ExecStart", "/bin/true"]),
    st.none(),
    st.integers(0, 2),
    st.booleans(),
)
OPTION = st.one_of(
    st.dictionaries(st.sampled_from(OPTION_KEYS), VALUES, max_size=4), st.none(), VALUES
)
OPTIONS = st.one_of(st.lists(OPTION, max_size=3), VALUES)
UNIT = st.dictionaries(
    st.sampled_from(KEYS), st.one_of(VALUES, OPTIONS, st.lists(OPTION, max_size=2)), max_size=5
)


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(st.lists(st.one_of(UNIT, st.sampled_from([{"options": []}])), max_size=6))
def test_a_page_reads_as_its_units_one_at_a_time(units: list[dict[str, Any]]) -> None:
    # The same lists of options appear several times, as on a real page.
    text = json.dumps({"units": units + units})
    try:
        expected: Any = UnitPage.model_validate(json.loads(text))
    except pydantic.ValidationError as exc:
        expected = exc.errors(include_url=False)
    try:
        got: Any = decode_page(UnitPage, text)
    except pydantic.ValidationError as exc:
        got = exc.errors(include_url=False)
    assert got == expected
