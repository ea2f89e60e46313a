"""The SSH layer against a real sshd: quoting, host key pinning, verified resumable transfers, faults."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from runner.errors import BadInput, NotFound, ProviderFailure
from runner.remote import Endpoint, RemoteHost, RetryPolicy, sha256_argv
from runner.store import Store
from tests.remote.conftest import free_port, make_key_pair, stop_host

pytestmark = pytest.mark.integration

SIZE = 6 * 1024 * 1024 + 123  # a few MB, not a multiple of the chunk size
FAST = RetryPolicy(attempts=4, first_delay=0.2, max_delay=1.0, deadline=20)


@pytest.fixture
def store(runner_home) -> Store:
    with Store(runner_home) as opened:
        yield opened


@pytest.fixture
def remote(sshd_host, store) -> RemoteHost:
    with RemoteHost(sshd_host.endpoint(), store, retry=FAST) as host:
        yield host


@pytest.fixture
def payload(tmp_path) -> tuple[Path, str]:
    path = tmp_path / "payload.bin"
    data = os.urandom(SIZE)
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


@pytest.fixture
def remote_dir(sshd_host, request) -> str:
    """A folder of its own on the host for each test."""
    folder = f"/srv/tests/{request.node.name.replace('[', '_').replace(']', '')}"
    sshd_host.exec("rm", "-rf", folder)
    return folder


def cut_once_at_half(sshd_host):
    """A progress callback that kills the host's sshd sessions once half the bytes have moved."""
    cuts = []

    def progress(done: int, total: int) -> None:
        if not cuts and done >= total // 2:
            cuts.append(done)
            sshd_host.exec("pkill", "-f", "sshd: root")

    return progress, cuts


# -- commands -------------------------------------------------------------------


def test_hostile_arguments_reach_the_remote_as_literal_argv(remote):
    hostile = [
        "two words",
        "x; touch /tmp/pwned",
        "$(touch /tmp/pwned)",
        "`touch /tmp/pwned`",
        "line one\nline two",
        'it\'s "quoted"',
        "*",
        "",
        "-n",
        "$HOME | cat > /tmp/pwned &",
        "héllo ✓",
    ]
    result = remote.run(["printf", "%s\\0", *hostile])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.split("\0")[:-1] == hostile
    assert remote.run(["test", "-e", "/tmp/pwned"]).exit_code == 1


def test_run_reports_exit_code_and_both_streams(remote):
    code, out, err = remote.run(["sh", "-c", "echo out; echo err >&2; head -c 300000 /dev/zero; exit 7"])
    assert code == 7
    assert out.startswith("out\n") and len(out) == 4 + 300000
    assert err == "err\n"


def test_run_times_out(remote):
    started = time.monotonic()
    with pytest.raises(ProviderFailure, match="did not finish in time"):
        remote.run(["sleep", "30"], timeout=1)
    assert time.monotonic() - started < 10


def test_sha256_falls_back_to_python3_without_sha256sum(remote, sshd_host):
    sshd_host.exec("sh", "-c", "mkdir -p /opt/onlypy && ln -sf /usr/bin/python3 /opt/onlypy/python3")
    sshd_host.exec("sh", "-c", "printf hello > /tmp/hello.txt")
    expected = hashlib.sha256(b"hello").hexdigest()
    for length, want in ((None, expected), (3, hashlib.sha256(b"hel").hexdigest())):
        argv = ["env", "PATH=/opt/onlypy", "/bin/sh", *sha256_argv("/tmp/hello.txt", length)[1:]]
        result = remote.run(argv)
        assert result.exit_code == 0, result.stderr
        assert result.stdout.split()[0] == want
    assert remote.sha256("/tmp/hello.txt") == expected


# -- host keys ------------------------------------------------------------------


def test_first_connection_pins_the_host_key_and_later_ones_match(sshd_host, store):
    with RemoteHost(sshd_host.endpoint(), store, retry=FAST) as host:
        assert host.run(["true"]).exit_code == 0
    pinned = store.host_key("127.0.0.1", sshd_host.port)
    assert (pinned.key_type, pinned.fingerprint) == ("ssh-ed25519", sshd_host.host_fingerprint)
    with RemoteHost(sshd_host.endpoint(), store, retry=FAST) as host:
        assert host.run(["true"]).exit_code == 0
    assert store.host_key("127.0.0.1", sshd_host.port) == pinned


@pytest.mark.security
def test_a_changed_host_key_is_refused_unless_accepted(start_host, store, caplog):
    first = start_host()
    with RemoteHost(first.endpoint(), store, retry=FAST) as host:
        host.run(["true"])
    stop_host(first)
    second = start_host(port=first.port)
    assert second.host_fingerprint != first.host_fingerprint

    with pytest.raises(BadInput) as refused:
        RemoteHost(second.endpoint(), store, retry=FAST).connect()
    message = refused.value.message
    assert f"127.0.0.1:{first.port}" in message and "--accept-new-host-key" in message
    assert first.host_fingerprint in message and second.host_fingerprint in message
    assert "\n" not in message
    assert store.host_key("127.0.0.1", first.port).fingerprint == first.host_fingerprint

    accepting = RemoteHost(second.endpoint(), store, accept_new_host_key=True, retry=FAST)
    with caplog.at_level(logging.WARNING, logger="runner.remote"), accepting as host:
        assert host.run(["true"]).exit_code == 0
    assert store.host_key("127.0.0.1", first.port).fingerprint == second.host_fingerprint
    assert "accepted" in caplog.text and second.host_fingerprint in caplog.text
    stop_host(second)


# -- authentication and reachability ---------------------------------------------


def test_password_login(sshd_host, store):
    endpoint = sshd_host.endpoint(user="runner", key_file=None, password=sshd_host.password)
    assert sshd_host.password not in repr(endpoint)
    with RemoteHost(endpoint, store, retry=FAST) as host:
        assert host.run(["id", "-un"]).stdout == "runner\n"


@pytest.mark.parametrize("wrong", ["password", "key"])
def test_wrong_credentials_fail_fast_without_retries(sshd_host, store, tmp_path, wrong):
    if wrong == "password":
        endpoint = sshd_host.endpoint(user="runner", key_file=None, password="not-the-password")
    else:
        endpoint = sshd_host.endpoint(key_file=make_key_pair(tmp_path, "stranger").private_file)
    patient = RetryPolicy(attempts=6, first_delay=5, deadline=60)
    started = time.monotonic()
    with pytest.raises(BadInput, match="was refused") as refused:
        RemoteHost(endpoint, store, retry=patient).connect()
    assert time.monotonic() - started < 5  # one attempt: a retry would have slept 5 s
    assert "not-the-password" not in refused.value.message


@pytest.fixture
def flaky_door(sshd_host):
    """A port on 127.0.0.1 that hangs up on the first two connections before the SSH banner,
    as AutoDL's sshd does at random, and forwards later ones to the test host."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def pump(src: socket.socket, dst: socket.socket) -> None:
        with src, dst:
            while data := _recv(src):
                dst.sendall(data)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(conn)
            if len(accepted) <= 2:
                conn.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", sshd_host.port))
            threading.Thread(target=pump, args=(conn, upstream), daemon=True).start()
            threading.Thread(target=pump, args=(upstream, conn), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1], accepted
    listener.close()


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def test_connections_dropped_before_the_banner_are_retried(sshd_host, store, flaky_door):
    port, accepted = flaky_door
    with RemoteHost(sshd_host.endpoint(port=port), store, retry=FAST) as host:
        assert host.run(["echo", "through"]).stdout == "through\n"
    assert len(accepted) == 3


def test_connection_refused_is_a_provider_failure_after_bounded_retries(store, tmp_path):
    key = make_key_pair(tmp_path, "key").private_file
    endpoint = Endpoint("127.0.0.1", free_port(), key_file=key)
    started = time.monotonic()
    with pytest.raises(ProviderFailure, match=r"after 3 attempts") as failed:
        RemoteHost(endpoint, store, retry=RetryPolicy(attempts=3, first_delay=0.1, deadline=10)).connect()
    assert time.monotonic() - started < 10
    assert endpoint.address in failed.value.message and failed.value.exit_code == 3


# -- transfers ------------------------------------------------------------------


def test_put_and_get_verify_sha256_and_skip_what_is_already_there(
    remote, sshd_host, payload, tmp_path, remote_dir
):
    local, sha = payload
    target = f"{remote_dir}/sub/payload.bin"
    seen = []
    sent = remote.put(local, target, progress=lambda done, total: seen.append((done, total)))
    assert (sent.sha256, sent.size, sent.bytes_sent, sent.resumed_from) == (sha, SIZE, SIZE, 0)
    assert seen[-1] == (SIZE, SIZE) and all(total == SIZE for _, total in seen)
    assert sshd_host.exec("sha256sum", target).stdout.split()[0] == sha
    assert sshd_host.exec("ls", f"{remote_dir}/sub").stdout.split() == ["payload.bin"]

    again = remote.put(local, target)
    assert again.bytes_sent == 0 and again.sha256 == sha

    back = tmp_path / "back" / "payload.bin"
    fetched = remote.get(target, back)
    assert (fetched.sha256, fetched.bytes_sent, fetched.resumed_from) == (sha, SIZE, 0)
    assert hashlib.sha256(back.read_bytes()).hexdigest() == sha
    assert remote.get(target, back).bytes_sent == 0
    assert sorted(p.name for p in back.parent.iterdir()) == ["payload.bin"]


def test_upload_resumes_after_the_connection_is_cut(remote, sshd_host, payload, remote_dir):
    local, sha = payload
    progress, cuts = cut_once_at_half(sshd_host)
    result = remote.put(local, f"{remote_dir}/payload.bin", progress=progress)
    assert cuts, "the connection was never cut"
    assert result.sha256 == sha and 0 < result.resumed_from < SIZE
    assert result.bytes_sent - result.resumed_from < SIZE  # less than the whole file sent again
    assert sshd_host.exec("sha256sum", f"{remote_dir}/payload.bin").stdout.split()[0] == sha
    assert sshd_host.exec("ls", remote_dir).stdout.split() == ["payload.bin"]


def test_download_resumes_after_the_connection_is_cut(remote, sshd_host, payload, remote_dir, tmp_path):
    local, sha = payload
    remote.put(local, f"{remote_dir}/payload.bin")
    progress, cuts = cut_once_at_half(sshd_host)
    back = tmp_path / "back.bin"
    result = remote.get(f"{remote_dir}/payload.bin", back, progress=progress)
    assert cuts, "the connection was never cut"
    assert result.sha256 == sha and 0 < result.resumed_from < SIZE
    assert result.bytes_sent - result.resumed_from < SIZE
    assert hashlib.sha256(back.read_bytes()).hexdigest() == sha
    assert not back.with_name("back.bin.part").exists()


def test_a_corrupted_remote_part_is_discarded_and_the_file_sent_whole(remote, sshd_host, payload, remote_dir):
    local, sha = payload
    part = f"{remote_dir}/payload.bin.part"
    sshd_host.exec("sh", "-c", f"mkdir -p {remote_dir} && head -c 1000000 /dev/urandom > {part}")
    result = remote.put(local, f"{remote_dir}/payload.bin")
    assert (result.resumed_from, result.bytes_sent, result.sha256) == (0, SIZE, sha)
    assert sshd_host.exec("sha256sum", f"{remote_dir}/payload.bin").stdout.split()[0] == sha


def test_a_corrupted_local_part_is_discarded_on_download(remote, payload, remote_dir, tmp_path):
    local, sha = payload
    remote.put(local, f"{remote_dir}/payload.bin")
    back = tmp_path / "back.bin"
    back.with_name("back.bin.part").write_bytes(os.urandom(1000))
    result = remote.get(f"{remote_dir}/payload.bin", back)
    assert (result.resumed_from, result.bytes_sent) == (0, SIZE)
    assert hashlib.sha256(back.read_bytes()).hexdigest() == sha


def test_a_corrupted_remote_file_is_detected_and_replaced(remote, sshd_host, payload, remote_dir):
    local, sha = payload
    target = f"{remote_dir}/payload.bin"
    remote.put(local, target)
    flipped = f"{local.read_bytes()[4096] ^ 0xFF:03o}"  # a byte that surely differs, in octal for printf
    sshd_host.exec(
        "sh", "-c", f"printf '\\{flipped}' | dd of={target} bs=1 seek=4096 conv=notrunc status=none"
    )
    assert sshd_host.exec("stat", "-c", "%s", target).stdout.strip() == str(SIZE)
    assert remote.sha256(target) != sha
    assert remote.put(local, target).bytes_sent == SIZE
    assert remote.sha256(target) == sha


def test_missing_files_are_reported(remote, tmp_path, remote_dir):
    with pytest.raises(NotFound):
        remote.get(f"{remote_dir}/absent.bin", tmp_path / "absent.bin")
    with pytest.raises(NotFound):
        remote.put(tmp_path / "absent.bin", f"{remote_dir}/absent.bin")
