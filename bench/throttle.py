"""A TCP relay on 127.0.0.1 that holds each direction to a rate, like a home uplink.

`Throttle(target, bits_per_s).start()` returns the relay's port; every connection to it is
forwarded to target, each direction paced by a token bucket (bursts up to 64 KB).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

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


class Throttle:
    """The relay; both directions of all its connections share one bucket each way."""

    def __init__(self, target: tuple[str, int], bits_per_s: float) -> None:
        self.target = target
        self.up = _Bucket(bits_per_s / 8)
        self.down = _Bucket(bits_per_s / 8)
        self._server: socket.socket | None = None

    def start(self) -> int:
        self._server = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._accept, daemon=True).start()
        return self._server.getsockname()[1]

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, upstream, self.up), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, self.down), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, bucket: _Bucket) -> None:
        try:
            while block := source.recv(16 << 10):
                bucket.take(len(block))
                sink.sendall(block)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
