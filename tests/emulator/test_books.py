"""Pure logic: billing from the power log, persistence, paging, envelopes, the TCP forwarder."""

from __future__ import annotations

import socket
import threading

import pytest

from infra.emulator import connection
from infra.emulator.forward import Forwarder
from infra.emulator.server import _page, envelope
from infra.emulator.state import Books, Config, Interval
from runner.errors import BadInput

pytestmark = pytest.mark.unit


def test_balance_is_the_start_minus_every_interval_at_its_mode_price(tmp_path):
    books = Books(tmp_path / "emu", Config(balance=10.0, gpu_price=3.6, cpu_price=0.36))
    books.power_log = [Interval("a", "gpu", 1000.0, 2000.0), Interval("a", "non_gpu", 3000.0, 6600.0)]
    assert books.spent() == pytest.approx(1.0 + 0.36)
    assert books.balance() == pytest.approx(10.0 - 1.36)
    entries = books.log_entries()
    assert [e["cost"] for e in entries] == [pytest.approx(1.0), pytest.approx(0.36)]
    assert [e["seconds"] for e in entries] == [1000.0, 3600.0]


def test_books_survive_a_restart_with_private_files(tmp_path):
    home = tmp_path / "emu"
    books = Books(home, Config())
    books.open_interval("x", "gpu")
    books.close_interval("x", books.power_log[0].started_at + 5)
    again = Books(home, Config())
    assert again.power_log[0].seconds(0) == pytest.approx(5)
    assert (home / "state.json").stat().st_mode & 0o777 == 0o600
    assert home.stat().st_mode & 0o777 == 0o700


def test_paging_and_envelope():
    page = _page([{"n": i} for i in range(5)], {"page_index": 2, "page_size": 2})
    assert page["list"] == [{"n": 2}, {"n": 3}] and page["max_page"] == 3 and page["result_total"] == 5
    assert set(envelope()) == {"code", "msg", "data", "request_id"}


def test_connection_without_a_running_emulator_says_how_to_start_one(tmp_path):
    with pytest.raises(BadInput, match="runner emulator up"):
        connection(tmp_path)


def test_forwarder_relays_and_changes_port():
    server = socket.create_server(("127.0.0.1", 0))
    target = server.getsockname()[1]

    def echo() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(conn.recv(100).upper())

    threading.Thread(target=echo, daemon=True).start()
    forwarder = Forwarder(target)
    other = Forwarder(target, avoid=forwarder.port)
    try:
        assert other.port != forwarder.port
        with socket.create_connection(("127.0.0.1", forwarder.port), timeout=5) as sock:
            sock.sendall(b"hello")
            assert sock.recv(100) == b"HELLO"
    finally:
        forwarder.close()
        other.close()
        server.close()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", forwarder.port), timeout=2):
        pass
