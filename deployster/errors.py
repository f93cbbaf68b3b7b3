"""What an error means for the one who meets it: try again later, or give up with a sentence.

Every adapter at the edge (etcd, fleet, the routers, the Docker Engine API) raises its own
typed exceptions, and each of them is also one of these two:

- :class:`TemporaryError`: the outside system did not answer, or answered "not now" (a
  connection refused, a timeout, a 5xx, a transaction that lost a race). The same call may
  succeed later: the caller retries with capped backoff until its own deadline.
- :class:`PermanentError`: the request itself is wrong (a 400, a name the router refuses).
  Retrying gives the same answer: the caller fails with the exception's sentence.

kopf and controller-runtime split errors the same way; a deploy's worker decides with
:func:`is_temporary` alone, so a new adapter only has to pick a base class.
"""

from __future__ import annotations

import aetcd


class TemporaryError(Exception):
    """The outside system may answer later: retry with backoff until the deadline."""


class PermanentError(Exception):
    """Retrying cannot help: the message is the sentence to fail with."""


def is_temporary(exc: BaseException) -> bool:
    """True for a :class:`TemporaryError`, and for aetcd's own errors should one slip past a
    wrapper (each of them means etcd did not do what was asked, this time)."""
    return isinstance(exc, (TemporaryError, aetcd.ClientError)) and not isinstance(
        exc, PermanentError
    )
