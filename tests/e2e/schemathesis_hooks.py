"""Schemathesis hooks for the spec run (``SCHEMATHESIS_HOOKS``): rules a schema cannot state.

- ``deliver_at`` may be at most 10 years after *now*, a bound that moves; the schema states its
  fixed lower bound only. A generated time past the moving bound is pulled back to an hour from
  now, so a valid case stays valid.
- Which ``check_url`` hosts a server accepts is its operator's policy; generated transactions
  leave the field out (the check-URL tests cover it).

Every other value is sent as generated.
"""

from __future__ import annotations

import time
from typing import Any

import schemathesis

from broker_core.http import MAX_DELAY_MS

_HOUR_MS = 3600_000


def _pull_back(value: Any, now_ms: int) -> None:
    if isinstance(value, list):
        for item in value:
            _pull_back(item, now_ms)
    elif isinstance(value, dict):
        at = value.get("deliver_at")
        number = isinstance(at, (int, float)) and not isinstance(at, bool)
        if number and at - now_ms > MAX_DELAY_MS - _HOUR_MS:
            value["deliver_at"] = now_ms + _HOUR_MS
        for item in value.values():
            _pull_back(item, now_ms)


@schemathesis.hook
def map_case(context: schemathesis.HookContext, case: schemathesis.Case) -> schemathesis.Case:
    _pull_back(case.body, time.time_ns() // 1_000_000)
    if isinstance(case.body, dict) and "producer_group" in case.body:
        case.body.pop("check_url", None)
    return case
