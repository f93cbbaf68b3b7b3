"""localfleet's placement: fleet's engine (`reconcile_schedule`) and agents (`machine_units`)."""

from __future__ import annotations

import hypothesis
from hypothesis import strategies as st

from deployster.fleet import Machine, UnitOption
from deployster.localfleet.scheduler import (
    Placement,
    SchedulableUnit,
    machine_units,
    reconcile_schedule,
)
from deployster.localfleet.xfleet import _compile_glob, fleet_requirements, glob_match

M1, M2, M3 = ("1" * 32, "2" * 32, "3" * 32)
MACHINES = [
    Machine(id=M3, primary_ip="127.0.0.1", metadata={}),
    Machine(id=M1, primary_ip="127.0.0.1", metadata={}),
    Machine(id=M2, primary_ip="127.0.0.1", metadata={}),
]


def unit(name: str, *x_fleet: tuple[str, str], state: str = "launched") -> SchedulableUnit:
    options = [UnitOption(section="X-Fleet", name=key, value=value) for key, value in x_fleet]
    return SchedulableUnit(name, state, fleet_requirements(options, name))


def place(units, machines=MACHINES, targets=None):
    return reconcile_schedule(units, machines, targets or {})


def test_least_loaded_machine_ties_broken_by_id() -> None:
    targets = place([unit(f"u{i}.service") for i in range(4)])
    assert targets == {"u0.service": M1, "u1.service": M2, "u2.service": M3, "u3.service": M1}


def test_inactive_units_are_not_placed_and_placed_units_stay() -> None:
    targets = place(
        [unit("a.service", state="inactive"), unit("b.service", state="loaded")],
        targets={"b.service": M3},
    )
    assert targets == {"a.service": None, "b.service": M3}


def test_desired_inactive_unplaces_and_a_vanished_machine_frees_its_units() -> None:
    assert place([unit("a.service", state="inactive")], targets={"a.service": M2}) == {
        "a.service": None
    }
    assert place([unit("a.service")], targets={"a.service": "gone"}) == {"a.service": M1}


def test_an_unknown_desired_state_is_placed_like_loaded() -> None:
    # fleet stores desiredState unvalidated on updates; anything but "inactive" gets scheduled.
    assert place([unit("a.service", state="bogus")]) == {"a.service": M1}


def test_conflicts_spread_instances_and_the_extra_one_waits() -> None:
    units = [unit(f"app@{i}.service", ("Conflicts", "app@*.service")) for i in range(1, 5)]
    targets = place(units)
    assert sorted(t for t in targets.values() if t) == [M1, M2, M3]
    assert targets["app@4.service"] is None


def test_conflicts_are_symmetric() -> None:
    targets = place(
        [unit("a.service"), unit("b.service", ("Conflicts", "a.service"))], machines=MACHINES[:1]
    )
    assert targets == {"a.service": M3, "b.service": None}


def test_machine_of_follows_its_peer_even_when_it_sorts_first() -> None:
    units = [
        unit("a-sidekick.service", ("MachineOf", "z-app.service")),
        unit("filler.service"),
        unit("z-app.service"),
    ]
    targets = place(units)
    assert targets["z-app.service"] is not None
    assert targets["a-sidekick.service"] == targets["z-app.service"]


def test_machine_of_an_unplaced_peer_stays_unplaced_and_leaves_with_it() -> None:
    assert place([unit("side.service", ("MachineOf", "app.service"))]) == {"side.service": None}
    units = [
        unit("side.service", ("MachineOf", "app.service")),
        unit("app.service", state="inactive"),
    ]
    assert place(units, targets={"side.service": M2, "app.service": M2}) == {
        "side.service": None,
        "app.service": None,
    }


def test_machine_id_full_or_short() -> None:
    assert place([unit("a.service", ("MachineID", M3))]) == {"a.service": M3}
    assert place([unit("a.service", ("MachineID", M2[:8]))]) == {"a.service": M2}
    assert place([unit("a.service", ("MachineID", "nope"))]) == {"a.service": None}


def test_machine_metadata() -> None:
    machines = [
        Machine(id=M1, primary_ip="", metadata={"disk": "hdd"}),
        Machine(id=M2, primary_ip="", metadata={"disk": "ssd", "region": "eu"}),
    ]
    assert place([unit("a.service", ("MachineMetadata", "disk=ssd"))], machines) == {
        "a.service": M2
    }
    assert place([unit("a.service", ("MachineMetadata", '"disk=nvme" "disk=ssd"'))], machines) == {
        "a.service": M2
    }
    assert place(
        [unit("a.service", ("MachineMetadata", "disk=ssd"), ("MachineMetadata", "region=us"))],
        machines,
    ) == {"a.service": None}


def test_global_units_are_not_scheduled_but_count_as_load_and_conflict() -> None:
    everywhere = unit("g.service", ("Global", "true"))
    blocker = unit("b.service", ("Global", "true"), ("MachineMetadata", "role=b"))
    machines = [
        Machine(id=M1, primary_ip="", metadata={"role": "b"}),
        Machine(id=M2, primary_ip="", metadata={}),
    ]
    # Both machines run g; M1 also runs b, so it is the more loaded one.
    assert place([everywhere, blocker, unit("a.service")], machines) == {"a.service": M2}
    conflicting = unit("c.service", ("Conflicts", "g.service"))
    assert place([everywhere, conflicting], machines) == {"c.service": None}


def test_replaces_moves_the_replaced_unit_elsewhere() -> None:
    old = unit("old.service")
    new = unit("new.service", ("Replaces", "old.service"))
    targets = place([old, new], targets={"old.service": M1, "new.service": M1})
    assert targets["new.service"] == M1
    assert targets["old.service"] not in (None, M1)


def test_machine_units_lists_placed_and_matching_global_units_minus_conflicts() -> None:
    machine = Machine(id=M1, primary_ip="", metadata={"role": "web"})
    units = [
        unit("a.service"),
        unit("b.service"),
        unit("g-web.service", ("Global", "true"), ("MachineMetadata", "role=web")),
        unit("g-db.service", ("Global", "true"), ("MachineMetadata", "role=db")),
        unit("z-global.service", ("Global", "1"), ("Conflicts", "a.service")),
        unit("elsewhere.service"),
    ]
    targets = {"a.service": M1, "b.service": M1, "elsewhere.service": M2}
    assert [u.name for u in machine_units(units, targets, machine)] == [
        "a.service",
        "b.service",
        "g-web.service",
    ]


# The indexed placement (`Placement`) against the plain functions, over random units and changes.

NAMES = [f"{p}@{i}.service" for p in "ab" for i in (1, 2, 3)] + ["x.service", "y.service"]
GLOBS = ["a@*.service", "b@*.service", "*.service", "x.service", "a@[12].service", "?@3.service"]
X_FLEET = st.one_of(
    st.tuples(st.just("Conflicts"), st.sampled_from(GLOBS + NAMES)),
    st.tuples(st.just("MachineOf"), st.sampled_from(NAMES)),
    st.tuples(st.just("Replaces"), st.sampled_from(GLOBS + NAMES)),
    st.tuples(st.just("Global"), st.sampled_from(["true", "false"])),
    st.tuples(st.just("MachineID"), st.sampled_from([M1, M2[:8], "nope"])),
    st.tuples(st.just("MachineMetadata"), st.sampled_from(["disk=ssd", "region=eu"])),
)
UNITS = st.builds(
    lambda name, x_fleet, state: unit(name, *x_fleet, state=state),
    st.sampled_from(NAMES),
    st.lists(X_FLEET, max_size=3),
    st.sampled_from(["inactive", "loaded", "launched"]),
)
METADATA = st.dictionaries(
    st.sampled_from(["disk", "region"]), st.sampled_from(["ssd", "eu", "hdd"]), max_size=2
)
CHANGES = st.lists(
    st.one_of(
        st.tuples(st.just("put"), UNITS),
        st.tuples(st.just("remove"), st.sampled_from(NAMES)),
        st.tuples(st.just("metadata"), st.tuples(st.sampled_from([M1, M2, M3]), METADATA)),
    ),
    max_size=30,
)


@hypothesis.settings(max_examples=400, deadline=None)
@hypothesis.given(st.lists(UNITS, max_size=8), st.lists(METADATA, min_size=1, max_size=3), CHANGES)
def test_indexed_placement_is_the_plain_one(initial, metadata, changes) -> None:
    machines = {
        machine_id: Machine(id=machine_id, primary_ip="", metadata=values)
        for machine_id, values in zip((M1, M2, M3), metadata, strict=False)
    }
    records: dict[str, tuple[SchedulableUnit, str | None]] = {}  # as the registry keeps them
    placement = Placement(list(machines.values()))
    desired: set[tuple[str, str]] = set()  # kept from the touched pairs only, as the registry does

    def put(new: SchedulableUnit) -> None:
        target = records[new.name][1] if new.name in records else None
        records[new.name] = (new, target)
        placement.put(new, target)

    def check() -> None:
        units = [u for u, _ in records.values()]
        targets = reconcile_schedule(
            units, list(machines.values()), {name: t for name, (_, t) in records.items()}
        )
        for name, target in targets.items():
            records[name] = (records[name][0], target)
        changed = placement.reconcile()
        assert placement.targets == targets
        for machine in machines.values():
            chosen = {u.name for u in machine_units(units, targets, machine)}
            assert placement.chosen(machine.id) == chosen
        for name, machine_id in changed.touched:
            wanted = name in records and name in placement.chosen(machine_id)
            (desired.add if wanted else desired.discard)((name, machine_id))
        assert desired == {
            (name, machine_id) for machine_id in machines for name in placement.chosen(machine_id)
        }

    for new in initial:
        put(new)
    check()
    for kind, value in changes:
        if kind == "put":
            put(value)
        elif kind == "remove":
            if value not in records:
                continue
            del records[value]
            placement.remove(value)
        elif value[0] in machines:
            machine = machines[value[0]].model_copy(update={"metadata": value[1]})
            machines[machine.id] = machine
            placement.set_machine(machine)
        check()


@hypothesis.given(st.text(alphabet="ab@*./", max_size=8), st.text(alphabet="ab@./", max_size=8))
def test_a_glob_with_one_star_matches_as_its_regular_expression(pattern, name) -> None:
    compiled = _compile_glob(pattern)
    assert glob_match(pattern, name) is (compiled is not None and bool(compiled.fullmatch(name)))
