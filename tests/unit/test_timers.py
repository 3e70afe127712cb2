"""TimerService on a real event loop: behaviour, with generous upper bounds on lateness."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Callable

import pytest
from structlog.testing import capture_logs

from broker_core.protocols import TimerHandle, Timers
from delayserver import timers as timers_module
from delayserver.timers import RealtimeAlarm, TimerService, epoch_ms

# Loaded CI machines stall; lateness is a benchmark's business, here it only must not be absurd.
LATE_MS = 200
WAIT_S = 5.0


@pytest.fixture
async def service() -> AsyncIterator[TimerService]:
    timers = TimerService(max_sleep_ms=None)
    timers.start()
    yield timers
    await timers.stop()


class Recorder:
    """Callbacks that note the epoch time they ran at; ``done`` is set after ``expected`` runs."""

    def __init__(self, expected: int) -> None:
        self.runs: list[tuple[str, int]] = []
        self.expected = expected
        self.done = asyncio.Event()

    def callback(self, name: str) -> Callable[[], None]:
        def run() -> None:
            self.runs.append((name, epoch_ms()))
            if len(self.runs) >= self.expected:
                self.done.set()

        return run

    async def wait(self) -> None:
        await asyncio.wait_for(self.done.wait(), WAIT_S)


def assert_on_time(fired_ms: int, when_ms: int) -> None:
    assert fired_ms >= when_ms, f"fired {when_ms - fired_ms} ms early"
    assert fired_ms < when_ms + LATE_MS, f"fired {fired_ms - when_ms} ms late"


async def test_is_a_timers_implementation(service: TimerService) -> None:
    timers: Timers = service
    assert abs(timers.now_ms() - epoch_ms()) <= 1


async def test_timers_fire_in_order_never_early(service: TimerService) -> None:
    recorder = Recorder(expected=4)
    now_ms = service.now_ms()
    whens = {"c": now_ms + 60, "a": now_ms + 20, "b": now_ms + 40, "d": now_ms + 61}
    for name, when_ms in whens.items():
        service.call_at(when_ms, recorder.callback(name))
    assert service.pending == 4
    await recorder.wait()
    assert [name for name, _ in recorder.runs] == ["a", "b", "c", "d"]
    for name, fired_ms in recorder.runs:
        assert_on_time(fired_ms, whens[name])
    assert service.pending == 0


async def test_past_time_runs_soon(service: TimerService) -> None:
    recorder = Recorder(expected=1)
    service.call_at(service.now_ms() - 10_000, recorder.callback("past"))
    await recorder.wait()


async def test_cancel(service: TimerService) -> None:
    recorder = Recorder(expected=1)
    now_ms = service.now_ms()
    handle = service.call_at(now_ms + 20, recorder.callback("cancelled"))
    service.call_at(now_ms + 40, recorder.callback("kept"))
    handle.cancel()
    assert service.pending == 1
    await recorder.wait()
    await asyncio.sleep(0.03)
    assert [name for name, _ in recorder.runs] == ["kept"]
    handle.cancel()  # after the fact: still a no-op


async def test_an_earlier_timer_wakes_the_sleeping_driver(service: TimerService) -> None:
    recorder = Recorder(expected=1)
    service.call_at(service.now_ms() + 60_000, recorder.callback("late"))
    await asyncio.sleep(0.05)  # the driver is now asleep until the late one
    when_ms = service.now_ms() + 30
    service.call_at(when_ms, recorder.callback("early"))
    await recorder.wait()
    assert recorder.runs[0][0] == "early"
    assert_on_time(recorder.runs[0][1], when_ms)


async def test_call_at_many_wakes_once_and_fires_all(service: TimerService) -> None:
    recorder = Recorder(expected=50)
    service.call_at(service.now_ms() + 60_000, recorder.callback("late"))
    await asyncio.sleep(0.02)
    now_ms = service.now_ms()
    items = [(now_ms + 10 + i % 7, recorder.callback(str(i))) for i in range(50)]
    handles = service.call_at_many(items)
    assert len(handles) == 50
    await recorder.wait()
    assert sorted(int(name) for name, _ in recorder.runs) == list(range(50))
    for name, fired_ms in recorder.runs:
        assert_on_time(fired_ms, items[int(name)][0])


async def test_a_failing_callback_is_logged_and_the_driver_goes_on(service: TimerService) -> None:
    recorder = Recorder(expected=2)

    def boom() -> None:
        raise RuntimeError("boom")

    now_ms = service.now_ms()
    with capture_logs() as logs:
        service.call_at(now_ms + 10, recorder.callback("before"))
        service.call_at(now_ms + 10, boom)
        service.call_at(now_ms + 10, recorder.callback("same batch"))
        await recorder.wait()
    assert [name for name, _ in recorder.runs] == ["before", "same batch"]
    assert [entry["event"] for entry in logs] == ["timers.callback_failed"]

    later = Recorder(expected=1)
    service.call_at(service.now_ms() + 10, later.callback("after"))
    await later.wait()


async def test_a_callback_can_cancel_a_timer_of_the_same_batch(service: TimerService) -> None:
    recorder = Recorder(expected=2)
    when_ms = service.now_ms() + 10
    victims: list[TimerHandle] = []
    run_first = recorder.callback("first")

    def first() -> None:
        run_first()
        victims[0].cancel()

    service.call_at(when_ms, first)
    victims.append(service.call_at(when_ms, recorder.callback("victim")))
    service.call_at(when_ms + 1, recorder.callback("last"))
    await recorder.wait()
    assert [name for name, _ in recorder.runs] == ["first", "last"]


async def test_a_burst_runs_in_batches_that_let_the_loop_in() -> None:
    service = TimerService(batch_size=100, max_sleep_ms=None)
    seen_ticks: list[int] = []
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    when_ms = service.now_ms()
    service.call_at_many([(when_ms, lambda: seen_ticks.append(ticks)) for _ in range(1000)])
    ticking = asyncio.create_task(ticker())
    service.start()
    try:
        while service.pending:
            await asyncio.sleep(0.01)
    finally:
        ticking.cancel()
        await service.stop()
    assert len(seen_ticks) == 1000
    # Ten batches, and the ticker ran between them.
    assert len(set(seen_ticks)) >= 10


async def test_call_at_before_start_waits_for_start() -> None:
    service = TimerService(max_sleep_ms=None)
    recorder = Recorder(expected=2)
    now_ms = service.now_ms()
    service.call_at(now_ms + 10, recorder.callback("due before start"))
    service.call_at(now_ms + 100, recorder.callback("due after start"))
    await asyncio.sleep(0.05)
    assert recorder.runs == []
    service.start()
    try:
        await recorder.wait()
    finally:
        await service.stop()
    assert [name for name, _ in recorder.runs] == ["due before start", "due after start"]
    assert_on_time(recorder.runs[1][1], now_ms + 100)


async def test_stop_is_clean_and_keeps_pending_timers() -> None:
    service = TimerService()
    recorder = Recorder(expected=1)
    service.start()
    with pytest.raises(RuntimeError):
        service.start()
    when_ms = service.now_ms() + 50
    service.call_at(when_ms, recorder.callback("x"))
    await asyncio.sleep(0.01)
    tasks_before = asyncio.all_tasks()
    await service.stop()
    assert len(asyncio.all_tasks()) == len(tasks_before) - 1
    await service.stop()  # twice is fine
    await asyncio.sleep(0.08)
    assert recorder.runs == []
    assert service.pending == 1
    service.start()
    try:
        await recorder.wait()
    finally:
        await service.stop()
    assert recorder.runs[0][1] >= when_ms


async def test_stop_while_a_burst_is_running() -> None:
    service = TimerService(batch_size=10)
    service.call_at_many([(service.now_ms(), lambda: None) for _ in range(1000)])
    service.start()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    await service.stop()
    assert 0 < service.pending < 1000


async def test_an_injected_clock_is_rechecked_on_every_wake_up() -> None:
    fake_ms = 1_000_000
    service = TimerService(clock=lambda: fake_ms, max_sleep_ms=None)
    recorder = Recorder(expected=1)
    service.call_at(fake_ms + 10, recorder.callback("x"))
    service.start()
    try:
        # The driver wakes after about 10 ms of real time, sees the clock unmoved, sleeps again.
        await asyncio.sleep(0.1)
        assert recorder.runs == []
        fake_ms += 10
        await recorder.wait()
    finally:
        await service.stop()


async def test_max_sleep_bounds_a_sleep_after_the_wall_clock_jumps() -> None:
    offset_ms = 0
    service = TimerService(clock=lambda: epoch_ms() + offset_ms, max_sleep_ms=50)
    recorder = Recorder(expected=1)
    service.call_at(service.now_ms() + 3_600_000, recorder.callback("in an hour"))
    service.start()
    try:
        await asyncio.sleep(0.02)
        offset_ms = 3_600_000  # NTP stepped the clock forward an hour
        await recorder.wait()
    finally:
        await service.stop()


# -- the realtime alarm (Linux timerfd) ----------------------------------------------------------

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the realtime alarm is a Linux timerfd"
)


@linux_only
async def test_the_alarm_wakes_the_driver_before_the_loops_own_timer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The loop's timer is only a backstop; held back 30 s, the timer still runs on time.
    monkeypatch.setattr(timers_module, "_BACKSTOP_S", 30.0)
    service = TimerService(max_sleep_ms=None)
    service.start()
    try:
        recorder = Recorder(expected=1)
        due = service.now_ms() + 20
        service.call_at(due, recorder.callback("soon"))
        await recorder.wait()
        [(_, ran_at)] = recorder.runs
        assert due <= ran_at <= due + LATE_MS
    finally:
        await service.stop()


@pytest.fixture
async def alarm() -> AsyncIterator[RealtimeAlarm]:
    """An alarm on the running loop, closed after the test."""
    opened = RealtimeAlarm.open(asyncio.get_running_loop())
    assert opened is not None
    try:
        yield opened
    finally:
        opened.close()


@linux_only
async def test_an_alarm_fires_at_its_time_never_before(alarm: RealtimeAlarm) -> None:
    fired: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    target = time.time_ns() + 15_000_000
    alarm.arm(target, lambda: fired.set_result(time.time_ns()))
    async with asyncio.timeout(WAIT_S):
        assert await fired >= target


@linux_only
async def test_arming_again_replaces_the_time_and_disarm_stops_it() -> None:
    loop = asyncio.get_running_loop()
    alarm = RealtimeAlarm.open(loop)
    assert alarm is not None
    runs: list[str] = []
    try:
        now = time.time_ns()
        alarm.arm(now + 30_000_000, lambda: runs.append("first"))
        alarm.arm(now + 5_000_000, lambda: runs.append("second"))
        await asyncio.sleep(0.1)
        assert runs == ["second"]
        alarm.arm(time.time_ns() + 5_000_000, lambda: runs.append("third"))
        alarm.disarm()
        await asyncio.sleep(0.1)
        assert runs == ["second"]
    finally:
        alarm.close()
    assert not loop.remove_reader(alarm._fd)  # closed: no longer watched


async def test_without_an_alarm_the_loops_timer_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(RealtimeAlarm, "open", classmethod(lambda cls, loop: None))
    service = TimerService(max_sleep_ms=None)
    service.start()
    try:
        recorder = Recorder(expected=3)
        now = service.now_ms()
        for i, ms in enumerate((30, 10, 20)):
            service.call_at(now + ms, recorder.callback(str(i)))
        await recorder.wait()
        assert [name for name, _ in recorder.runs] == ["1", "2", "0"]
        assert all(
            ran >= now + ms for (_, ran), ms in zip(recorder.runs, (10, 20, 30), strict=True)
        )
    finally:
        await service.stop()


@linux_only
async def test_an_alarm_beyond_what_64_bits_of_nanoseconds_hold_is_armed_not_refused(
    alarm: RealtimeAlarm,
) -> None:
    runs: list[str] = []
    alarm.arm(1 << 80, lambda: runs.append("never"))
    alarm.arm(time.time_ns() + 5_000_000, lambda: runs.append("soon"))
    await asyncio.sleep(0.05)
    assert runs == ["soon"]
