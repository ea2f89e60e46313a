"""A TCP relay on 127.0.0.1 that misbehaves once, the way links and registries do.

It forwards every connection to a target; the first response that grows past `after` bytes is
either cut there (the registry went away mid-blob) or has that byte flipped (a blob corrupted
in flight). Later connections pass untouched. It also keeps what the clients sent, so a test
can see a resumed download ask for a range, and counts the bytes it relayed.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field


@dataclass
class FlakyProxy:
    target: tuple[str, int]
    mode: str  # "cut", "corrupt" or "pass"
    after: int = 1 << 20
    relayed: int = 0
    requests: list[bytes] = field(default_factory=list)
    triggered: bool = False
    _server: socket.socket | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> str:
        self._server = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._accept, daemon=True).start()
        return f"127.0.0.1:{self._server.getsockname()[1]}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with client, socket.create_connection(self.target) as upstream:
            threading.Thread(target=self._upstream_of, args=(client, upstream), daemon=True).start()
            seen = 0
            while block := upstream.recv(1 << 16):
                block, cut = self._tamper(block, seen)
                seen += len(block)
                with self._lock:
                    self.relayed += len(block)
                try:
                    client.sendall(block)
                except OSError:
                    return
                if cut:
                    client.shutdown(socket.SHUT_RDWR)
                    return

    def _upstream_of(self, client: socket.socket, upstream: socket.socket) -> None:
        try:
            while block := client.recv(1 << 16):
                with self._lock:
                    self.requests.append(block)
                upstream.sendall(block)
        except OSError:
            return

    def _tamper(self, block: bytes, seen: int) -> tuple[bytes, bool]:
        """The block as relayed, and whether to cut the connection after it."""
        with self._lock:
            if self.mode == "pass" or self.triggered or seen + len(block) <= self.after:
                return block, False
            self.triggered = True
        at = self.after - seen
        if self.mode == "cut":
            return block[:at], True
        flipped = bytes([block[at] ^ 0xFF])
        return block[:at] + flipped + block[at + 1 :], False
