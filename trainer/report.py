"""How every trainer command reports its result: one JSON document on stdout with --json (for the
controller and for scripts), one line for people on stderr otherwise."""

from __future__ import annotations

import json
import sys
from typing import Any


def report(result: dict[str, Any], as_json: bool, line: str) -> int:
    """Print the result the way the caller asked; returns the command's exit code (0)."""
    if as_json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(line, file=sys.stderr)
    return 0
