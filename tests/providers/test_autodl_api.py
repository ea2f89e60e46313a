"""The AutoDL envelope and error mapping, with answers served by a real local HTTP server."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from infra.autodl_api import AutodlClient, ConsoleInstances, ProInstances, Retry, to_instance, unwrap
from infra.base import InstanceState, PowerMode
from runner.errors import (
    AuthFailed,
    BadInput,
    InstanceNotFound,
    InsufficientBalance,
    NoCapacity,
    ProviderFailure,
    Transient,
)

pytestmark = pytest.mark.unit
TOKEN = "secret-token-value"


def envelope(code: str, msg: str = "", data: object = None) -> bytes:
    return json.dumps(
        {"code": code, "msg": msg, "data": data, "request_id": "r1"}, ensure_ascii=False
    ).encode()


@pytest.mark.parametrize(
    ("answer", "error", "text"),
    [
        (envelope("AuthorizeFailed", "登陆超时，请重新登录"), AuthFailed, "token expired"),
        (envelope("InstanceError", "该主机空闲GPU不足，主机GPU空闲数量：0 卡"), NoCapacity, "GPU不足"),
        (envelope("ServerError", "暂无库存"), NoCapacity, "暂无库存"),
        (envelope("InstanceError", "账户余额不足"), InsufficientBalance, "余额不足"),
        (envelope("InstanceError", "实例不存在"), InstanceNotFound, "不存在"),
        (envelope("ServerError", "不支持的启动模式"), ProviderFailure, "ServerError: 不支持的启动模式"),
        (b"<html>bad gateway</html>", Transient, "not JSON"),
        (b'{"ok": true}', Transient, "not an AutoDL envelope"),
    ],
)
def test_envelope_errors_are_typed_and_keep_the_message(answer, error, text):
    with pytest.raises(error) as raised:
        unwrap(answer, "AutoDL /x")
    assert text in raised.value.message
    assert type(raised.value) is error


def test_success_returns_data():
    assert unwrap(envelope("Success", data={"a": 1}), "x") == {"a": 1}


def test_snapshot_fields_become_an_instance():
    item = {
        "uuid": "abc", "status": "running", "start_mode": "non_gpu", "proxy_host": "connect.x.autodl.com",
        "ssh_port": 34222, "root_password": "pw", "payg_price": 2150, "instance_name": "n",
    }  # fmt: skip
    instance = to_instance(item)
    assert (instance.state, instance.mode, instance.ssh.port, instance.ssh.password) == (
        InstanceState.RUNNING, PowerMode.CPU, 34222, "pw",
    )  # fmt: skip
    assert instance.price_per_hour == {PowerMode.GPU: 2.15, PowerMode.CPU: 0.10}
    assert "pw" not in repr(instance)
    stopped = to_instance({**item, "status": "shutdown"})
    assert (stopped.state, stopped.mode, stopped.ssh) == (InstanceState.STOPPED, None, None)
    with pytest.raises(ProviderFailure, match="unknown status 'melting'"):
        to_instance({**item, "status": "melting"})


class Scripted(BaseHTTPRequestHandler):
    """Answers each request with the next scripted (status, body); records what it got."""

    script: list = []
    seen: list = []

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        type(self).seen.append((self.command, self.path, self.headers.get("Authorization"), body))
        status, payload = type(self).script.pop(0)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    Scripted.script, Scripted.seen = [], []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def client(server, attempts: int = 3) -> AutodlClient:
    url = f"http://127.0.0.1:{server.server_address[1]}"
    return AutodlClient(url, TOKEN, timeout=5, retry=Retry(attempts=attempts, first_delay=0.01))


def test_http_500_is_retried_then_the_call_succeeds(server):
    Scripted.script = [(500, b"oops"), (502, b""), (200, envelope("Success"))]
    ConsoleInstances(client(server)).power_on("u1", PowerMode.CPU)
    assert [s[1] for s in Scripted.seen] == ["/api/v1/instance/power_on"] * 3
    assert Scripted.seen[-1][2] == TOKEN  # the raw token, no "Bearer"
    assert Scripted.seen[-1][3] == {"instance_uuid": "u1", "payload": "non_gpu"}


def test_retries_are_bounded_and_the_token_never_shows(server):
    Scripted.script = [(500, b"")] * 3
    with pytest.raises(Transient) as raised:
        ConsoleInstances(client(server)).power_off("u1")
    assert "after 3 attempts" in raised.value.message and TOKEN not in raised.value.message
    assert TOKEN not in repr(client(server))


def test_a_refused_token_is_auth_failed_at_once(server):
    Scripted.script = [(401, envelope("AuthorizeFailed"))]
    with pytest.raises(AuthFailed, match="HTTP 401"):
        ConsoleInstances(client(server)).describe("u1")
    assert len(Scripted.seen) == 1


def test_pro_instances_refuse_a_no_gpu_boot_without_calling_the_api(server):
    with pytest.raises(BadInput, match="GPU only"):
        ProInstances(client(server)).power_on("pro-1", PowerMode.CPU)
    assert Scripted.seen == []


def test_console_release_is_refused_on_autodl(server):
    with pytest.raises(BadInput, match="release it in AutoDL's console"):
        ConsoleInstances(client(server)).release("u1")
    assert Scripted.seen == []
