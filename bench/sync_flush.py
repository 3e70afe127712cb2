"""Group commit under ``--flush sync``: one writer awaiting each put (one fdatasync per message)
against 64 concurrent producers (many messages per fdatasync), in the same run on the same disk.

Prints both rates and their ratio (the bar: >= 5x), then one JSON line.
Usage: python bench/sync_flush.py [--single-messages N] [--concurrent-messages N]
"""

from __future__ import annotations

import argparse
import asyncio
import json

from put_inprocess import run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--single-messages", type=int, default=2_000)
    ap.add_argument("--concurrent-messages", type=int, default=64_000)
    args = ap.parse_args()
    body = b"x" * 256
    single = asyncio.run(run("single", args.single_messages, 1, 1, "sync", body))
    many = asyncio.run(run("single", args.concurrent_messages, 64, 1, "sync", body))
    print(f"sync flush, 1 writer:     {single:>10,.0f} msg/s (one fdatasync each)")
    print(f"sync flush, 64 producers: {many:>10,.0f} msg/s")
    print(f"ratio: {many / single:.1f}x (bar: >= 5x)")
    print(
        json.dumps(
            {
                "bench": "sync_flush",
                "single_writer_msg_per_s": round(single),
                "producers_64_msg_per_s": round(many),
                "ratio": round(many / single, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
