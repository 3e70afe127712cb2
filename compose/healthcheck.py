"""Container health probe for tempomq: exit 0 when ``/readyz`` answers 200, else 1.

The slim Python image has no curl, so this uses the standard library only. The address comes
from ``TEMPOMQ_HTTP`` (the variable the server listens by), with a wildcard host probed on
loopback, so changing the port in one place keeps the probe right. ``python healthcheck.py URL``
probes that URL instead.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence

DEFAULT_HTTP = "127.0.0.1:8080"
TIMEOUT_S = 2.0
_WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def readyz_url(environ: Mapping[str, str]) -> str:
    """The ``/readyz`` URL of the server configured by ``TEMPOMQ_HTTP`` in ``environ``."""
    address = environ.get("TEMPOMQ_HTTP") or DEFAULT_HTTP
    host, _, port = address.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    host = _WILDCARDS.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/readyz"


def probe(url: str, timeout_s: float = TIMEOUT_S) -> int:
    # No proxies: an HTTP_PROXY in the container's environment must not carry a loopback probe.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout_s) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:  # 503 not_ready: its body names the failing checks
        print(f"{url}: {exc.code} {exc.read(2000).decode(errors='replace')}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:  # refused, timed out, not a URL
        print(f"{url}: {exc}", file=sys.stderr)
        return 1
    return 0 if status == 200 else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    return probe(args[0] if args else readyz_url(os.environ))


if __name__ == "__main__":
    raise SystemExit(main())
