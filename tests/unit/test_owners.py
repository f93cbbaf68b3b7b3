"""Rendezvous hashing of services over servers: stable, balanced, minimal movement; and the
ownership policy's claims and its reading of the member keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from deployster import etcd as etcd_adapter
from deployster.etcd import WatchEvent
from deployster.keys import members_prefix
from deployster.membership import Member, Membership
from deployster.records import LockHolder
from handlers.owners import Owners, owner

SERVICES = [f"svc-{n}" for n in range(1000)]
MEMBERS = ["host-a-101-aaaaaa", "host-b-202-bbbbbb", "host-c-303-cccccc", "host-d-404-dddddd"]


def owners_of(members: list[str]) -> dict[str, str | None]:
    return {s: owner(s, members) for s in SERVICES}


def test_the_owner_does_not_depend_on_order_or_on_the_process() -> None:
    here = owners_of(MEMBERS)
    assert owners_of(list(reversed(MEMBERS))) == here
    # Another interpreter with another string-hash seed computes the same owners.
    code = (
        "import json, sys; from handlers.owners import owner; "
        "members = json.loads(sys.argv[1]); "
        "print(json.dumps({f'svc-{n}': owner(f'svc-{n}', members) for n in range(1000)}))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(MEMBERS)],
        check=True,
        capture_output=True,
        env=env,
    ).stdout
    assert json.loads(out) == here


def test_no_members_no_owner() -> None:
    assert owner("svc", []) is None
    assert owner("svc", ["only"]) == "only"


@pytest.mark.parametrize("count", [2, 3, 4])
def test_a_thousand_services_spread_evenly(count: int) -> None:
    shares = Counter(owners_of(MEMBERS[:count]).values())
    fair = len(SERVICES) / count
    print(f"\n[owners] {count} servers: {sorted(shares.values())} of {len(SERVICES)}")
    assert set(shares) == set(MEMBERS[:count])
    # Binomial spread: 4 standard deviations is under 13 % of the fair share here.
    assert all(abs(n - fair) < 0.13 * fair for n in shares.values()), shares


def test_a_member_leaving_moves_only_its_services() -> None:
    before = owners_of(MEMBERS)
    gone = MEMBERS[1]
    after = owners_of([m for m in MEMBERS if m != gone])
    moved = {s for s in SERVICES if before[s] != after[s]}
    assert moved == {s for s in SERVICES if before[s] == gone}
    # They spread over the remaining members, not onto one.
    assert len({after[s] for s in moved}) == len(MEMBERS) - 1


def test_a_member_joining_takes_a_fair_share_from_everyone() -> None:
    before = owners_of(MEMBERS[:3])
    after = owners_of(MEMBERS)
    moved = {s for s in SERVICES if before[s] != after[s]}
    assert all(after[s] == MEMBERS[3] for s in moved)
    assert abs(len(moved) - 250) < 50, len(moved)
    assert {before[s] for s in moved} == set(MEMBERS[:3])


def member_value(member_id: str) -> str:
    return Member(id=member_id, host="h", pid=1, version="0", started=0.0).model_dump_json()


def ownership(me: str) -> tuple[Membership, Owners]:
    # Never connected: members and locks are fed through the watches' callbacks.
    client = etcd_adapter.client("http://127.0.0.1:9")
    membership = Membership(client, "/p", ttl=5, server_id=me)
    return membership, Owners(membership, client, "/p/locks")


async def test_garbage_under_the_members_prefix_is_no_member() -> None:
    me, peer = MEMBERS[0], MEMBERS[1]
    membership, owners = ownership(me)
    base = members_prefix("/p")
    mine = {s for s in SERVICES if owner(s, [me, peer]) == me}
    # An id that, counted, would take some of this server's services.
    await membership._on_resync(
        {
            f"{base}{peer}": member_value(peer),
            f"{base}{MEMBERS[2]}": "not json at all",
            f"{base}{MEMBERS[3]}": member_value("someone-else"),  # id differs from the key
            f"{base}nested/key": member_value("nested/key"),
            f"{base}": member_value(""),
        },
        1,
    )
    assert membership.members == {me, peer}
    assert {s for s in SERVICES if owners.owns(s)} == mine
    # A member overwritten with garbage is no member any more.
    await membership._on_event(WatchEvent("put", f"{base}{peer}", "{}", 2))
    assert membership.members == {me}
    assert all(owners.owns(s) for s in SERVICES)


async def test_a_server_counts_itself_and_hears_of_every_change() -> None:
    me, peer = MEMBERS[0], MEMBERS[1]
    membership, owners = ownership(me)
    changes: list[frozenset[str] | None] = []
    owners.subscribe(changes.append)
    assert membership.members == {me}  # nothing read yet: all is ours
    assert all(owners.owns(s) for s in SERVICES)
    base = members_prefix("/p")
    await membership._on_resync({f"{base}{peer}": member_value(peer)}, 1)
    assert membership.members == {me, peer} and changes == [None]  # any service may move
    theirs = next(s for s in SERVICES if owner(s, [me, peer]) == peer)
    assert not owners.owns(theirs)

    # A deploy driven here claims the service (twice: two deploys one after the other may
    # overlap in this server's books); it is owned until the last release.
    owners.claim(theirs)
    owners.claim(theirs)
    assert owners.owns(theirs) and len(changes) == 2
    owners.release(theirs)
    assert owners.owns(theirs) and len(changes) == 2
    owners.release(theirs)
    assert not owners.owns(theirs) and len(changes) == 3
    owners.release(theirs)  # an extra release changes nothing
    assert not owners.owns(theirs) and len(changes) == 3
    assert changes[1:] == [frozenset({theirs})] * 2  # a claim and a release: that service


async def test_a_deploy_lock_held_elsewhere_takes_the_service_from_its_hash_owner() -> None:
    me, peer = MEMBERS[0], MEMBERS[1]
    membership, owners = ownership(me)
    changes: list[frozenset[str] | None] = []
    owners.subscribe(changes.append)
    await membership._on_resync({f"{members_prefix('/p')}{peer}": member_value(peer)}, 1)
    mine = [s for s in SERVICES if owner(s, [me, peer]) == me]
    held = LockHolder(holder="deploy-1", lease=7).model_dump_json()
    await owners._on_locks(
        {
            f"/p/locks/{mine[0]}": held,
            f"/p/locks/{mine[1]}": "garbage",  # no lock: the service stays with its owner
            "/p/locks/a/b": held,
        },
        1,
    )
    assert not owners.owns(mine[0]) and owners.owns(mine[1])
    owners.claim(mine[0])  # the deploy is driven here after all
    assert owners.owns(mine[0])
    owners.release(mine[0])
    assert not owners.owns(mine[0])
    count = len(changes)
    await owners._on_lock(WatchEvent("delete", f"/p/locks/{mine[0]}", None, 2))
    assert owners.owns(mine[0]) and changes[count:] == [frozenset({mine[0]})]
    # A lock overwritten with garbage is no lock.
    await owners._on_lock(WatchEvent("put", f"/p/locks/{mine[2]}", held, 3))
    assert not owners.owns(mine[2])
    await owners._on_lock(WatchEvent("put", f"/p/locks/{mine[2]}", "}{", 4))
    assert owners.owns(mine[2])
