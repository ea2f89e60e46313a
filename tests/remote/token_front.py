"""Docker Hub's way of serving images, in front of a real registry on 127.0.0.1.

Docker Hub cannot be reached from here, so this stands in for its two habits that a client
must handle: the registry answers 401 with a `Bearer realm=...` challenge and wants a token
from a separate token service (anonymous, or with basic credentials), and blobs are answered
with a redirect to blob storage on another host, where no registry credentials belong.
Manifests and blobs themselves come from the real registry behind it. Both servers record
the requests they get, so a test can check who was sent which credentials.
"""

from __future__ import annotations

import base64
import secrets
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class TokenFront:
    upstream: str  # the real registry's URL
    credentials: tuple[str, str] | None = None  # required by the token service when set
    token: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    seen: list[tuple[str, str, str | None]] = field(default_factory=list)  # (server, path, Authorization)
    _servers: list[ThreadingHTTPServer] = field(default_factory=list)

    def start(self) -> str:
        """Start the registry front and the blob storage; the front's host:port."""
        self.storage = self._serve("storage", self._storage_get)
        return self._serve("front", self._front_get)

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()

    def _serve(self, name: str, get) -> str:
        front = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                front.seen.append((name, self.path, self.headers.get("Authorization")))
                get(self)

            def log_message(self, *args) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return f"127.0.0.1:{server.server_address[1]}"

    # -- the registry front and its token service ---------------------------------------------

    def _front_get(self, handler: BaseHTTPRequestHandler) -> None:
        if handler.path.startswith("/token?"):
            return self._issue_token(handler)
        if handler.headers.get("Authorization") != f"Bearer {self.token}":
            repository = handler.path.split("/")[2] + "/" + handler.path.split("/")[3]
            realm = f"http://{handler.headers['Host']}/token"
            challenge = f'Bearer realm="{realm}",service="front",scope="repository:{repository}:pull"'
            return _reply(handler, 401, b"{}", {"WWW-Authenticate": challenge})
        if "/blobs/" in handler.path:
            digest = handler.path.rsplit("/", 1)[1]
            return _reply(
                handler, 307, b"", {"Location": f"http://{self.storage}/{handler.path[4:]}?sig={digest[-8:]}"}
            )
        self._relay(handler, handler.path)

    def _issue_token(self, handler: BaseHTTPRequestHandler) -> None:
        if self.credentials is not None:
            wanted = "Basic " + base64.b64encode(":".join(self.credentials).encode()).decode()
            if handler.headers.get("Authorization") != wanted:
                return _reply(handler, 401, b'{"details": "incorrect username or password"}', {})
        _reply(handler, 200, f'{{"token": "{self.token}"}}'.encode(), {"Content-Type": "application/json"})

    # -- blob storage -------------------------------------------------------------------

    def _storage_get(self, handler: BaseHTTPRequestHandler) -> None:
        self._relay(handler, "/v2/" + handler.path.split("?", 1)[0].lstrip("/"))

    def _relay(self, handler: BaseHTTPRequestHandler, path: str) -> None:
        headers = {k: v for k, v in handler.headers.items() if k in ("Accept", "Range")}
        request = urllib.request.Request(self.upstream + path, headers=headers)
        try:
            response = urllib.request.urlopen(request, timeout=30)
        except urllib.error.HTTPError as exc:
            return _reply(handler, exc.code, exc.read(), {})
        with response:
            body = response.read()
            keep = ("Content-Type", "Docker-Content-Digest", "Content-Range")
            _reply(
                handler,
                response.status,
                body,
                {k: response.headers[k] for k in keep if k in response.headers},
            )


def _reply(handler: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict) -> None:
    handler.send_response(status)
    for key, value in headers.items():
        handler.send_header(key, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)
