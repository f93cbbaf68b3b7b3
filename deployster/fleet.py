"""fleet v1 HTTP API client: the one place that knows fleet's wire format.

Follows `reference/fleet-api.md`: resources under ``/fleet/v1/``, every JSON key optional
(``omitempty``), pages followed through ``nextPageToken`` until it is absent, units created
then launched in two PUTs as fleetctl does, and ``{"error": {"code", "message"}}`` turned into
typed exceptions that the API layer reports as 502 with a sentence naming fleet.

The endpoint is ``unix:///var/run/fleet.sock`` (fleet's default socket), ``http://HOST:PORT``
or ``https://HOST:PORT``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
from pydantic import BaseModel, ConfigDict, Field

DesiredState = Literal["inactive", "loaded", "launched"]


class UnitOption(BaseModel):
    """One line of a unit file as fleet carries it: ``{"section", "name", "value"}``."""

    section: str
    name: str
    value: str


class _FleetModel(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore")


class Unit(_FleetModel):
    name: str
    options: list[UnitOption] = Field(default_factory=list)
    desired_state: str = Field("", alias="desiredState")
    current_state: str = Field("", alias="currentState")
    machine_id: str = Field("", alias="machineID")


class UnitState(_FleetModel):
    name: str
    hash: str = ""
    machine_id: str = Field("", alias="machineID")
    load_state: str = Field("", alias="systemdLoadState")
    active_state: str = Field("", alias="systemdActiveState")
    sub_state: str = Field("", alias="systemdSubState")


class Machine(_FleetModel):
    id: str
    primary_ip: str = Field("", alias="primaryIP")
    metadata: dict[str, str] = Field(default_factory=dict)


class FleetError(Exception):
    """fleet answered with an error or could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class FleetUnavailable(FleetError):
    """No answer from fleet: socket missing, connection refused, timeout."""


class FleetNotFound(FleetError):
    """404: the unit (or its state) does not exist."""


class FleetConflict(FleetError):
    """409: e.g. the unit already exists with the same options."""


class FleetRejected(FleetError):
    """400/415: fleet refused the request as malformed."""


_ERRORS: dict[int, type[FleetError]] = {
    400: FleetRejected,
    404: FleetNotFound,
    409: FleetConflict,
    415: FleetRejected,
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
        return [Unit.model_validate(u) async for u in self._pages("/units", "units")]

    async def get_unit(self, name: str) -> Unit:
        return Unit.model_validate(await self._request("GET", f"/units/{name}"))

    async def create_unit(self, name: str, options: list[UnitOption]) -> None:
        """Submit a unit (fleet creates it ``inactive``). 409 if it exists with these options."""
        body = {"name": name, "options": [o.model_dump() for o in options]}
        await self._request("PUT", f"/units/{name}", body)

    async def set_desired_state(self, name: str, state: DesiredState) -> None:
        await self._request("PUT", f"/units/{name}", {"name": name, "desiredState": state})

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
        return [UnitState.model_validate(s) async for s in self._pages("/state", "states", params)]

    async def list_machines(self) -> list[Machine]:
        return [Machine.model_validate(m) async for m in self._pages("/machines", "machines")]

    # -- wire --------------------------------------------------------------------------

    async def _pages(
        self, path: str, key: str, params: dict[str, str] | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        query = dict(params or {})
        while True:
            page = await self._request("GET", path, params=query)
            for item in page.get(key) or []:
                yield item
            token = page.get("nextPageToken")
            if not token:
                return
            query["nextPageToken"] = token

    async def _request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        url = self._base + path
        try:
            async with self._session.request(method, url, json=body, params=params) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    raise _error_from(resp.status, text, method, path)
                if resp.status == 204 or not text:
                    return {}
                try:
                    return dict(await resp.json(content_type=None))
                except ValueError:
                    raise FleetError(
                        f"fleet answered {method} {path} with a body that is not JSON",
                        resp.status,
                    ) from None
        except aiohttp.ClientError as exc:
            raise FleetUnavailable(f"fleet at {self.endpoint} is unreachable: {exc}") from exc
        except TimeoutError:
            raise FleetUnavailable(f"fleet at {self.endpoint} did not answer in time") from None


def _error_from(status: int, text: str, method: str, path: str) -> FleetError:
    message = ""
    try:
        message = str(json.loads(text).get("error", {}).get("message", ""))
    except (ValueError, AttributeError):
        message = text.strip()[:200]
    detail = f": {message}" if message else ""
    cls = _ERRORS.get(status, FleetError)
    return cls(f"fleet answered {method} {path} with {status}{detail}", status)
