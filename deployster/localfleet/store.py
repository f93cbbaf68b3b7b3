"""The registry on disk: what fleet keeps in etcd, in one JSON file.

With a state directory, every change to the registry rewrites
`<state_dir>/registry.json` atomically (write a temporary file, fsync, rename),
and a restart reads it back: unit names, options, desired states, the machine
each unit was placed on, and machine metadata set through the API. Unit states
are not stored; they are rebuilt by running the units again, as fleet's agents
rebuild them after a reboot.

A file that cannot be read is an error, never silently replaced: it holds the
user's units.
"""

from __future__ import annotations

import os
import pathlib
import tempfile

import pydantic

from deployster.fleet import UnitOption

FILE_NAME = "registry.json"
FORMAT_VERSION = 1


class StateFileError(RuntimeError):
    """The registry file exists but cannot be used."""


class StoredUnit(pydantic.BaseModel):
    name: str
    options: tuple[UnitOption, ...]
    desired_state: str
    target: str | None = None


class StoredRegistry(pydantic.BaseModel):
    version: int = FORMAT_VERSION
    units: list[StoredUnit] = []
    machine_metadata: dict[str, dict[str, str]] = {}


class RegistryStore:
    def __init__(self, state_dir: pathlib.Path) -> None:
        self.path = state_dir / FILE_NAME

    def load(self) -> StoredRegistry | None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            stored = StoredRegistry.model_validate_json(text)
        except pydantic.ValidationError as exc:
            raise StateFileError(
                f"{self.path} is not a localfleet registry file; move it away to start empty: {exc}"
            ) from exc
        if stored.version != FORMAT_VERSION:
            raise StateFileError(
                f"{self.path} has format version {stored.version}, this localfleet reads {FORMAT_VERSION}"
            )
        return stored

    def save(self, registry: StoredRegistry) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = registry.model_dump_json(indent=1).encode()
        descriptor, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=f".{FILE_NAME}.")
        try:
            with os.fdopen(descriptor, "wb") as file:
                file.write(payload)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            pathlib.Path(temporary).unlink(missing_ok=True)
            raise
