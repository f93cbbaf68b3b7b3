"""Router ids, keys and values: the rules from `docs/routers.md` that need no etcd."""

from __future__ import annotations

import itertools
import json

import pytest

from deployster.routers import (
    RouterError,
    TraefikRouter,
    VulcandRouter,
    vulcand,
)
from deployster.routers.base import check_server_id, check_url
from deployster.routers.traefik import default_rule

# Names that trip naive schemes: a fixed "-be" suffix makes "a-be" a prefix of "a-be-be".
TRICKY_SERVICES = [
    "a",
    "a-be",
    "a-be-be",
    "a-b",
    "ab",
    "app",
    "app2",
    "app-2",
    "app_2",
    "app.2",
    "web",
    "web-api",
    "web-api-be",
    "web-fe",
    "web.be",
    "web_be",
    "be",
    "fe",
    "Web",
    "x1",
    "x10",
]


def test_no_vulcand_id_is_a_prefix_of_another() -> None:
    """§1.7 bug 2: the snapshot attaches servers to backends by prefix without a '/'."""
    ids = [vulcand.backend_id(s) for s in TRICKY_SERVICES]
    ids += [vulcand.frontend_id(s) for s in TRICKY_SERVICES]
    assert len(set(ids)) == len(ids)
    for first, second in itertools.permutations(ids, 2):
        assert not second.startswith(first), (first, second)


def test_a_suffix_of_name_characters_would_not_be_prefix_free() -> None:
    """Why the terminator is outside the service alphabet."""
    assert "a-be-be".startswith("a" + "-be")
    assert not vulcand.backend_id("a-be").startswith(vulcand.backend_id("a"))


def test_vulcand_keys() -> None:
    router = VulcandRouter(etcd=None)  # type: ignore[arg-type]
    assert router.backend_key("web") == "vulcand/backends/web~be/backend"
    assert router.frontend_key("web") == "vulcand/frontends/web~fe/frontend"
    assert (
        router.server_key("web", "web-v1-2026.11.26-12.00.00-1")
        == "vulcand/backends/web~be/servers/web-v1-2026.11.26-12.00.00-1"
    )
    assert VulcandRouter(None, prefix="/vulcand").backend_key("web") == (  # type: ignore[arg-type]
        "/vulcand/backends/web~be/backend"
    )


def test_vulcand_values_are_the_documented_json() -> None:
    assert vulcand.backend_value() == b'{"Type":"http","Settings":{}}'
    assert vulcand.server_value("http://10.0.0.5:31001") == b'{"URL":"http://10.0.0.5:31001"}'
    frontend = json.loads(
        vulcand.frontend_value(
            "web", vulcand.default_route("web"), {"FailoverPredicate": vulcand.DEFAULT_FAILOVER}
        )
    )
    assert frontend == {
        "Type": "http",
        "BackendId": "web~be",
        "Route": 'Host("web.localhost")',
        "Settings": {"FailoverPredicate": "IsNetworkError() && Attempts() <= 2"},
    }


def test_vulcand_prefix_must_not_end_with_a_slash() -> None:
    with pytest.raises(RouterError, match="-etcdKey"):
        VulcandRouter(None, prefix="vulcand/")  # type: ignore[arg-type]


def test_traefik_keys_and_rule() -> None:
    router = TraefikRouter(etcd=None)  # type: ignore[arg-type]
    assert default_rule("web") == "Host(`web.localhost`)"
    assert router.router_prefix("web") == "traefik/http/routers/web/"
    assert router.url_key("web", 3) == "traefik/http/services/web/loadbalancer/servers/3/url"
    # The trailing slash keeps servers/1/ from matching servers/10/ (§2.4).
    assert router.server_prefix("web", 1) == "traefik/http/services/web/loadbalancer/servers/1/"
    assert not router.server_prefix("web", 10).startswith(router.server_prefix("web", 1))
    # Bookkeeping is outside Traefik's root: Traefik parses everything under it (§2.2).
    assert router.counter_key("web") == "/deployster/routers/traefik/traefik/web/next"
    assert router.mapping_key("web", "web-v1-x-1") == (
        "/deployster/routers/traefik/traefik/web/servers/web-v1-x-1"
    )
    assert not router.mapping_key("web", "w-1").startswith(router.root_key)


def test_traefik_bookkeeping_must_stay_outside_the_root() -> None:
    with pytest.raises(RouterError, match="overlaps"):
        TraefikRouter(None, root_key="traefik", bookkeeping_prefix="traefik/deployster")  # type: ignore[arg-type]


@pytest.mark.parametrize("server_id", ["", "a/b", "svc:v1:ts@1", "svc@1", "-x", "a b"])
def test_server_ids_in_unit_form_or_with_separators_are_refused(server_id: str) -> None:
    with pytest.raises(RouterError):
        check_server_id(server_id)


def test_container_form_server_id_is_accepted() -> None:
    assert check_server_id("hello-v1-2026.11.26-12.00.00-1") == "hello-v1-2026.11.26-12.00.00-1"


@pytest.mark.parametrize("url", ["10.0.0.5:31001", "ftp://h/", "http://", "/path"])
def test_urls_must_be_absolute_http(url: str) -> None:
    with pytest.raises(RouterError):
        check_url(url)


@pytest.mark.parametrize("service", ["a@b", "a:b", "-a", "a/b", "a~b"])
def test_invalid_service_names_are_refused(service: str) -> None:
    with pytest.raises(RouterError):
        vulcand.backend_id(service)
    with pytest.raises(RouterError):
        TraefikRouter(None).router_prefix(service)  # type: ignore[arg-type]
