"""The fragment schedule: who starts and finishes at which step (docs/design.md §3)."""
from __future__ import annotations

import itertools

import pytest

from streaming_muloco.schedule import FragmentSchedule, SyncEvent

GRID = list(itertools.product([1, 2, 3, 4], [4, 6, 30], [0, 1, 2]))  # (P, H, tau)
VALID = [(P, H, tau) for P, H, tau in GRID if tau < H / P]
INVALID = [(P, H, tau) for P, H, tau in GRID if tau >= H / P]


@pytest.mark.parametrize("P,H,tau", VALID)
def test_every_fragment_starts_once_per_round_at_its_offset(P: int, H: int, tau: int) -> None:
    s = FragmentSchedule(H, P, tau)
    rounds = 3
    starts = {p: [] for p in range(P)}
    for t in range(1, rounds * H + 1):
        launched = s.starts_at(t)
        assert launched == sorted(launched), "every replica must launch in ascending order"
        assert len(launched) <= 1, "P <= H: no two fragments start at the same step"
        for p in launched:
            starts[p].append(t)
    for p in range(P):
        assert s.offset(p) == p * H // P
        assert all(b - a == H for a, b in zip(starts[p], starts[p][1:]))
        assert all((t - s.offset(p)) % H == 0 for t in starts[p])
        assert len(starts[p]) == rounds
    assert sum(len(v) for v in starts.values()) == rounds * P


@pytest.mark.parametrize("P,H,tau", VALID)
def test_each_fragment_finishes_tau_steps_after_it_starts(P: int, H: int, tau: int) -> None:
    s = FragmentSchedule(H, P, tau)
    for t in range(1, 3 * H + 1):
        assert s.finishes_at(t + tau) == s.starts_at(t)
    assert all(s.finishes_at(t) == [] for t in range(0, tau + 1)), "nothing finishes before it starts"


@pytest.mark.parametrize("P,H,tau", VALID)
def test_at_most_one_fragment_in_flight(P: int, H: int, tau: int) -> None:
    """Simulates the caller: finishes first, then starts; the in-flight set must match."""
    s = FragmentSchedule(H, P, tau)
    in_flight: set[int] = set()
    for t in range(1, 3 * H + 1):
        for p in s.finishes_at(t):
            if tau > 0:
                in_flight.remove(p)
        for p in s.starts_at(t):
            assert not in_flight, f"step {t}: fragment {p} starts while {in_flight} is in flight"
            if tau > 0:
                in_flight.add(p)
        assert len(in_flight) <= 1
        assert s.in_flight_after(t) == sorted(in_flight)


@pytest.mark.parametrize("P,H,tau", VALID)
def test_next_start_is_the_first_later_start(P: int, H: int, tau: int) -> None:
    s = FragmentSchedule(H, P, tau)
    for p in range(P):
        for step in range(0, 2 * H):
            nxt = s.next_start(p, step)
            assert nxt > step and p in s.starts_at(nxt)
            assert all(p not in s.starts_at(t) for t in range(step + 1, nxt))


@pytest.mark.parametrize("P,H,tau", INVALID)
def test_sync_delay_too_long_for_the_fragments_is_rejected(P: int, H: int, tau: int) -> None:
    with pytest.raises(ValueError, match=r"^sync_delay .*lower sync_delay or num_fragments"):
        FragmentSchedule(H, P, tau)


@pytest.mark.parametrize("kwargs,key", [
    (dict(sync_every=0), "sync_every"),
    (dict(sync_every=4, num_fragments=0), "num_fragments"),
    (dict(sync_every=4, num_fragments=5), "num_fragments"),
    (dict(sync_every=4, sync_delay=-1), "sync_delay"),
    (dict(sync_every=4.0), "sync_every"),
])
def test_bad_argument_is_a_value_error_naming_it(kwargs: dict, key: str) -> None:
    """A plain ValueError naming the argument; config.py adds the section's dotted key."""
    with pytest.raises(ValueError, match=rf"^{key} \("):
        FragmentSchedule(**kwargs)


def test_error_message_reads_as_in_the_design() -> None:
    with pytest.raises(ValueError) as e:
        FragmentSchedule(sync_every=4, num_fragments=2, sync_delay=3)
    assert str(e.value) == ("sync_delay (3) must be < sync_every/num_fragments (2): a fragment must finish before "
                            "the next one starts; lower sync_delay or num_fragments")


def test_table_h4_p2_tau1_by_hand() -> None:
    assert FragmentSchedule(4, 2, 1).table(9) == [
        # step, starts, finishes
        (1, [], []),
        (2, [1], []),
        (3, [], [1]),
        (4, [0], []),
        (5, [], [0]),
        (6, [1], []),
        (7, [], [1]),
        (8, [0], []),
        (9, [], [0]),
    ]


def test_table_h6_p3_tau0_by_hand() -> None:
    s = FragmentSchedule(6, 3, 0)
    assert [s.offset(p) for p in range(3)] == [0, 2, 4]
    assert s.table(12) == [
        (1, [], []), (2, [1], [1]), (3, [], []), (4, [2], [2]), (5, [], []), (6, [0], [0]),
        (7, [], []), (8, [1], [1]), (9, [], []), (10, [2], [2]), (11, [], []), (12, [0], [0]),
    ]
    assert all(s.in_flight_after(t) == [] for t in range(13))


def test_finish_and_start_on_the_same_step_when_tau_fills_the_gap() -> None:
    """H=6, P=4: offsets 0,1,3,4; gaps 1,2,1,2, so with tau=1 a finish and a start share steps."""
    s = FragmentSchedule(6, 4, 1)
    assert [s.offset(p) for p in range(4)] == [0, 1, 3, 4]
    assert s.finishes_at(7) == [0] and s.starts_at(7) == [1]
    assert s.in_flight_after(7) == [1]


def test_plain_diloco_syncs_every_h_steps() -> None:
    s = FragmentSchedule(30)
    assert [t for t in range(0, 91) if s.starts_at(t)] == [30, 60, 90]
    assert s.starts_at(0) == [] and s.next_start(0, 0) == 30


@pytest.mark.parametrize("P,H,tau", VALID)
def test_events_finish_before_start_with_overlap_and_start_then_finish_without(P: int, H: int, tau: int) -> None:
    s = FragmentSchedule(H, P, tau)
    for t in range(0, 3 * H + 1):
        events = s.events(t)
        starts = [SyncEvent("start", p) for p in s.starts_at(t)]
        finishes = [SyncEvent("finish", p) for p in s.finishes_at(t)]
        assert sorted(events, key=repr) == sorted(starts + finishes, key=repr)
        if tau == 0:
            assert events == [e for st in starts for e in (st, SyncEvent("finish", st.fragment_id))]
        else:
            assert events == finishes + starts


def test_events_h4_p2_tau1_by_hand() -> None:
    s = FragmentSchedule(4, 2, 1)
    assert [s.events(t) for t in range(1, 6)] == [
        [], [SyncEvent("start", 1)], [SyncEvent("finish", 1)], [SyncEvent("start", 0)], [SyncEvent("finish", 0)]]
    s6 = FragmentSchedule(6, 4, 1)  # a finish and a start on the same step: the finish first
    assert s6.events(7) == [SyncEvent("finish", 0), SyncEvent("start", 1)]


EAGER = [(P, H, tau) for P in (1, 2, 3) for H in (4, 6) for tau in range(0, H + 1)]


@pytest.mark.parametrize("P,H,tau", EAGER)
def test_eager_updates_allow_a_delay_up_to_the_whole_period(P: int, H: int, tau: int) -> None:
    """With eager updates a fragment may be in flight for up to H steps: up to P at once, each
    finishing before (or at the step of, and before) its own next start."""
    s = FragmentSchedule(H, P, tau, eager_updates=True)
    in_flight: set[int] = set()
    for t in range(1, 4 * H + 1):
        order = s.events(t)
        for e in order:
            if e.kind == "finish":
                assert e.fragment_id in in_flight or tau == 0
                in_flight.discard(e.fragment_id)
            else:
                assert e.fragment_id not in in_flight, f"step {t}: fragment {e.fragment_id} restarts in flight"
                if tau > 0:
                    in_flight.add(e.fragment_id)
        assert s.in_flight_after(t) == sorted(in_flight)
        assert len(in_flight) <= P
    assert max(len(s.in_flight_after(t)) for t in range(H, 4 * H)) == min(P, -(-tau * P // H))


def test_eager_updates_refuse_a_delay_past_the_period() -> None:
    with pytest.raises(ValueError, match=r"sync_delay \(5\) must be <= sync_every \(4\) with eager updates"):
        FragmentSchedule(4, 2, 5, eager_updates=True)
