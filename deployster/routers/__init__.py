"""Router adapters: how instances join and leave a service's load balancer.

One protocol (`Router`), two implementations chosen by the ``--router vulcand|traefik``
setting (``deployster.server.router_for`` picks one). Both write the router's own etcd layout
(`docs/routers.md` §1 for vulcand, Part 2 for Traefik) and nothing else of
Deployster's reaches around them. The deploy logic relies on three promises:

* ``ensure_service`` and ``register`` are idempotent, so a restart can redo them;
* ``deregister`` removes exactly one server, never a neighbour whose id shares a prefix;
* ``wait_applied`` returns only once the router serves the change (Traefik: confirmed through
  its API) or, where the router offers no confirmation (vulcand), after a settle time; it
  raises `RouterTimeoutError` otherwise.
"""

from __future__ import annotations

from deployster.routers.base import (
    Router,
    RouterError,
    RouterRefusedError,
    RouterTimeoutError,
    RouterUnavailableError,
)
from deployster.routers.traefik import TraefikRouter
from deployster.routers.vulcand import VulcandRouter

ROUTER_KINDS = ("vulcand", "traefik")

__all__ = [
    "ROUTER_KINDS",
    "Router",
    "RouterError",
    "RouterRefusedError",
    "RouterTimeoutError",
    "RouterUnavailableError",
    "TraefikRouter",
    "VulcandRouter",
]
