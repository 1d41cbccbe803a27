"""The pure parts of serve: liveness with hysteresis, trigger coalescing, ref matching."""

from __future__ import annotations

import threading

import pytest

from reconciler.observe import FleetData, liveness
from reconciler.serve import Triggers, _ref_matches


def fleet(**proplets: tuple[bool, float | None, float]) -> FleetData:
    """proplet -> (online, last heartbeat or None, when presence last changed)."""
    data = FleetData(since=0.0)
    for name, (online, beat, changed) in proplets.items():
        data.presence[name] = online
        data.presence_at[name] = changed
        if beat is not None:
            data.last_heartbeat[name] = beat
            data.heartbeat_interval[name] = 1.0
    return data


@pytest.mark.parametrize(
    ("proplet", "now", "alive", "lost"),
    [
        ((True, 9.5, 0.0), 10.0, True, False),  # beating
        ((True, 7.5, 0.0), 10.0, True, False),  # missed two beats: still alive (3 allowed)
        ((True, 6.5, 0.0), 10.0, False, False),  # silent 3.5 beats: down since 9.5, not lost yet
        ((True, 2.0, 0.0), 10.0, False, True),  # silent since 5.0, lost after 5 s
        ((False, 9.0, 8.0), 10.0, False, False),  # went offline 2 s ago: a blink so far
        ((False, 1.0, 4.0), 10.0, False, True),  # offline for 6 s: lost
        ((True, None, 0.0), 10.0, True, False),  # connected, no heartbeat seen yet
    ],
)
def test_liveness(
    proplet: tuple[bool, float | None, float], now: float, alive: bool, lost: bool
) -> None:
    live = liveness(fleet(p=proplet), now, misses=3, lost_after=5.0)
    assert ("p" in live.alive, "p" in live.lost) == (alive, lost)


def test_offline_before_the_view_started_counts_from_its_start() -> None:
    data = FleetData(since=100.0)
    data.presence["p"] = False  # retained offline presence, seen at attach
    assert liveness(data, 103.0, misses=3, lost_after=5.0).lost == frozenset()
    assert liveness(data, 105.0, misses=3, lost_after=5.0).lost == {"p"}


def test_next_change_is_the_earliest_deadline() -> None:
    data = fleet(a=(True, 9.5, 0.0), b=(False, 9.0, 8.0))
    # a goes silent at 9.5 + 3 = 12.5; b becomes lost at 8 + 5 = 13.
    assert liveness(data, 10.0, misses=3, lost_after=5.0).next_change == 12.5


def test_triggers_coalesce_into_one_queued_pass() -> None:
    triggers = Triggers()
    assert triggers.request("webhook")
    assert [triggers.request("webhook") for _ in range(99)] == [False] * 99
    assert triggers.wait(0) == ["webhook"] * 100
    assert triggers.wait(0) == []
    assert triggers.coalesced == 99


def test_a_waiting_loop_wakes_on_request() -> None:
    triggers = Triggers()
    got: list[list[str]] = []
    waiter = threading.Thread(target=lambda: got.append(triggers.wait(5.0)))
    waiter.start()
    triggers.request("timer")
    waiter.join(2.0)
    assert got == [["timer"]]


@pytest.mark.parametrize(
    ("pushed", "served", "matches"),
    [
        ("refs/heads/main", "main", True),
        ("refs/tags/v1", "v1", True),
        ("main", "main", True),
        ("refs/heads/dev", "main", False),
        ("refs/heads/anything", None, True),  # HEAD not known yet: any push may move it
        (None, "main", True),  # a generic hook without a ref
    ],
)
def test_ref_matching(pushed: str | None, served: str | None, matches: bool) -> None:
    assert _ref_matches(pushed, served) is matches
