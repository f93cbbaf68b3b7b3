"""`python -m deployster.localfleet`: run localfleet from a shell, before or without the `deployster` CLI."""

from __future__ import annotations

import argparse
import pathlib
import sys

from .server import StartupError, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deployster.localfleet",
        description="Serve fleet's v1 HTTP API and run the launched units on this machine.",
    )
    parser.add_argument("--listen", required=True, help="unix:PATH or HOST:PORT (port 0 picks a free port)")
    parser.add_argument("--machines", type=int, default=1, help="number of fleet machines to present (default 1)")
    parser.add_argument(
        "--state-dir", type=pathlib.Path, help="keep the unit registry and unit logs here, and reload them at start"
    )
    parser.add_argument("--token-limit", type=int, default=100, help="page size of list answers (fleet's token_limit)")
    args = parser.parse_args(argv)
    try:
        run(listen=args.listen, machines=args.machines, state_dir=args.state_dir, token_limit=args.token_limit)
    except StartupError as exc:
        print(f"localfleet: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
