"""The crash-trial judge on hand-made event logs: each check counts what it must, and a clean
log counts nothing."""

from __future__ import annotations

from collections import Counter

from tests.chaos.ledger import Counts, Delivery, Ledger, Nack, explain, judge

A, B = "a" * 32, "b" * 32


def clean() -> Ledger:
    """Two acknowledged messages (B delayed to t=500), each delivered once and acked by the one
    working group; everything stored once."""
    ledger = Ledger(groups=("work",))
    ledger.acknowledged = {A: None, B: 500}
    ledger.deliveries = [
        Delivery("work", A, 1, requested_ms=100, answered_ms=110),
        Delivery("work", B, 1, 490, 510, deliver_at_prop_ms=500, released_at_prop_ms=502),
    ]
    ledger.ack("work", A, 120)
    ledger.ack("work", B, 520)
    ledger.stored = Counter({A: 1, B: 1})
    return ledger


def test_a_clean_log_counts_nothing() -> None:
    counts = judge(clean())
    assert counts == Counts(trials=1, acknowledged=2)
    assert counts.failures() == {}


def test_lost_from_the_store() -> None:
    ledger = clean()
    del ledger.stored[B]
    assert judge(ledger).lost == 1


def test_lost_by_a_group_that_never_finished_it() -> None:
    ledger = clean()
    del ledger.acked[("work", A)]
    assert judge(ledger).lost == 1
    ledger.dead["work"] = Counter({A: 1})  # dead-lettered is finished too
    assert judge(ledger).lost == 0


def test_an_unacknowledged_send_is_not_lost_but_may_not_be_stored_twice() -> None:
    ledger = clean()
    ledger.stored["c" * 32] = 1
    assert judge(ledger).failures() == {}
    ledger.stored["c" * 32] = 2
    assert judge(ledger).duplicated == 1


def test_duplicated_in_the_store() -> None:
    ledger = clean()
    ledger.stored[A] = 2
    assert judge(ledger).duplicated == 1


def test_early_by_the_clients_clock() -> None:
    ledger = clean()
    ledger.deliveries.append(Delivery("work", B, 2, 480, 499))
    assert judge(ledger).early == 1


def test_early_by_the_release_stamp() -> None:
    ledger = clean()
    ledger.deliveries[1] = Delivery("work", B, 1, 490, 510, 500, released_at_prop_ms=499)
    assert judge(ledger).early == 1


def test_early_retry_after_a_nack_with_retry_after_ms() -> None:
    ledger = clean()
    # A nacked at 112 (the same ms as nothing else) with 1000 ms; back at 900 is early.
    ledger.nacks.append(Nack("work", A, requested_ms=112, retry_after_ms=1000))
    ledger.deliveries.append(Delivery("work", A, 2, 850, 900))
    assert judge(ledger).early == 1
    # Back after its time is fine; so is a nack with no retry time.
    ledger.deliveries[-1] = Delivery("work", A, 2, 1100, 1113)
    assert judge(ledger).early == 0
    ledger.nacks[-1] = Nack("work", A, 112, None)
    ledger.deliveries[-1] = Delivery("work", A, 2, 850, 900)
    assert judge(ledger).early == 0


def test_a_nack_sent_in_the_ms_its_delivery_arrived_is_after_that_delivery() -> None:
    ledger = clean()
    ledger.nacks.append(Nack("work", A, requested_ms=110, retry_after_ms=1000))
    assert judge(ledger).early == 0


def test_delivered_after_ack() -> None:
    ledger = clean()
    ledger.deliveries.append(Delivery("work", A, 2, requested_ms=121, answered_ms=130))
    assert judge(ledger).delivered_after_ack == 1


def test_a_receive_sent_before_the_ack_was_answered_does_not_count() -> None:
    ledger = clean()
    ledger.deliveries.append(Delivery("work", A, 2, requested_ms=119, answered_ms=130))
    assert judge(ledger).delivered_after_ack == 0


def test_attempt_reset_when_a_redelivery_goes_back_down_or_repeats() -> None:
    ledger = clean()
    ledger.acked.clear()
    ledger.dead["work"] = Counter({A: 1, B: 1})
    ledger.deliveries += [
        Delivery("work", A, 2, 200, 210),
        Delivery("work", A, 1, 300, 310),  # back down: a reset
        Delivery("work", A, 2, 400, 410),  # the same attempt again: a reset too
        Delivery("work", A, 3, 500, 510),
    ]
    assert judge(ledger).attempt_resets == 2


def test_attempts_are_per_group() -> None:
    ledger = clean()
    ledger.deliveries.append(Delivery("audit", A, 1, 700, 710))
    assert judge(ledger).attempt_resets == 0


def test_dlq_duplicates() -> None:
    ledger = clean()
    ledger.dead["poison"] = Counter({A: 2, B: 1})
    assert judge(ledger).dlq_duplicates == 1


def test_counts_add_up_and_print_as_a_table() -> None:
    total = judge(clean()) + Counts(trials=1, acknowledged=3, lost=1)
    assert total == Counts(trials=2, acknowledged=5, lost=1)
    assert total.failures() == {"lost": 1}
    lines = total.table().splitlines()
    assert lines[0].split() == ["trials", "2"]
    assert lines[2].split() == ["lost", "1"]
    assert [line.split()[-1] for line in lines] == ["2", "5", "1", "0", "0", "0", "0", "0"]


def test_explain_names_an_example_of_each_broken_promise() -> None:
    ledger = clean()
    assert explain(ledger) == []
    del ledger.stored[B]
    ledger.stored[A] = 2
    ledger.dead["poison"] = Counter({A: 2})
    ledger.deliveries.append(Delivery("work", A, 1, requested_ms=121, answered_ms=130))
    lines = explain(ledger)
    assert f"lost {B}: stored 0x" in lines
    assert f"duplicated {A}: stored 2x" in lines
    assert f"attempt reset work {A}: attempts in order [1, 1]" in lines
    assert f"DLQ duplicate poison {A}: 2 copies" in lines
    assert any(line.startswith(f"delivered after ack work {A}") for line in lines)


def test_explain_says_when_the_trial_stopped_waiting_and_what_a_group_saw() -> None:
    ledger = clean()
    ledger.gave_up_waiting = True
    del ledger.acked[("work", A)]
    ledger.nacks.append(Nack("work", A, 112, None))
    lines = explain(ledger)
    assert lines[0] == "the groups never finished: the trial stopped waiting"
    assert f"lost {A}: stored 1x, unfinished by work" in lines
    assert "    work: delivered (attempt@ms) ['1@110'], nacked at [112]" in lines


def test_an_ack_the_kill_left_unanswered_may_have_finished_the_message() -> None:
    ledger = clean()
    del ledger.acked[("work", A)]
    assert judge(ledger).lost == 1
    ledger.unsure_acks.add(("work", A))
    assert judge(ledger).lost == 0
    del ledger.stored[A]  # but it must still be in the topic
    assert judge(ledger).lost == 1
