"""A TCP forwarder from a fresh 127.0.0.1 port to an instance's sshd.

AutoDL hands out a new SSH port after every power-on; clients must read the snapshot again
after each boot. The emulator reproduces that with one forwarder per boot: it listens on a
port that differs from the previous boot's and relays bytes to the port Docker published
for the container. Closing it drops the listener and every relayed connection, which is
what a powered-off instance does to its clients.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable


class Forwarder:
    """Relays every connection on 127.0.0.1:<port> to 127.0.0.1:<target> until closed."""

    def __init__(
        self, target_port: int, *, avoid: int | None = None, pace: Callable[[bool, int], None] | None = None
    ) -> None:
        """pace(upstream, size), if given, is called before each chunk is relayed and may wait:
        a benchmark holds a link to a rate with it (upstream: client to target)."""
        self.target_port = target_port
        self.pace = pace
        self._listener = _listen(avoid)
        self.port: int = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        threading.Thread(target=self._accept, name=f"emulator-forward-{self.port}", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            upstream.settimeout(None)
        except OSError:
            client.close()
            return
        with self._lock:
            if self._closed.is_set():
                client.close()
                upstream.close()
                return
            self._sockets.update((client, upstream))
        threading.Thread(target=_pump, args=(upstream, client, self._paced(False)), daemon=True).start()
        _pump(client, upstream, self._paced(True))
        with self._lock:
            self._sockets.difference_update((client, upstream))

    def _paced(self, upstream: bool) -> Callable[[int], None] | None:
        return None if self.pace is None else (lambda size: self.pace(upstream, size))

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):  # wakes the thread blocked in accept() (Linux)
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def _listen(avoid: int | None) -> socket.socket:
    """A listening socket on a free loopback port other than `avoid` (the previous boot's)."""
    for _ in range(20):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        if sock.getsockname()[1] != avoid:
            sock.listen(64)
            return sock
        sock.close()
    raise OSError("no free loopback port for the SSH forwarder")


def _pump(source: socket.socket, sink: socket.socket, pace: Callable[[int], None] | None = None) -> None:
    """Copy bytes one way until either side closes; then close both."""
    try:
        while True:
            chunk = source.recv(65536)
            if not chunk:
                break
            if pace is not None:
                pace(len(chunk))
            sink.sendall(chunk)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
