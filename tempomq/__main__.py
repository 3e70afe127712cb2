"""``python -m tempomq``: the same command line as the ``tempomq`` script."""

from __future__ import annotations

from tempomq.cli import main

raise SystemExit(main())
