"""`bigtrain launch RECIPE [overrides] [flags]` (being built: see issue 4)."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    print("bigtrain launch: not built yet", file=sys.stderr)
    return 2
