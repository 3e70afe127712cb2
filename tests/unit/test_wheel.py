"""The pure timing wheel, with Kafka-sized toy parameters and a model-based stateful test."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    rule,
)

from delayserver.wheel import TimerEntry, TimingWheel

TEN_YEARS_MS = 10 * 365 * 24 * 3600 * 1000


def drive(wheel: TimingWheel, until_ms: int) -> tuple[list[TimerEntry], int]:
    """Advance like a driver: only to each next bucket expiration. Returns fired and wake-ups."""
    fired: list[TimerEntry] = []
    wakeups = 0
    while (next_ms := wheel.next_expiration_ms()) is not None and next_ms <= until_ms:
        fired += wheel.advance(next_ms)
        wakeups += 1
    fired += wheel.advance(until_ms)
    return fired, wakeups


def payloads(entries: list[TimerEntry]) -> list[object]:
    return [entry.payload for entry in entries]


class TestLevels:
    def test_level0_holds_one_interval_and_fires_each_ms(self) -> None:
        wheel = TimingWheel(tick_ms=1, wheel_size=5, start_ms=1000)
        for expiration_ms in range(1001, 1005):
            wheel.add(expiration_ms, expiration_ms)
        assert wheel.level_count == 1
        assert wheel.next_expiration_ms() == 1001
        assert payloads(wheel.advance(1002)) == [1001, 1002]
        assert wheel.current_ms == 1002
        assert wheel.next_expiration_ms() == 1003
        assert payloads(wheel.advance(1004)) == [1003, 1004]
        assert len(wheel) == 0
        assert wheel.next_expiration_ms() is None

    def test_the_worked_example_of_the_module_docstring(self) -> None:
        wheel = TimingWheel(tick_ms=1, wheel_size=4, start_ms=0)
        wheel.add(2, 2)
        wheel.add(9, 9)
        assert wheel.level_count == 2
        wheel.add(40, 40)
        assert wheel.level_count == 3
        assert wheel.next_expiration_ms() == 2
        assert payloads(wheel.advance(8)) == [2]
        assert wheel.next_expiration_ms() == 9
        assert payloads(wheel.advance(9)) == [9]
        assert wheel.next_expiration_ms() == 32
        assert wheel.advance(32) == []
        assert wheel.next_expiration_ms() == 40
        assert payloads(wheel.advance(40)) == [40]

    def test_overflow_wheel_is_created_lazily(self) -> None:
        wheel = TimingWheel(tick_ms=1, wheel_size=5, start_ms=1000)
        wheel.add(1004, "last of level 0")
        assert wheel.level_count == 1
        wheel.add(1005, "first of level 1")
        assert wheel.level_count == 2
        assert wheel.level_interval_ms(1) == 25
        wheel.add(1025, "first of level 2")
        assert wheel.level_count == 3
        assert wheel.level_interval_ms(2) == 125
        # A level-1 bucket expires at the start of its 5 ms tick.
        assert wheel.next_expiration_ms() == 1004
        wheel.advance(1004)
        assert wheel.next_expiration_ms() == 1005

    @pytest.mark.parametrize(
        ("tick_ms", "delays_ms"),
        [
            (1, [1, 4, 5, 6, 9, 10, 24, 25, 26, 124, 125, 126, 624, 625, 3124, 3125]),
            (10, [1, 5, 9, 10, 11, 49, 50, 51, 249, 250, 251, 1249, 1250, 6250]),
        ],
    )
    def test_every_level_boundary_fires_exactly_on_time(
        self, tick_ms: int, delays_ms: list[int]
    ) -> None:
        wheel = TimingWheel(tick_ms=tick_ms, wheel_size=5, start_ms=1000)
        for delay_ms in delays_ms:
            wheel.add(1000 + delay_ms, delay_ms)
        assert len(wheel) == len(delays_ms)
        for delay_ms in delays_ms:
            before, _ = drive(wheel, 1000 + delay_ms - 1)
            assert before == [], f"fired before {delay_ms}"
            fired = wheel.advance(1000 + delay_ms)
            assert payloads(fired) == [delay_ms]
            assert fired[0].fired
        assert len(wheel) == 0

    def test_kafka_parameters_never_fire_inside_the_current_tick_early(self) -> None:
        wheel = TimingWheel(tick_ms=10, wheel_size=5, start_ms=1003)
        assert wheel.current_ms == 1003
        entry = wheel.add(1007, "same tick")
        later = wheel.add(1017, "next tick")
        # Kafka would run the first at once (it is within the current tick); it waits here.
        assert wheel.advance(1006) == []
        assert wheel.next_expiration_ms() == 1007
        assert wheel.advance(1007) == [entry]
        assert wheel.next_expiration_ms() == 1010
        assert wheel.advance(1010) == []
        assert wheel.next_expiration_ms() == 1017
        assert wheel.advance(1020) == [later]

    def test_ten_years_at_one_ms_with_the_default_wheel(self) -> None:
        start_ms = 1_700_000_000_123
        wheel = TimingWheel(start_ms=start_ms)
        far = wheel.add(start_ms + TEN_YEARS_MS, "far")
        near = wheel.add(start_ms + 7, "near")
        assert wheel.level_count == 4
        assert wheel.level_interval_ms(3) >= TEN_YEARS_MS
        fired, wakeups = drive(wheel, start_ms + TEN_YEARS_MS - 1)
        assert fired == [near]
        assert far.active
        # Only a handful of buckets ever expire: one per level on the way down, never empty ones.
        assert wakeups <= 2 * wheel.level_count
        assert wheel.advance(start_ms + TEN_YEARS_MS) == [far]

    def test_beyond_ten_years_still_fits(self) -> None:
        wheel = TimingWheel(start_ms=0)
        entry = wheel.add(2**62, "eons")
        fired, _ = drive(wheel, 2**62)
        assert fired == [entry]

    def test_a_bucket_is_queued_once_per_round_not_once_per_entry(self) -> None:
        wheel = TimingWheel(tick_ms=1, wheel_size=5, start_ms=1000)
        for _ in range(100):
            wheel.add(1003, None)  # one level-0 bucket
            wheel.add(1011, None)  # one level-1 bucket, [1010, 1015)
            wheel.add(1013, None)
        # White-box: Kafka's rule keeps the heap of bucket expirations this small.
        assert len(wheel._queue) == 2
        assert len(wheel.advance(1003)) == 100
        assert wheel.next_expiration_ms() == 1010

    def test_rejects_nonsense_parameters(self) -> None:
        with pytest.raises(ValueError):
            TimingWheel(tick_ms=0)
        with pytest.raises(ValueError):
            TimingWheel(wheel_size=1)
        with pytest.raises(ValueError):
            TimingWheel(start_ms=-1)


class TestDueAndAdvance:
    def test_past_expiration_is_due_at_the_next_advance(self) -> None:
        wheel = TimingWheel(tick_ms=1, wheel_size=5, start_ms=1000)
        entry = wheel.add(900, "late")
        now = wheel.add(1000, "now")
        assert len(wheel) == 2
        assert wheel.next_expiration_ms() == 1000
        assert wheel.advance(1000) == [entry, now]
        assert len(wheel) == 0

    def test_advance_with_nothing_due(self) -> None:
        wheel = TimingWheel(tick_ms=1, wheel_size=5, start_ms=1000)
        entry = wheel.add(1020, "x")
        assert wheel.advance(1010) == []
        assert wheel.current_ms == 1010
        assert len(wheel) == 1
        assert entry.active

    def test_time_never_goes_back(self) -> None:
        wheel = TimingWheel(tick_ms=1, wheel_size=5, start_ms=1000)
        wheel.advance(1010)
        entry = wheel.add(1005, "x")
        assert wheel.advance(1001) == [entry]
        assert wheel.current_ms == 1010

    def test_a_jump_over_many_levels_releases_everything_once(self) -> None:
        wheel = TimingWheel(tick_ms=1, wheel_size=4, start_ms=0)
        entries = [wheel.add(ms, ms) for ms in range(1, 500)]
        fired = wheel.advance(10_000)
        assert sorted(entry.expiration_ms for entry in fired) == list(range(1, 500))
        assert all(entry.fired for entry in entries)
        assert wheel.next_expiration_ms() is None

    def test_pop_due_hands_out_one_at_a_time_and_honours_cancel(self) -> None:
        wheel = TimingWheel(tick_ms=1, wheel_size=5, start_ms=1000)
        first = wheel.add(1001, "first")
        second = wheel.add(1001, "second")
        wheel.advance_clock(1001)
        assert len(wheel) == 2
        assert wheel.pop_due() is first
        # e.g. the first callback cancels the second before it was handed out
        second.cancel()
        assert wheel.pop_due() is None
        assert second.cancelled and not second.fired
        assert len(wheel) == 0


class TestCancel:
    def test_cancelled_entry_never_fires_and_frees_its_payload(self) -> None:
        wheel = TimingWheel(tick_ms=1, wheel_size=5, start_ms=1000)
        keep = wheel.add(1003, "keep")
        drop = wheel.add(1003, "drop")
        drop.cancel()
        assert len(wheel) == 1
        assert drop.cancelled and not drop.active and not drop.fired
        assert drop.payload is None
        assert wheel.advance(1100) == [keep]

    def test_cancel_after_fire_is_a_no_op(self) -> None:
        wheel = TimingWheel(tick_ms=1, wheel_size=5, start_ms=1000)
        entry = wheel.add(1003, "x")
        other = wheel.add(1050, "y")
        assert wheel.advance(1003) == [entry]
        entry.cancel()
        assert entry.fired and not entry.cancelled
        assert entry.payload == "x"
        assert len(wheel) == 1
        assert other.active

    def test_cancel_twice_is_a_no_op(self) -> None:
        wheel = TimingWheel(tick_ms=1, wheel_size=5, start_ms=1000)
        entry = wheel.add(1003, "x")
        wheel.add(1004, "y")
        entry.cancel()
        entry.cancel()
        assert len(wheel) == 1

    def test_cancel_while_due_but_not_handed_out(self) -> None:
        wheel = TimingWheel(tick_ms=1, wheel_size=5, start_ms=1000)
        entry = wheel.add(999, "x")
        entry.cancel()
        assert len(wheel) == 0
        assert wheel.next_expiration_ms() is None
        assert wheel.advance(1001) == []

    def test_emptied_buckets_are_not_reported_as_next_expiration(self) -> None:
        wheel = TimingWheel(tick_ms=1, wheel_size=5, start_ms=1000)
        soon = wheel.add(1002, "soon")
        later = wheel.add(1004, "later")
        soon.cancel()
        assert wheel.next_expiration_ms() == 1004
        later.cancel()
        assert wheel.next_expiration_ms() is None
        # The emptied bucket can be reused in the same round.
        again = wheel.add(1002, "again")
        assert wheel.next_expiration_ms() == 1002
        assert wheel.advance(1002) == [again]

    def test_cancel_in_a_cascaded_bucket(self) -> None:
        wheel = TimingWheel(tick_ms=1, wheel_size=5, start_ms=1000)
        entries = [wheel.add(1000 + delay_ms, delay_ms) for delay_ms in range(5, 30)]
        wheel.advance(1005)  # cascades level-1 bucket [1005, 1010) into level 0
        entries[3].cancel()  # 1008, now at level 0
        entries[10].cancel()  # 1015, still at level 1
        fired, _ = drive(wheel, 1030)
        assert sorted(entry.expiration_ms - 1000 for entry in fired) == [
            delay_ms for delay_ms in range(6, 30) if delay_ms not in (8, 15)
        ]


def payload_id(entry: TimerEntry) -> int:
    assert isinstance(entry.payload, int) or entry.cancelled
    return entry.payload if isinstance(entry.payload, int) else -1


class WheelAgainstSortedModel(RuleBasedStateMachine):
    """Random add / cancel / advance against a plain dict of pending expirations."""

    entries = Bundle("entries")

    @initialize(
        tick_ms=st.sampled_from([1, 1, 2, 3, 10]),
        wheel_size=st.integers(min_value=2, max_value=5),
        start_ms=st.integers(min_value=0, max_value=50),
    )
    def start(self, tick_ms: int, wheel_size: int, start_ms: int) -> None:
        self.wheel = TimingWheel(tick_ms=tick_ms, wheel_size=wheel_size, start_ms=start_ms)
        self.now_ms = start_ms
        self.pending: dict[int, int] = {}  # payload -> expiration_ms
        self.next_id = 0

    def check_fired(self, fired: list[TimerEntry]) -> None:
        fired_ids = [entry.payload for entry in fired]
        assert len(fired_ids) == len(set(fired_ids)), "an entry came out twice"
        due = {key for key, expiration_ms in self.pending.items() if expiration_ms <= self.now_ms}
        assert set(fired_ids) == due
        for entry in fired:
            assert entry.fired
            assert entry.expiration_ms <= self.now_ms
            del self.pending[payload_id(entry)]

    @rule(
        target=entries,
        delays_ms=st.lists(
            st.one_of(
                st.integers(min_value=-5, max_value=60),
                st.integers(min_value=60, max_value=5000),
                st.sampled_from([10**6, 10**9, 10**12]),
            ),
            min_size=1,
            max_size=5,
        ),
    )
    def add(self, delays_ms: list[int]) -> multiple[TimerEntry]:
        added = []
        for delay_ms in delays_ms:
            expiration_ms = self.now_ms + delay_ms
            added.append(self.wheel.add(expiration_ms, self.next_id))
            self.pending[self.next_id] = expiration_ms
            self.next_id += 1
        return multiple(*added)

    @rule(entry=consumes(entries))
    def cancel(self, entry: TimerEntry) -> None:
        was_active = entry.active
        key = payload_id(entry)
        entry.cancel()
        if was_active:
            assert entry.cancelled
            del self.pending[key]
        assert not entry.active

    @rule(entry=entries)
    def cancel_again_changes_nothing_once_done(self, entry: TimerEntry) -> None:
        if not entry.active:
            fired = entry.fired
            entry.cancel()
            assert entry.fired == fired

    @rule(step_ms=st.one_of(st.integers(min_value=0, max_value=30), st.integers(0, 3000)))
    def advance(self, step_ms: int) -> None:
        self.now_ms += step_ms
        self.check_fired(self.wheel.advance(self.now_ms))

    @rule()
    def advance_to_next_expiration(self) -> None:
        next_ms = self.wheel.next_expiration_ms()
        if next_ms is not None:
            self.now_ms = max(self.now_ms, next_ms)
            self.check_fired(self.wheel.advance(self.now_ms))

    @rule(step_ms=st.integers(min_value=0, max_value=30), take=st.integers(0, 3))
    def advance_clock_and_pop_some(self, step_ms: int, take: int) -> None:
        self.now_ms += step_ms
        self.wheel.advance_clock(self.now_ms)
        for _ in range(take):
            entry = self.wheel.pop_due()
            if entry is None:
                break
            assert entry.fired
            assert entry.expiration_ms <= self.now_ms
            del self.pending[payload_id(entry)]

    @invariant()
    def counts_and_next_expiration_agree_with_the_model(self) -> None:
        assert len(self.wheel) == len(self.pending)
        next_ms = self.wheel.next_expiration_ms()
        if not self.pending:
            assert next_ms is None
            return
        assert next_ms is not None
        earliest_ms = min(self.pending.values())
        # The driver may never sleep past a pending entry; when nothing is due it must not wake
        # for the current moment again either.
        assert next_ms <= max(earliest_ms, self.now_ms)
        if earliest_ms > self.now_ms:
            assert next_ms > self.now_ms


TestWheelAgainstSortedModel = WheelAgainstSortedModel.TestCase
TestWheelAgainstSortedModel.settings = settings(
    max_examples=300,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
