"""Client-side message ids: the server's layout, time-ordered, unique within a process."""

from __future__ import annotations

import re

from tempomq.client.ids import MsgIdGenerator, msg_id_time_ms, new_msg_id


def test_ids_are_32_lowercase_hex_and_carry_their_time() -> None:
    ids = MsgIdGenerator()
    msg_id = ids.next(1_795_000_000_123)
    assert re.fullmatch(r"[0-9a-f]{32}", msg_id)
    assert msg_id_time_ms(msg_id) == 1_795_000_000_123


def test_ids_increase_even_when_the_clock_steps_back() -> None:
    ids = MsgIdGenerator()
    made = [ids.next(t) for t in (1000, 1000, 999, 1001, 500)]
    assert made == sorted(made) and len(set(made)) == len(made)
    assert [msg_id_time_ms(m) for m in made] == [1000, 1000, 1000, 1001, 1001]


def test_two_generators_do_not_collide_in_the_same_millisecond() -> None:
    a, b = MsgIdGenerator(), MsgIdGenerator()
    assert {a.next(7) for _ in range(1000)}.isdisjoint({b.next(7) for _ in range(1000)})


def test_new_msg_id_is_fresh_each_time() -> None:
    assert len({new_msg_id() for _ in range(10_000)}) == 10_000
