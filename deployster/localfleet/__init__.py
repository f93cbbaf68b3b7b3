"""localfleet: a single-machine fleet, fleet's v1 HTTP API over an agent that runs units here.

Real fleet needs systemd and etcd on every host. localfleet serves the same
API (paths, JSON, status codes, pagination; `docs/fleet.md`)
and runs each launched unit on this machine with systemd's semantics, so that
Deployster's fleet client is exercised against fleet's contract, by
`deployster up` and by the integration tests. It can present several machines
so that X-Fleet placement (`Conflicts`, `MachineOf`, `Global`) is real.

The parts, from the wire inwards:

    api.py          fleet's routes and PUT rules          -> wire.py (JSON), pagination.py
    registry.py     units, machines, target machines      -> scheduler.py (fleet's engine), store.py (disk)
    agent.py        one task per unit and machine         -> service.py (systemd's start/stop), journal.py
    unitfile.py, environ.py, unitname.py, xfleet.py       pure parsing of unit files and names
    model.py        DesiredInstance, what the registry asks of the agent
    server.py       LocalFleet, serve(), run()

fleet's JSON shapes (`UnitOption`, `Unit`, `UnitState`, `Machine`, pages,
the error entity) and the job states are not defined here but in
`deployster/fleet.py`, the one place for fleet's wire format, shared with
Deployster's client; `wire.py` only adds the server's side of it.

Entry points: `run(listen, machines, state_dir, token_limit)` blocks until
SIGTERM/SIGINT; `serve(...)` is the same as a coroutine; `LocalFleet` is the
async context manager for embedding. All three raise `StartupError` with a
sentence for the user when localfleet cannot start (bad address, port in use,
unreadable state file). From a shell: `deployster localfleet --help`.
"""

from .server import LocalFleet, StartupError, run, serve

__all__ = ["LocalFleet", "StartupError", "run", "serve"]
