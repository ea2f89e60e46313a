"""A relay on 127.0.0.1 that holds each direction to a rate, like a home uplink.

`throttled(port, bits_per_s)` is the emulator's TCP forwarder to 127.0.0.1:port with each
direction paced by a token bucket (bursts up to 64 KB); connect to its `.port`, `close()` it.
"""

from __future__ import annotations

import threading
import time

from infra.emulator.forward import Forwarder

BURST = 64 << 10


class _Bucket:
    def __init__(self, bytes_per_s: float) -> None:
        self.rate = bytes_per_s
        self.tokens = float(BURST)
        self.stamp = time.monotonic()
        self.lock = threading.Lock()

    def take(self, count: int) -> None:
        """Wait until count bytes may pass."""
        with self.lock:
            now = time.monotonic()
            self.tokens = min(BURST, self.tokens + (now - self.stamp) * self.rate) - count
            self.stamp = now
            wait = -self.tokens / self.rate if self.tokens < 0 else 0.0
        if wait:
            time.sleep(wait)


def throttled(port: int, bits_per_s: float) -> Forwarder:
    """A forwarder to 127.0.0.1:port whose connections share one bucket each way."""
    up, down = _Bucket(bits_per_s / 8), _Bucket(bits_per_s / 8)
    return Forwarder(port, pace=lambda upstream, size: (up if upstream else down).take(size))
