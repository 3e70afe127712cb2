"""What docs/examples/producer.py and consumer.py print, parsed: shared by the tests that run
them against a spawned server (tests/e2e) and inside the compose stack (tests/compose)."""

from __future__ import annotations

import re

#: The producer prints ``<kind> <msg_id>  <body>`` per message.
SENT = re.compile(r"^(plain|delayed|committed|rolled-back)\s+([0-9a-f]+)\s+(.+)$")
#: The consumer prints ``<msg_id> attempt=<n> tags=<tags> <body>`` per message.
RECEIVED = re.compile(r"^([0-9a-f]+) attempt=(\d+) tags=(\S+) (.+)$")


def sent_by_kind(stdout: str) -> dict[str, list[str]]:
    """The producer's message ids by kind (``plain``, ``delayed``, ``committed``, ...)."""
    kinds: dict[str, list[str]] = {}
    for line in stdout.splitlines():
        match = SENT.match(line)
        if match:
            kinds.setdefault(match.group(1), []).append(match.group(2))
    return kinds


def received_lines(stdout: str) -> dict[str, str]:
    """The consumer's line for each message id it printed (the last, if printed again)."""
    return {m.group(1): line for line in stdout.splitlines() if (m := RECEIVED.match(line))}


def received_ids(stdout: str) -> list[str]:
    """Every message id the consumer printed, in order, repeats included."""
    return [m.group(1) for line in stdout.splitlines() if (m := RECEIVED.match(line))]
