"""The asyncio driver of the timing wheel: the service's ``Timers`` (epoch milliseconds).

One background task owns the wheel's clock. It sleeps, via ``loop.call_at`` on the loop's monotonic
clock, until the wheel's next non-empty bucket; a ``call_at`` earlier than that wakes it. On waking
it re-reads the epoch clock (the monotonic and epoch clocks drift apart), advances the wheel and
runs the due callbacks on the loop, in batches with a yield between them so that a burst of due
timers never starves the rest of the service. Callbacks are taken from the wheel one at a time, so
a timer cancelled by an earlier callback of the same burst does not run.

On Linux the sleep ends at an alarm (:class:`RealtimeAlarm`, a ``timerfd`` on ``CLOCK_REALTIME``
armed at the epoch nanosecond the next bucket starts, watched by the loop like a socket): the
driver wakes within tens of microseconds of a timer's time. ``loop.call_at`` alone wakes it at
millisecond granularity under uvloop (libuv keeps time in whole milliseconds), 0.3 ms late at the
median and up to 1 ms at p99, and spins through the last millisecond. The loop's own timer stays
armed a little later as a backstop.

Not thread-safe: call it from the event loop's thread.
"""

from __future__ import annotations

import asyncio
import ctypes
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, cast

import structlog

from delayserver.wheel import TimerEntry, TimingWheel

if TYPE_CHECKING:
    from broker_core.protocols import Timers

__all__ = ["RealtimeAlarm", "TimerService", "epoch_ms"]

log = structlog.get_logger(__name__)

Callback = Callable[[], None]


def epoch_ms() -> int:
    return time.time_ns() // 1_000_000


def _release(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_CLOCK_REALTIME = 0
_TFD_TIMER_ABSTIME = 1
_MAX_NS = (1 << 63) - 1
#: The backstop: the loop's own timer, this much after the alarm's time.
_BACKSTOP_S = 0.002


class RealtimeAlarm:
    """One alarm at an absolute epoch time in nanoseconds, delivered on the event loop: a Linux
    ``timerfd`` (``timerfd_create(2)``) on ``CLOCK_REALTIME`` with ``TFD_TIMER_ABSTIME``, whose
    descriptor the loop watches. It fires when the wall clock reaches the time, so a step of the
    clock moves it as it moves the time it stands for. Arming again replaces the time.

    :meth:`open` returns None where there is no ``timerfd`` (not Linux): the caller then keeps
    to ``loop.call_at``. Not thread-safe: use it from the loop's thread.
    """

    __slots__ = ("_callback", "_fd", "_loop", "_settime", "_spec")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, fd: int, settime: Callable[[int, int], None]
    ) -> None:
        self._loop = loop
        self._fd = fd
        self._settime = settime
        self._callback: Callable[[], None] | None = None
        loop.add_reader(fd, self._ready)

    @classmethod
    def open(cls, loop: asyncio.AbstractEventLoop) -> RealtimeAlarm | None:
        if not sys.platform.startswith("linux"):
            return None
        flags = os.O_NONBLOCK | os.O_CLOEXEC
        try:
            if sys.version_info >= (3, 13):
                fd = os.timerfd_create(time.CLOCK_REALTIME, flags=flags)

                def settime(fd: int, ns: int) -> None:
                    os.timerfd_settime_ns(fd, flags=os.TFD_TIMER_ABSTIME, initial=ns)

                return cls(loop, fd, settime)
            libc = ctypes.CDLL(None, use_errno=True)
            create, set_ = libc.timerfd_create, libc.timerfd_settime
        except (OSError, AttributeError):
            return None
        create.argtypes, create.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        set_.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec), ctypes.c_void_p]
        set_.restype = ctypes.c_int
        fd = create(_CLOCK_REALTIME, flags)
        if fd < 0:
            return None
        spec = _Itimerspec()
        value = spec.it_value
        ref = ctypes.byref(spec)

        def settime_c(fd: int, ns: int) -> None:
            value.tv_sec, value.tv_nsec = divmod(ns, 1_000_000_000)
            if set_(fd, _TFD_TIMER_ABSTIME, ref, None) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))

        return cls(loop, fd, settime_c)

    def arm(self, epoch_ns: int, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the loop once the wall clock reaches ``epoch_ns`` (at once if it
        has); replaces the time and callback armed before."""
        self._callback = callback
        # 0 would disarm; beyond the year 2262 a time no longer fits 64 bits of nanoseconds.
        self._settime(self._fd, min(max(epoch_ns, 1), _MAX_NS))

    def disarm(self) -> None:
        self._callback = None
        self._settime(self._fd, 0)

    def close(self) -> None:
        self._callback = None
        self._loop.remove_reader(self._fd)
        os.close(self._fd)

    def _ready(self) -> None:
        try:
            os.read(self._fd, 8)  # the expiration count; reading it resets readiness
        except BlockingIOError:
            return  # re-armed since it became readable: not due yet
        callback, self._callback = self._callback, None
        if callback is not None:
            callback()


class TimerService:
    """One-shot timers on the event loop, backed by a ``TimingWheel`` (tick 1 ms).

    ``max_sleep_ms`` bounds one sleep so that a step of the wall clock (NTP) delays timers by at
    most that much; ``None`` sleeps until the next bucket however far away it is. ``alarm``: wake
    at a :class:`RealtimeAlarm` where there is one (the default; with the default clock only).
    """

    def __init__(
        self,
        *,
        clock: Callable[[], int] | None = None,
        batch_size: int = 1024,
        max_sleep_ms: int | None = 1000,
        alarm: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        # With the default clock the driver can aim at the start of a millisecond to the
        # nanosecond; an injected clock only tells whole milliseconds.
        self._precise = clock is None
        self._clock = epoch_ms if clock is None else clock
        self._batch_size = batch_size
        self._max_sleep_ms = max_sleep_ms
        self._wheel = TimingWheel(start_ms=self._clock())
        self._task: asyncio.Task[None] | None = None
        # Set while the driver sleeps: resolving it wakes the driver before _wake_ms.
        self._waiter: asyncio.Future[None] | None = None
        self._wake_ms: float = math.inf
        self._use_alarm = alarm and self._precise
        self._alarm: RealtimeAlarm | None = None

    def now_ms(self) -> int:
        return self._clock()

    @property
    def pending(self) -> int:
        """Timers neither run nor cancelled."""
        return len(self._wheel)

    def call_at(self, when_ms: int, callback: Callback) -> TimerEntry:
        """Run ``callback`` on the loop at ``when_ms`` (soon if that has passed)."""
        entry = self._wheel.add(when_ms, callback)
        if self._waiter is not None and when_ms < self._wake_ms:
            _release(self._waiter)
        return entry

    def call_at_many(self, items: Sequence[tuple[int, Callback]]) -> list[TimerEntry]:
        """``call_at`` for each item, waking the driver at most once."""
        add = self._wheel.add
        entries = [add(when_ms, callback) for when_ms, callback in items]
        waiter = self._waiter
        if waiter is not None and items and min(when for when, _ in items) < self._wake_ms:
            _release(waiter)
        return entries

    def start(self) -> None:
        """Start the driver on the running loop; timers added before wait until now."""
        if self._task is not None:
            raise RuntimeError("TimerService already started")
        loop = asyncio.get_running_loop()
        if self._use_alarm:
            self._alarm = RealtimeAlarm.open(loop)
        self._task = loop.create_task(self._run(), name="timer-service")

    async def stop(self) -> None:
        """Stop the driver and wait for it; pending timers stay, to run after a new ``start``."""
        task = self._task
        if task is None:
            return
        self._task = None
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # our caller is being cancelled too; not ours to swallow
        finally:
            alarm, self._alarm = self._alarm, None
            if alarm is not None:
                alarm.close()

    async def _run(self) -> None:
        try:
            await self._drive()
        except Exception:
            # A bug here would otherwise stay silent until stop() finally awaits the task.
            log.exception("timers.driver_failed")
            raise

    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()
        wheel = self._wheel
        while True:
            await self._run_due()
            next_ms = wheel.next_expiration_ms()
            now_ms = self._clock()
            if next_ms is not None and next_ms <= now_ms:
                # More fell due while callbacks ran; let the loop in before running them.
                await asyncio.sleep(0)
                continue
            await self._sleep(loop, next_ms, now_ms)

    async def _run_due(self) -> None:
        wheel = self._wheel
        pop_due = wheel.pop_due
        while True:
            wheel.advance_clock(self._clock())
            for _ in range(self._batch_size):
                entry = pop_due()
                if entry is None:
                    return
                try:
                    cast(Callback, entry.payload)()
                except Exception:
                    log.exception("timers.callback_failed", expiration_ms=entry.expiration_ms)
            await asyncio.sleep(0)

    async def _sleep(
        self, loop: asyncio.AbstractEventLoop, next_ms: int | None, now_ms: int
    ) -> None:
        wake_ms = next_ms
        max_sleep_ms = self._max_sleep_ms
        if max_sleep_ms is not None and (wake_ms is None or wake_ms > now_ms + max_sleep_ms):
            wake_ms = now_ms + max_sleep_ms
        waiter: asyncio.Future[None] = loop.create_future()
        handle: asyncio.TimerHandle | None = None
        alarm = self._alarm
        if wake_ms is None:
            self._wake_ms = math.inf  # nothing pending: only a call_at ends this sleep
        else:
            self._wake_ms = wake_ms
            delay_s = self._seconds_until(wake_ms, now_ms)
            if alarm is not None:
                alarm.arm(wake_ms * 1_000_000, partial(_release, waiter))
                delay_s += _BACKSTOP_S
            handle = loop.call_at(loop.time() + delay_s, _release, waiter)
        self._waiter = waiter
        try:
            await waiter
        finally:
            self._waiter = None
            if handle is not None:
                handle.cancel()

    def _seconds_until(self, wake_ms: int, now_ms: int) -> float:
        if self._precise:
            return max(0.0, (wake_ms * 1_000_000 - time.time_ns()) / 1e9)
        return max(0.0, (wake_ms - now_ms) / 1000)


if TYPE_CHECKING:
    _held_to_the_protocol: Timers = TimerService()
