"""Measured link speeds, so a sync can say up front how long its transfers will take.

Two routes matter for an image: the laptop's uplink to a host, and the host's link to a
registry. Each sync that moved at least MIN_BYTES on a route records the rate it saw in
`$RUNNER_HOME/link-speeds.json` (a cache: losing it only loses the estimates).
"""

from __future__ import annotations

import contextlib
import json

from runner.files import write_json_atomic
from runner.home import private_dir, runner_home

MIN_BYTES = 4 << 20  # smaller transfers are dominated by latency: their rate says little


def _path():
    return runner_home() / "link-speeds.json"


def _load() -> dict[str, float]:
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(_path().read_text(encoding="utf-8"))
        return {k: float(v) for k, v in data.items()}
    return {}


def _remember(route: str, count: int, seconds: float) -> None:
    if count < MIN_BYTES or seconds <= 0:
        return
    with contextlib.suppress(OSError):
        private_dir(runner_home())
        write_json_atomic(_path(), {**_load(), route: round(count / seconds, 1)})


def _human(count: int) -> str:
    return f"{count / 1e9:.2f} GB" if count >= 1e9 else f"{count / 1e6:.1f} MB"


class Routes:
    """The two routes of one sync: the laptop to host, and host to registry (if any)."""

    def __init__(self, host: str, registry: str | None) -> None:
        self.upload = f"upload {host}"
        self.fetch = f"fetch {host} from {registry}" if registry else None

    def plan_line(self, to_send: int, to_fetch: int) -> str:
        """'the laptop sends X (~T at R), the instance fetches Y (~T at R)': what moves, how long."""
        speeds = _load()
        parts = [f"the laptop sends {_human(to_send)}{_eta(to_send, speeds.get(self.upload))}"]
        if to_fetch:
            parts.append(
                f"the instance fetches {_human(to_fetch)}{_eta(to_fetch, speeds.get(self.fetch or ''))}"
            )
        return "image: " + ", ".join(parts)

    def measured_upload(self, count: int, seconds: float) -> None:
        _remember(self.upload, count, seconds)

    def measured_fetch(self, count: int, seconds: float) -> None:
        if self.fetch is not None:
            _remember(self.fetch, count, seconds)


def _eta(count: int, rate: float | None) -> str:
    if count == 0:
        return ""
    if not rate:
        return " (link speed not measured yet)"
    seconds = count / rate
    took = f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"
    return f" (~{took} at {rate * 8 / 1e6:.0f} Mbit/s)"
