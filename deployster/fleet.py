"""fleet's v1 API: its JSON shapes, defined once for both sides, and Deployster's client.

This module is the one place that knows fleet's wire format (`docs/fleet.md` §3-§5).
The shapes (`Unit`, `UnitOption`, `UnitState`, `Machine`, the three pages, the error entity and
the operation of ``PATCH /machines``) are read and written by `FleetClient` below and by
localfleet, the server (`deployster.localfleet.wire` adds only what a server needs on top: Go's
escaping and reading the first JSON value of a request body).

The shapes behave as fleet's generated Go structs do with ``encoding/json``:

- every key is optional (``omitempty``): each field defaults to empty, and `to_wire()` leaves
  empty fields out, down to ``{}`` for an empty page. The error entity is the exception: fleet
  always sends both ``code`` and ``message``, so they have no default and are never left out;
- keys are written in the order of the structs' fields, which is alphabetical;
- keys are read by their JSON names (never the Python ones), case-insensitively; unknown keys
  are ignored, ``null`` leaves a field empty, and a value of the wrong type is an error
  (`pydantic.ValidationError`).

Reading a page costs one model per unit and per option, and most of a page is options: the
instances of one release carry the same options (their number is in the name), so `decode_page`
reads each distinct list of options once per page and gives the units that share it the same
tuple. A list is shared only when its JSON is equal, key for key and value for value, and only
once it has been read without error, so a page reads exactly as it would one unit at a time.

Shapes are frozen, so a unit's options are a tuple that compares and hashes by value.
Job states are plain strings in the shapes on purpose: fleet stores the ``desiredState`` of an
existing unit without validating it (§4, 6c), so a stored state can be any string.

The client follows pages through ``nextPageToken`` until it is absent, creates units then
launches them in two PUTs as fleetctl does, and turns ``{"error": {"code", "message"}}`` into
typed exceptions that the API layer reports as 502 with a sentence naming fleet. It also
reads localfleet's one resource of its own, a unit's last journal lines (``/journal/{name}``),
to say why a unit failed; on fleet, which answers 404 there, the unit state is all there is. Its endpoint is
``unix:///var/run/fleet.sock`` (fleet's default socket), ``http://HOST:PORT`` or
``https://HOST:PORT``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any, ClassVar, Literal, TypeVar
from urllib.parse import urlsplit

import aiohttp
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from deployster.aio import cancel_and_wait
from deployster.errors import PermanentError, TemporaryError

# The fields of the rows `FleetClient.unit_rows` and `state_rows` give, in this order.
UNIT_ROW = ("name", "desired_state", "current_state", "machine_id")
STATE_ROW = ("name", "machine_id", "load_state", "active_state", "sub_state")

# fleet's JobState: the values of a unit's desiredState and currentState.
JOB_INACTIVE = "inactive"
JOB_LOADED = "loaded"
JOB_LAUNCHED = "launched"
JOB_STATES = frozenset({JOB_INACTIVE, JOB_LOADED, JOB_LAUNCHED})
DesiredState = Literal["inactive", "loaded", "launched"]


_STRINGS = {str}


class _Shape(BaseModel):
    """One of fleet's JSON objects; see the module's docstring for how it reads and writes."""

    # populate_by_name lets Python build shapes with field names (``Unit(desired_state=...)``).
    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    # The JSON key of each field, by its lower-case form; and the JSON keys themselves.
    _wire_keys: ClassVar[dict[str, str]] = {}
    _exact_keys: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        keys = [field.alias or name for name, field in cls.model_fields.items()]
        cls._wire_keys = {key.lower(): key for key in keys}
        cls._exact_keys = frozenset(keys)

    @model_validator(mode="before")
    @classmethod
    def _match_keys_like_go(cls, data: Any) -> Any:
        return cls._fold(data)

    @classmethod
    def _fold(cls, data: Any) -> Any:
        """An object's keys as this shape spells them, nulls left out."""
        if not isinstance(data, dict):
            return data
        if data.keys() <= cls._exact_keys and None not in data.values():
            return data  # fleet's own spelling, no null: nothing to fold (most objects)
        return {
            cls._wire_keys.get(key.lower(), key): value
            for key, value in data.items()
            if value is not None
        }

    @classmethod
    def rows(cls, items: Any, fields: Sequence[str], where: str) -> list[tuple[str, ...]]:
        """The values of ``fields`` (string fields, by their Python names) of each object in
        ``items`` (a page's list as JSON decoded it), as plain tuples: for a reader of the
        whole fleet. The same rules as a shape for these fields (keys of any case, null is
        empty, a value of another type is an error: ``ValueError``); other keys are skipped,
        not decoded. A tuple of strings costs a fraction of a shape, and the cyclic garbage
        collector stops tracking it. ``where`` names the list in an error."""
        if items is None:
            return []
        if not isinstance(items, list):
            raise ValueError(f"{where}: not a JSON array")
        keys = [cls.model_fields[f].alias or f for f in fields]
        blanks = [""] * len(keys)
        rows = []
        for n, item in enumerate(items):
            if not isinstance(item, dict):
                raise ValueError(f"{where}.{n}: not a JSON object")
            row = tuple(map(cls._fold(item).get, keys, blanks))
            if {*map(type, row)} != _STRINGS:
                raise ValueError(f"{where}.{n}: a value that is not a string")
            rows.append(row)
        return rows

    @model_serializer(mode="wrap")
    def _keys_in_struct_order(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return dict(sorted(handler(self).items()))

    def to_wire(self) -> dict[str, Any]:
        """This shape as fleet's JSON: aliases for keys, empty fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_defaults=True)


class UnitOption(_Shape):
    """One line of a unit file as fleet carries it: ``{"section", "name", "value"}``."""

    section: str = ""
    name: str = ""
    value: str = ""


class Unit(_Shape):
    """A submitted unit. ``currentState`` and ``machineID`` are fleet's to set; a PUT's are ignored."""

    name: str = ""
    options: tuple[UnitOption, ...] = ()
    desired_state: str = Field("", alias="desiredState")
    current_state: str = Field("", alias="currentState")
    machine_id: str = Field("", alias="machineID")

    @field_validator("options", mode="wrap")
    @classmethod
    def _options_once_per_page(
        cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
    ) -> Any:
        """Within one `decode_page`, a list of options equal to one already read is that one."""
        read = info.context.get(_OPTIONS_READ) if isinstance(info.context, dict) else None
        if read is None or not isinstance(value, list):
            return handler(value)
        try:
            key = tuple(tuple(option.items()) for option in value)
            found = read.get(key)
        except (AttributeError, TypeError):  # not objects, or a value that is not hashable
            return handler(value)
        if found is None:
            found = read[key] = handler(value)
        return found


class UnitState(_Shape):
    """What the agent of one machine reports about one unit, as systemd names it."""

    name: str = ""
    hash: str = ""
    machine_id: str = Field("", alias="machineID")
    load_state: str = Field("", alias="systemdLoadState")
    active_state: str = Field("", alias="systemdActiveState")
    sub_state: str = Field("", alias="systemdSubState")


class Machine(_Shape):
    """A machine of the cluster (localfleet presents several on one host)."""

    id: str = ""
    primary_ip: str = Field("", alias="primaryIP")
    metadata: dict[str, str] = Field(default_factory=dict)

    def short_id(self) -> str:
        return self.id[:8]

    def matches_id(self, wanted: str) -> bool:
        """fleet accepts the full id or its first 8 characters (`MachineState.MatchID`)."""
        return wanted in (self.id, self.short_id())


class _Page(_Shape):
    next_page_token: str = Field("", alias="nextPageToken")


_P = TypeVar("_P", bound=_Page)
_OPTIONS_READ = "options_read"


def decode_page(page_type: type[_P], text: str) -> _P:
    """One of fleet's pages from its JSON text; `ValueError` when the text is not JSON,
    `ValidationError` (one) when it does not fit the page."""
    return page_type.model_validate(json.loads(text), context={_OPTIONS_READ: {}})


class UnitPage(_Page):
    units: tuple[Unit, ...] = ()


class UnitStatePage(_Page):
    states: tuple[UnitState, ...] = ()


class MachinePage(_Page):
    machines: tuple[Machine, ...] = ()


class ErrorResponse(_Shape):
    code: int
    message: str


class ErrorEntity(_Shape):
    """fleet's error body, ``{"error": {"code": 409, "message": "..."}}``; ``message`` is empty for most 500s."""

    error: ErrorResponse


class MachineMetadataValue(_Shape):
    value: str = ""


class MachineMetadataOp(_Shape):
    """One JSON-Patch operation of ``PATCH /machines``; ``value`` is an object (§2, PATCH quirk)."""

    op: str = ""
    path: str = ""
    value: MachineMetadataValue = MachineMetadataValue()


class FleetError(Exception):
    """fleet answered with an error or could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class FleetUnavailableError(FleetError, TemporaryError):
    """No answer from fleet (socket missing, connection refused, timeout), a 5xx, or an
    answer that is not JSON: fleet may answer later."""


class FleetNotFoundError(FleetError, PermanentError):
    """404: the unit (or its state) does not exist."""


class FleetConflictError(FleetError, PermanentError):
    """409: e.g. the unit already exists with the same options."""


class FleetRejectedError(FleetError, PermanentError):
    """400/415 and any other 4xx: fleet refused the request as malformed."""


# A journal line longer than this is cut: a deploy's error carries several of them.
JOURNAL_LINE_MAX = 300

_ERRORS: dict[int, type[FleetError]] = {
    400: FleetRejectedError,
    404: FleetNotFoundError,
    409: FleetConflictError,
    415: FleetRejectedError,
}


class FleetClient:
    """Async client for one fleet endpoint. Use as ``async with FleetClient(endpoint) as f``."""

    def __init__(self, endpoint: str, timeout: float = 10.0) -> None:
        self.endpoint = endpoint
        parts = urlsplit(endpoint)
        connector: aiohttp.BaseConnector
        if parts.scheme == "unix":
            # The host part of the URL is ignored on a unix socket.
            connector = aiohttp.UnixConnector(path=parts.path)
            self._base = "http://fleet/fleet/v1"
        elif parts.scheme in ("http", "https") and parts.netloc:
            connector = aiohttp.TCPConnector()
            self._base = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}/fleet/v1"
        else:
            raise ValueError(
                f"fleet endpoint {endpoint!r} is not valid: use unix:///PATH, "
                "http://HOST:PORT or https://HOST:PORT"
            )
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)
        )

    async def __aenter__(self) -> FleetClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._session.close()

    # -- units -------------------------------------------------------------------------

    async def list_units(self) -> list[Unit]:
        return [unit async for page in self._pages("/units", UnitPage) for unit in page.units]

    async def unit_rows(self) -> AsyncIterator[list[tuple[str, ...]]]:
        """``(name, desiredState, currentState, machineID)`` of every unit, one page at a
        time: a whole fleet's units without decoding their options."""
        async for rows in self._rows("/units", UnitPage, Unit, UNIT_ROW):
            yield rows

    async def get_unit(self, name: str) -> Unit:
        return Unit.model_validate(await self._request("GET", f"/units/{name}"))

    async def create_unit(self, name: str, options: Sequence[UnitOption]) -> None:
        """Submit a unit (fleet creates it ``inactive``). 409 if it exists with these options."""
        await self._request(
            "PUT", f"/units/{name}", Unit(name=name, options=tuple(options)).to_wire()
        )

    async def set_desired_state(self, name: str, state: DesiredState) -> None:
        await self._request("PUT", f"/units/{name}", Unit(name=name, desired_state=state).to_wire())

    async def destroy_unit(self, name: str) -> None:
        await self._request("DELETE", f"/units/{name}")

    async def list_states(
        self, machine_id: str | None = None, unit_name: str | None = None
    ) -> list[UnitState]:
        params = {}
        if machine_id:
            params["machineID"] = machine_id
        if unit_name:
            params["unitName"] = unit_name
        return [
            state
            async for page in self._pages("/state", UnitStatePage, params)
            for state in page.states
        ]

    async def state_rows(self) -> AsyncIterator[list[tuple[str, ...]]]:
        """``(name, machineID, load, active, sub)`` of every unit state, one page at a time."""
        async for rows in self._rows("/state", UnitStatePage, UnitState, STATE_ROW):
            yield rows

    async def journal(self, name: str, lines: int = 20) -> list[str] | None:
        """The last lines of a unit's journal, where the fleet offers them (localfleet's
        ``/journal/{name}``); None where it does not (fleet, a unit loaded nowhere)."""
        try:
            body = await self._request("GET", f"/journal/{name}", params={"lines": str(lines)})
        except (FleetNotFoundError, FleetRejectedError):
            return None
        found = body.get("lines")
        if not isinstance(found, list):
            return None
        return [str(line)[:JOURNAL_LINE_MAX] for line in found]

    async def describe_failure(self, state: UnitState, lines: int = 10) -> str:
        """Why a unit failed, in a sentence a deploy can show: systemd's state, then the last
        lines of its journal where the fleet offers them, else where to read them."""
        head = f"unit {state.name} failed (systemd {state.active_state}/{state.sub_state})"
        try:
            found = await self.journal(state.name, lines)
        except FleetError:
            found = None
        if not found:
            where = f" on machine {state.machine_id[:8]}" if state.machine_id else ""
            return f"{head}; its log: fleetctl journal {state.name} (or journalctl -u {state.name}{where})"
        return f"{head}; its last log lines:\n" + "\n".join(f"  {line}" for line in found)

    async def list_machines(self) -> list[Machine]:
        return [
            machine
            async for page in self._pages("/machines", MachinePage)
            for machine in page.machines
        ]

    # -- wire --------------------------------------------------------------------------

    async def _pages(
        self, path: str, page_type: type[_P], params: dict[str, str] | None = None
    ) -> AsyncIterator[_P]:
        query = dict(params or {})
        while True:
            text = await self._send("GET", path, params=query)
            try:
                page = decode_page(page_type, text)
            except ValidationError as exc:
                raise _misfit(path, first_problem(exc)) from None
            except ValueError:
                raise _not_json(path) from None
            yield page
            if not page.next_page_token:
                return
            query["nextPageToken"] = page.next_page_token

    async def _rows(
        self, path: str, page_type: type[_Page], item: type[_Shape], fields: Sequence[str]
    ) -> AsyncIterator[list[tuple[str, ...]]]:
        """Each page's items as rows (`_Shape.rows`), following ``nextPageToken``; a page that
        does not fit is FleetUnavailableError, as in `_pages`. The next page is asked for as
        soon as its token is read, so that fleet writes it while this one is turned into rows."""
        key = next(name for name in page_type.model_fields if name != "next_page_token")
        answer = asyncio.create_task(self._send("GET", path, params={}))
        try:
            while True:
                text = await answer
                try:
                    page = page_type._fold(json.loads(text))
                except ValueError:
                    raise _not_json(path) from None
                token = page.get("nextPageToken", "") if isinstance(page, dict) else None
                if not isinstance(token, str):
                    raise _misfit(path, "not an object with a string nextPageToken")
                if token:
                    query = {"nextPageToken": token}
                    answer = asyncio.create_task(self._send("GET", path, params=query))
                try:
                    rows = item.rows(page.get(key), fields, key)
                except ValueError as exc:
                    raise _misfit(path, str(exc)) from None
                yield rows
                if not token:
                    return
        finally:
            await cancel_and_wait(answer)

    async def _request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        text = await self._send(method, path, body, params)
        if not text:
            return {}
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise FleetUnavailableError(
                f"fleet answered {method} {path} with a body that is not JSON"
            )
        return value

    async def _send(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
    ) -> str:
        """The body of fleet's answer, empty for a 204; a FleetError for an error."""
        url = self._base + path
        try:
            async with self._session.request(method, url, json=body, params=params) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    raise _error_from(resp.status, text, method, path)
                return "" if resp.status == 204 else text
        except aiohttp.ClientError as exc:
            raise FleetUnavailableError(f"fleet at {self.endpoint} is unreachable: {exc}") from exc
        except TimeoutError:
            raise FleetUnavailableError(
                f"fleet at {self.endpoint} did not answer in time"
            ) from None


def _misfit(path: str, problem: str) -> FleetUnavailableError:
    return FleetUnavailableError(
        f"fleet answered GET {path} with a page that does not fit fleet's schema: {problem}"
    )


def _not_json(path: str) -> FleetUnavailableError:
    return FleetUnavailableError(f"fleet answered GET {path} with a body that is not JSON")


def first_problem(exc: ValidationError) -> str:
    """Like Go's decoder, name the first problem only: `options.0.name: Input should be a valid string`."""
    error = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {error['msg']}" if where else error["msg"]


def _error_from(status: int, text: str, method: str, path: str) -> FleetError:
    try:
        message = ErrorEntity.model_validate_json(text).error.message
    except ValidationError:
        message = text.strip()[:200]
    detail = f": {message}" if message else ""
    cls = _ERRORS.get(status, FleetUnavailableError if status >= 500 else FleetRejectedError)
    return cls(f"fleet answered {method} {path} with {status}{detail}", status)
