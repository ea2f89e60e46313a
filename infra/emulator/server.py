"""The HTTP face of the emulator: AutoDL's console and developer API subsets, plus an admin API.

Routes, envelopes, auth and injected HTTP failures live here; the behaviour lives in
`service.Emulator`. Every answer is AutoDL's envelope `{code, msg, data, request_id}`
(docs/providers.md is the contract). The admin API under /emulator/v1/ is not AutoDL's:
it injects faults and shows the power log, and answers with the same envelope and token.
"""

from __future__ import annotations

import hmac
import json
import secrets
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from infra.emulator.service import ApiError, Emulator

AUTH_MSG = "登陆超时，请重新登录"
ADMIN = "/emulator/v1/"
MALFORMED = b"<html><body>502 Bad Gateway</body></html>"  # what a broken proxy answers


def envelope(code: str = "Success", msg: str = "", data: object = None) -> dict:
    return {"code": code, "msg": msg, "data": data, "request_id": secrets.token_hex(8)}


class Api:
    """Maps (method, path) to a function of (emulator, body, query) returning `data`."""

    def __init__(self, emulator: Emulator) -> None:
        self.emulator = emulator
        e = emulator

        def snapshot(b: dict, q: dict) -> dict:
            return e.snapshot(e.get(q.get("instance_uuid")))

        self.routes: dict[tuple[str, str], Callable[[dict, dict], object]] = {
            # console API (ordinary instances)
            ("POST", "/api/v1/instance"): lambda b, q: _page(e.listed(), b),
            ("GET", "/api/v1/instance/snapshot"): snapshot,
            ("POST", "/api/v1/instance/power_on"): lambda b, q: e.power_on(
                b.get("instance_uuid"), b.get("payload", "gpu")
            ),
            ("POST", "/api/v1/instance/power_off"): lambda b, q: e.power_off(b.get("instance_uuid")),
            ("POST", "/api/v1/order/instance/create/payg"): lambda b, q: e.create(_name(b), "console"),
            ("POST", "/api/v1/instance/release"): lambda b, q: e.release(b.get("instance_uuid")),
            # developer API (Pro instances, GPU boots only)
            ("POST", "/api/v1/dev/instance/pro/create"): lambda b, q: e.create(
                str(b.get("instance_name") or ""), "pro"
            ),
            ("GET", "/api/v1/dev/instance/pro/snapshot"): snapshot,
            ("GET", "/api/v1/dev/instance/pro/status"): lambda b, q: e.get(q.get("instance_uuid")).status,
            ("POST", "/api/v1/dev/instance/pro/list"): lambda b, q: _page(e.listed(), b),
            ("POST", "/api/v1/dev/instance/pro/power_on"): lambda b, q: _pro_power_on(e, b),
            ("POST", "/api/v1/dev/instance/pro/power_off"): lambda b, q: e.power_off(b.get("instance_uuid")),
            ("POST", "/api/v1/dev/instance/pro/release"): lambda b, q: e.release(b.get("instance_uuid")),
            ("POST", "/api/v1/dev/wallet/balance"): lambda b, q: _wallet(e),
            # admin API (the emulator's own)
            ("POST", ADMIN + "faults"): lambda b, q: _set_faults(e, b),
            ("GET", ADMIN + "faults"): lambda b, q: vars(e.faults).copy(),
            ("GET", ADMIN + "power_log"): lambda b, q: e.books.log_entries(),
            ("GET", ADMIN + "state"): lambda b, q: _state(e),
        }


def _name(body: dict) -> str:
    info = body.get("instance_info")
    return str(info.get("instance_name") or "") if isinstance(info, dict) else ""


def _page(items: list[dict], body: dict) -> dict:
    index = int(body.get("page_index") or 1)
    size = int(body.get("page_size") or 100)
    chunk = items[(index - 1) * size : index * size]
    return {
        "list": chunk,
        "page_index": index,
        "page_size": size,
        "max_page": max(1, -(-len(items) // size)),
        "result_total": len(items),
    }


def _pro_power_on(emulator: Emulator, body: dict) -> None:
    payload = body.get("payload", "gpu")
    if payload == "non_gpu":
        raise ApiError("ServerError", "暂不支持API以无卡模式开机")
    emulator.power_on(body.get("instance_uuid"), payload)


def _wallet(emulator: Emulator) -> dict:
    return {
        "assets": round(emulator.books.balance() * 1000),
        "accumulate": round(emulator.books.spent() * 1000),
        "voucher_balance": 0,
    }


_FAULT_TYPES = {
    "no_gpu_stock": int, "http_500": int, "malformed": int, "expire_token": bool, "low_balance": bool,
    "slow_s": float, "late": int, "late_s": float,
}  # fmt: skip


def _set_faults(emulator: Emulator, body: dict) -> dict:
    faults = emulator.faults
    for key, kind in _FAULT_TYPES.items():
        if key in body:
            setattr(faults, key, max(0, kind(body[key])) if kind is not bool else bool(body[key]))
    unknown = set(body) - set(_FAULT_TYPES)
    if unknown:
        raise ApiError("InvalidParameter", f"unknown faults: {', '.join(sorted(unknown))}")
    return vars(faults).copy()


def _state(emulator: Emulator) -> dict:
    with emulator.books.lock:
        return {
            "instances": [emulator.snapshot(r) for r in emulator.books.instances.values()],
            "balance": emulator.books.balance(),
            "spent": emulator.books.spent(),
            "faults": vars(emulator.faults).copy(),
            "config": vars(emulator.config).copy(),
        }


class Handler(BaseHTTPRequestHandler):
    """One request: auth, injected faults, route, envelope."""

    server: EmulatorServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        """Quiet: request lines would carry nothing secret, but they clutter test output."""

    def _handle(self, method: str) -> None:
        url = urlsplit(self.path)
        body = self._body()
        status, answer = self.server.answer(method, url.path, self.headers.get("Authorization", ""), body,
                                            {k: v[0] for k, v in parse_qs(url.query).items()})  # fmt: skip
        raw = answer if isinstance(answer, bytes) else json.dumps(answer, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header(
            "Content-Type", "text/html" if isinstance(answer, bytes) else "application/json; charset=utf-8"
        )
        self.send_header("Content-Length", str(len(raw)))
        try:
            self.end_headers()
            self.wfile.write(raw)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up waiting (a late answer)

    def _body(self) -> object:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw.strip():
            return {}
        try:
            return json.loads(raw)
        except ValueError:
            return None


class EmulatorServer(ThreadingHTTPServer):
    """The HTTP server; `answer` is the whole request logic, without sockets."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], emulator: Emulator, token: str) -> None:
        super().__init__(address, Handler)
        self.api = Api(emulator)
        self.faults = emulator.faults
        self.token = token
        self._fault_lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def _take(self, fault: str) -> bool:
        """Consume one of a counted fault (http_500, malformed, late), if any is left (exactly
        N across threads)."""
        with self._fault_lock:
            if getattr(self.faults, fault) <= 0:
                return False
            setattr(self.faults, fault, getattr(self.faults, fault) - 1)
            return True

    def answer(
        self, method: str, path: str, token: str, body: object, query: dict
    ) -> tuple[int, dict | bytes]:
        if not hmac.compare_digest(token.encode(), self.token.encode()):
            return HTTPStatus.UNAUTHORIZED, envelope("AuthorizeFailed", AUTH_MSG)
        admin = path.startswith(ADMIN)
        if not admin and self._take("late"):
            answer = self._route(method, path, body, query)
            time.sleep(self.faults.late_s)  # the client gave up meanwhile: the call's effect stays
            return answer
        if not admin and self.faults.slow_s:
            time.sleep(self.faults.slow_s)
        if not admin and self._take("http_500"):
            return HTTPStatus.INTERNAL_SERVER_ERROR, envelope("ServerError", "emulated HTTP 500")
        if not admin and self._take("malformed"):
            return HTTPStatus.OK, MALFORMED
        if not admin and self.faults.expire_token:
            return HTTPStatus.OK, envelope("AuthorizeFailed", AUTH_MSG)
        return self._route(method, path, body, query)

    def _route(self, method: str, path: str, body: object, query: dict) -> tuple[int, dict | bytes]:
        route = self.api.routes.get((method, path))
        if route is None:
            return HTTPStatus.NOT_FOUND, envelope("NotFound", f"no such API: {method} {path}")
        if not isinstance(body, dict):
            return HTTPStatus.OK, envelope("InvalidParameter", "请求参数错误")
        try:
            return HTTPStatus.OK, envelope(data=route(body, query))
        except ApiError as exc:
            return HTTPStatus.OK, envelope(exc.code, exc.msg)
        except Exception as exc:  # Docker failed under us: a server error, as a real cloud's
            return HTTPStatus.INTERNAL_SERVER_ERROR, envelope("ServerError", f"{type(exc).__name__}: {exc}")
