"""Deployster's key layout in etcd: every key it writes or reads, in one place.

All keys live under the server's ``--etcd-prefix`` (``/deployster`` by default):

| key | value | written by |
|---|---|---|
| ``deploys/<service>/<deploy-id>`` | a deploy record (JSON) | the deploy worker |
| ``unfinished/<service>/<deploy-id>`` | empty: the deploy is unfinished (index of ``deploys/``) | with its record, in one transaction |
| ``indexes/unfinished`` | when the index of unfinished deploys was built over older records | the first server to start |
| ``locks/<service>`` | who holds the service's deploy lock, on the holder's lease | the deploy worker |
| ``services/<service>/policy`` | the service's policy (only the fields set) | the policy API |
| ``webhooks/seen/<key>`` | a delivery or push already handled, on a 24 h lease | webhooks |
| ``webhooks/queued/<service>`` | the push waiting to deploy the service (latest wins) | webhooks |
| ``webhooks/callbacks/<service>/<deploy-id>`` | the Docker Hub callback of a push's deploy | the deploy worker |
| ``tasks/<service>/<task-id>`` | a one-off task's record | tasks |
| ``task-locks/<service>`` | the lock of an exclusive task, on its lease | tasks |
| ``notifications/pending/<id>`` | a notification not yet delivered | the notifier |
| ``notifications/outcomes/<service>/<time>-<id>`` | the last deliveries' outcomes | the notifier |
| ``servers/<server-id>`` | a live server (who owns which service follows from these) | each server, on its lease |
| ``instances/<service>/<version>:<timestamp>/<n>`` | an instance's announcement | the unit itself |

The router's keys (vulcand's, Traefik's) are the router's wire format and live with its adapter
in ``deployster.routers``. Functions here return ``str``; callers encode for etcd. A prefix
(ending with ``/``) covers what is below it and nothing beside it: ``deploys/a/`` never
matches ``deploys/ab/...``.
"""

from __future__ import annotations

from deployster.naming import InvalidNameError, UnitName, validate_service


def _base(prefix: str) -> str:
    return prefix.rstrip("/")


# -- deploys and their locks --------------------------------------------------------------


def deploys_prefix(prefix: str, service: str | None = None) -> str:
    """Every deploy record, or one service's, ending with ``/``."""
    base = f"{_base(prefix)}/deploys/"
    return base if service is None else f"{base}{service}/"


def deploy_key(prefix: str, service: str, deploy_id: str) -> str:
    return f"{deploys_prefix(prefix, service)}{deploy_id}"


def parse_deploy_key(prefix: str, key: str) -> tuple[str, str] | None:
    """(service, deploy id) of a deploy key; None for any other key."""
    return _service_and_id(deploys_prefix(prefix), key)


def unfinished_prefix(prefix: str) -> str:
    """The index of unfinished deploys: one empty key per deploy not finished, written and
    deleted in the same transaction as its record."""
    return f"{_base(prefix)}/unfinished/"


def unfinished_key(prefix: str, service: str, deploy_id: str) -> str:
    return f"{unfinished_prefix(prefix)}{service}/{deploy_id}"


def parse_unfinished_key(prefix: str, key: str) -> tuple[str, str] | None:
    """(service, deploy id) of an index key; None for any other key."""
    return _service_and_id(unfinished_prefix(prefix), key)


def unfinished_marker(prefix: str) -> str:
    """Present once the index covers records written before it existed."""
    return f"{_base(prefix)}/indexes/unfinished"


def _service_and_id(base: str, key: str) -> tuple[str, str] | None:
    """``<base><service>/<id>``: a valid service name and an id without ``/``, or None."""
    if not key.startswith(base):
        return None
    service, _, record_id = key[len(base) :].partition("/")
    try:
        validate_service(service)
    except InvalidNameError:
        return None
    return (service, record_id) if record_id and "/" not in record_id else None


def locks_base(prefix: str) -> str:
    """Deploy locks: ``<base>/<service>``."""
    return f"{_base(prefix)}/locks"


# -- service policies -------------------------------------------------------------------


def services_prefix(prefix: str) -> str:
    return f"{_base(prefix)}/services/"


def policy_key(prefix: str, service: str) -> str:
    return f"{services_prefix(prefix)}{service}/policy"


def policy_service(prefix: str, key: str) -> str | None:
    """The service of a policy key; None for any other key under ``services/``."""
    base = services_prefix(prefix)
    if not key.startswith(base):
        return None
    service, _, rest = key[len(base) :].partition("/")
    return service if service and rest == "policy" else None


# -- webhooks ---------------------------------------------------------------------------


def seen_key(prefix: str, key: str) -> str:
    return f"{_base(prefix)}/webhooks/seen/{key}"


def queued_prefix(prefix: str) -> str:
    return f"{_base(prefix)}/webhooks/queued/"


def queued_key(prefix: str, service: str) -> str:
    return f"{queued_prefix(prefix)}{service}"


def callbacks_prefix(prefix: str) -> str:
    return f"{_base(prefix)}/webhooks/callbacks/"


def callback_key(prefix: str, service: str, deploy_id: str) -> str:
    """The Docker Hub callback to answer when the deploy a push started ends (a secret URL)."""
    return f"{callbacks_prefix(prefix)}{service}/{deploy_id}"


# -- tasks ------------------------------------------------------------------------------


def tasks_prefix(prefix: str, service: str | None = None) -> str:
    base = f"{_base(prefix)}/tasks/"
    return base if service is None else f"{base}{service}/"


def task_key(prefix: str, service: str, task_id: str) -> str:
    return f"{tasks_prefix(prefix, service)}{task_id}"


def task_locks_base(prefix: str) -> str:
    """Exclusive-task locks: ``<base>/<service>``."""
    return f"{_base(prefix)}/task-locks"


# -- notifications ----------------------------------------------------------------------


def pending_prefix(prefix: str) -> str:
    return f"{_base(prefix)}/notifications/pending/"


def pending_key(prefix: str, delivery_id: str) -> str:
    return f"{pending_prefix(prefix)}{delivery_id}"


def outcomes_prefix(prefix: str, service: str) -> str:
    return f"{_base(prefix)}/notifications/outcomes/{service}/"


# -- servers ----------------------------------------------------------------------------


def members_prefix(prefix: str) -> str:
    """Live servers: ``<prefix>/servers/<id>``, each on its own lease."""
    return f"{_base(prefix)}/servers/"


# -- instance announcements -------------------------------------------------------------


def instances_prefix(prefix: str, service: str | None = None) -> str:
    """The etcd prefix of every announcement, or of one service's, ending with ``/``."""
    base = f"{_base(prefix)}/instances/"
    return f"{base}{service}/" if service is not None else base


def announce_key(prefix: str, unit: UnitName) -> str:
    """``<prefix>/instances/<service>/<version>:<timestamp>/<n>``: where ``unit`` announces."""
    return f"{instances_prefix(prefix, unit.service)}{unit.release}/{unit.instance}"


def parse_announce_key(prefix: str, key: str) -> UnitName | None:
    """The unit behind an announce key; ``None`` for a key outside the layout."""
    base = instances_prefix(prefix)
    if not key.startswith(base):
        return None
    parts = key[len(base) :].split("/")
    if len(parts) != 3 or not (parts[2].isascii() and parts[2].isdigit()):
        return None
    service, release, instance = parts
    version, colon, timestamp = release.rpartition(":")
    if not (service and colon and version and timestamp):
        return None
    return UnitName(service, version, timestamp, int(instance))
