"""Release rules, in one place: which deploy is live and which one a rollback returns to.

Pure functions over deploy records (or their summaries), oldest first, as the store lists
them. The deploy handler, the reaper (which never prunes these two), the webhooks handler
(latest wins against the live version), the rollback route and the services list all ask
here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

from deployster.records import DeployState


class Release(Protocol):
    @property
    def state(self) -> DeployState: ...

    @property
    def version(self) -> str: ...


R = TypeVar("R", bound=Release)


def live_release(records: Sequence[R]) -> R | None:
    """The newest deploy that succeeded: what the service runs now."""
    return next((r for r in reversed(records) if r.state is DeployState.SUCCEEDED), None)


def rollback_target(records: Sequence[R]) -> R | None:
    """The release to roll back to: the last successful deploy before the live one whose
    version differs from it."""
    succeeded = [r for r in records if r.state is DeployState.SUCCEEDED]
    if not succeeded:
        return None
    live = succeeded[-1]
    return next((r for r in reversed(succeeded[:-1]) if r.version != live.version), None)
