"""The rootfs runtime against a real sshd host with proot and no Docker: unpack, detached steps, stop.

A tiny image (the base plus one RUN layer and an ENV) is built here, saved through the Docker SDK
and its layer tars sent to a test host of this module's own; the rootfs is prepared once and
shared by the step tests.
"""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from runner.errors import BadInput, ProviderFailure, RunFailed
from runner.remote import RemoteHost, RetryPolicy
from runner.runtimes import (
    GUEST_NVIDIA_LIBS,
    GpuBinds,
    RootfsRuntime,
    gpu_binds,
    guest_env,
    open_runtime,
)
from runner.steps import StepState
from runner.store import Store
from tests.remote.conftest import BASE_IMAGE

integration = pytest.mark.integration

DATA_DIR = "/srv/runner-data"
FAST = RetryPolicy(attempts=4, first_delay=0.2, max_delay=1.0, deadline=20)
DOCKERFILE = f"""FROM {BASE_IMAGE}
RUN mkdir -p /opt/probe && echo "written by the image" > /opt/probe/message
ENV PROBE_VALUE="hello from the image config" PATH=/opt/probe:/usr/local/bin:/usr/bin:/bin
"""


class Image:
    def __init__(self, image_id: str, config: dict, layers: list[Path]) -> None:
        self.id, self.config, self.layers = image_id, config, layers


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Image:
    """The tiny test image's ID, config and uncompressed layer tars; the image is removed after."""
    import docker

    client = docker.from_env()
    tag = "runner-test/rootfs-probe:latest"
    built, _ = client.images.build(fileobj=io.BytesIO(DOCKERFILE.encode()), tag=tag, rm=True)
    folder = tmp_path_factory.mktemp("image")
    try:
        archive = folder / "image.tar"
        with archive.open("wb") as out:
            for chunk in built.save(named=True):
                out.write(chunk)
        yield _extract(archive, built.id, folder)
    finally:
        client.images.remove(tag, force=True)
        client.close()


def _extract(archive: Path, image_id: str, folder: Path) -> Image:
    with tarfile.open(archive) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))[0]
        config = json.load(tar.extractfile(manifest["Config"]))
        layers = []
        for index, name in enumerate(manifest["Layers"]):
            path = folder / f"layer-{index}.tar"
            path.write_bytes(tar.extractfile(name).read())
            layers.append(path)
    archive.unlink()
    return Image(image_id, config, layers)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    with Store(tmp_path_factory.mktemp("rootfs-home")) as opened:
        yield opened


@pytest.fixture(scope="module")
def test_host(start_host):
    return start_host()


def connect(test_host, store) -> RemoteHost:
    host = RemoteHost(test_host.endpoint(), store, retry=FAST)
    host.connect()
    return host


@pytest.fixture(scope="module")
def prepared(test_host, store, image) -> tuple[str, list[str]]:
    """The image's rootfs on the host, and the layer tars' remote paths."""
    with connect(test_host, store) as host:
        remote_tars = [f"{DATA_DIR}/layers/{path.name}" for path in image.layers]
        for path, remote in zip(image.layers, remote_tars, strict=True):
            host.put(path, remote)
        return RootfsRuntime(host, DATA_DIR).prepare(image.id, remote_tars), remote_tars


@pytest.fixture
def runtime(test_host, store) -> RootfsRuntime:
    with connect(test_host, store) as host:
        yield RootfsRuntime(host, DATA_DIR)


@pytest.fixture
def run_dir(request) -> str:
    return f"{DATA_DIR}/runs/{request.node.name}"


def on_host(test_host, *argv: str) -> subprocess.CompletedProcess:
    """Run a command in the host's container directly, without raising on failure."""
    return subprocess.run(
        ["docker", "exec", test_host.container, *argv], capture_output=True, text=True, timeout=60
    )


# -- steps --------------------------------------------------------------------------


@integration
def test_step_sees_the_image_env_files_and_writes_out(runtime, prepared, image, run_dir, test_host):
    script = (
        'echo "value=$PROBE_VALUE step=$STEP_VAR"; cat /opt/probe/message; pwd;'
        " printf '%s\\n' \"it's; $(echo literal) `true`\" > /out/result"
    )
    env = {"STEP_VAR": "two words; $(touch /tmp/pwned)"}
    handle = runtime.start(run_dir, "show", script, env, prepared[0], image.config)
    chunks: list[bytes] = []
    assert runtime.wait(handle, timeout=60, on_output=chunks.append) == 0
    log = b"".join(chunks).decode()
    assert "value=hello from the image config step=two words; $(touch /tmp/pwned)" in log
    assert "written by the image" in log
    assert "/data\n" in log
    assert on_host(test_host, "cat", f"{run_dir}/out/result").stdout == "it's; literal \n"
    assert on_host(test_host, "cat", f"{run_dir}/steps/show/exit_code").stdout == "0\n"
    assert on_host(test_host, "test", "-e", "/tmp/pwned").returncode == 1
    assert runtime.read_log(handle, 6) == (log[6:].encode(), len(log))


@integration
def test_a_failing_step_reports_its_exit_code(runtime, prepared, image, run_dir):
    handle = runtime.start(run_dir, "fail", "echo before; exit 3", {}, prepared[0], image.config)
    assert runtime.wait(handle, timeout=60) == 3
    assert runtime.poll(handle).exit_code == 3
    assert runtime.read_log(handle)[0] == b"before\n"


@integration
def test_a_step_survives_the_ssh_session_that_started_it(test_host, store, prepared, image, run_dir):
    with connect(test_host, store) as host:
        handle = RootfsRuntime(host, DATA_DIR).start(
            run_dir, "long", "sleep 5; echo survived > /out/after", {}, prepared[0], image.config
        )
    with connect(test_host, store) as host:
        runtime = RootfsRuntime(host, DATA_DIR)
        assert runtime.poll(handle).state is StepState.RUNNING
        assert runtime.wait(handle, timeout=60) == 0
    assert on_host(test_host, "cat", f"{run_dir}/out/after").stdout == "survived\n"


@integration
def test_stop_ends_a_step_within_the_grace(runtime, prepared, image, run_dir, test_host):
    handle = runtime.start(run_dir, "sleeper", "sleep 300", {}, prepared[0], image.config)
    with pytest.raises(RunFailed, match="still runs"):
        runtime.wait(handle, timeout=1)
    assert runtime.poll(handle).state is StepState.RUNNING
    started = time.monotonic()
    code = runtime.stop(handle, grace_s=10)
    assert time.monotonic() - started < 10
    assert code == 255  # proot's status for a command killed by a signal
    assert runtime.poll(handle).exit_code == code
    assert on_host(test_host, "pgrep", "-f", "sleep 300").returncode == 1


@integration
def test_stop_lets_the_command_handle_sigterm(runtime, prepared, image, run_dir):
    script = "trap 'echo checkpointed; exit 7' TERM; sleep 300 & wait"
    handle = runtime.start(run_dir, "trainer", script, {}, prepared[0], image.config)
    time.sleep(1)
    assert runtime.stop(handle, grace_s=10) == 7
    assert b"checkpointed" in runtime.read_log(handle)[0]


@integration
def test_stop_kills_a_step_that_ignores_sigterm(runtime, prepared, image, run_dir, test_host):
    handle = runtime.start(run_dir, "stubborn", "trap '' TERM; sleep 301", {}, prepared[0], image.config)
    time.sleep(1)
    started = time.monotonic()
    assert runtime.stop(handle, grace_s=1) != 0
    assert 1 <= time.monotonic() - started < 10
    assert on_host(test_host, "pgrep", "-f", "sleep 301").returncode == 1


@integration
def test_a_step_is_started_once(runtime, prepared, image, run_dir):
    handle = runtime.start(run_dir, "once", "true", {}, prepared[0], image.config)
    assert runtime.wait(handle, timeout=60) == 0
    with pytest.raises(ProviderFailure, match="already started"):
        runtime.start(run_dir, "once", "true", {}, prepared[0], image.config)


# -- the root file system -----------------------------------------------------------


@integration
def test_preparing_the_same_image_again_reuses_the_rootfs(runtime, prepared, image, test_host):
    rootfs, remote_tars = prepared
    on_host(test_host, "touch", f"{rootfs}/kept-if-reused")
    assert runtime.prepare(image.id, remote_tars) == rootfs
    assert on_host(test_host, "test", "-e", f"{rootfs}/kept-if-reused").returncode == 0
    on_host(test_host, "rm", f"{rootfs}/kept-if-reused")


def one_member_tar(path: Path, name: str, data: bytes) -> Path:
    """A layer tar holding one regular file."""
    with tarfile.open(path, "w") as tar:
        member = tarfile.TarInfo(name)
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    return path


@integration
def test_a_refused_layer_leaves_no_rootfs(runtime, tmp_path, test_host):
    evil = one_member_tar(tmp_path / "evil.tar", "../escape", b"x\n")
    runtime.host.put(evil, f"{DATA_DIR}/layers/evil.tar")
    image_id = "sha256:" + "e" * 64
    with pytest.raises(BadInput, match="escapes"):
        runtime.prepare(image_id, [f"{DATA_DIR}/layers/evil.tar"])
    listing = on_host(test_host, "ls", f"{DATA_DIR}/runner/rootfs").stdout
    assert "e" * 64 not in listing


@integration
def test_an_unfinished_rootfs_is_replaced(runtime, tmp_path, test_host):
    small = one_member_tar(tmp_path / "small.tar", "etc/hello", b"hi\n")
    runtime.host.put(small, f"{DATA_DIR}/layers/small.tar")
    root = f"{DATA_DIR}/runner/rootfs/{'a' * 64}"
    on_host(test_host, "mkdir", "-p", f"{root}/half-written", f"{root}.tmp-dead/also")
    assert runtime.prepare("sha256:" + "a" * 64, [f"{DATA_DIR}/layers/small.tar"]) == root
    assert on_host(test_host, "ls", "-A", root).stdout.split() == [".runner-unpacked.json", "etc"]
    assert on_host(test_host, "test", "-e", f"{root}.tmp-dead").returncode == 1


# -- pure parts ---------------------------------------------------------------------

LISTING = [
    "proot /usr/bin/proot",
    "dev /dev/nvidia1",
    "dev /dev/nvidiactl",
    "dev /dev/nvidia0",
    "ld 412 libs found in cache `/etc/ld.so.cache'",
    "ld \tlibnvidia-ml.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1",
    "ld \tlibcuda.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so.1",
    "ld \tlibcuda.so.1 (libc6) => /usr/lib/i386-linux-gnu/libcuda.so.1",
    "ld \tlibc.so.6 (libc6,x86-64, OS ABI: Linux 3.2.0) => /lib/x86_64-linux-gnu/libc.so.6",
    "file /usr/lib/x86_64-linux-gnu/libcuda.so.1",
    "file /usr/local/nvidia/lib64/libcuda.so.535.1",
]


@pytest.mark.unit
def test_gpu_binds_bind_devices_and_64_bit_driver_libraries():
    binds = gpu_binds(LISTING)
    libs = f"{GUEST_NVIDIA_LIBS}/"
    assert binds.proot_args == (
        "-b", "/dev/nvidia0", "-b", "/dev/nvidia1", "-b", "/dev/nvidiactl",
        "-b", f"/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1:{libs}libnvidia-ml.so.1",
        "-b", f"/usr/lib/x86_64-linux-gnu/libcuda.so.1:{libs}libcuda.so.1",
        "-b", f"/usr/local/nvidia/lib64/libcuda.so.535.1:{libs}libcuda.so.535.1",
    )  # fmt: skip
    assert binds.library_dir == GUEST_NVIDIA_LIBS


@pytest.mark.unit
def test_no_gpu_devices_means_no_binds():
    assert gpu_binds([line for line in LISTING if not line.startswith("dev ")]) == GpuBinds()
    assert gpu_binds(["dev /dev/nvidia0"]) == GpuBinds(("-b", "/dev/nvidia0"), None)


@pytest.mark.unit
def test_guest_env_layers_image_step_and_gpu_libraries():
    config = {"config": {"Env": ["PATH=/opt/bin:/bin", "LD_LIBRARY_PATH=/opt/lib", "A=image"]}}
    env = guest_env(config, {"A": "step", "B": "x=y"}, GpuBinds((), "/nv"))
    assert env == {
        "PATH": "/opt/bin:/bin",
        "HOME": "/root",
        "LD_LIBRARY_PATH": "/nv:/opt/lib",
        "A": "step",
        "B": "x=y",
    }
    assert guest_env({}, {}, GpuBinds())["PATH"].endswith("/bin")
    with pytest.raises(BadInput):
        guest_env({}, {"A=B": "c"}, GpuBinds())


# -- host bootstrap -----------------------------------------------------------------


@integration
def test_a_host_without_proot_gets_it_installed_and_the_log_says_so(start_host, store, caplog):
    host = start_host()
    host.exec("dpkg", "--remove", "proot")
    with RemoteHost(host.endpoint(), store, retry=FAST) as remote:
        runtime = open_runtime(remote, DATA_DIR, "auto")
        assert isinstance(runtime, RootfsRuntime)
    assert f"installed proot on 127.0.0.1:{host.port} with apt-get" in caplog.text
    assert host.exec("sh", "-c", "command -v proot").stdout.strip()


@integration
def test_a_login_that_cannot_install_proot_gets_a_clear_error(start_host, store):
    host = start_host()
    host.exec("dpkg", "--remove", "proot")
    endpoint = host.endpoint(user="runner", key_file=None, password=host.password)
    with RemoteHost(endpoint, store, retry=FAST) as remote, pytest.raises(ProviderFailure) as failure:
        open_runtime(remote, "/home/runner/data", "auto")
    expected = "has no proot and it could not be installed (not root, and sudo needs a password)"
    assert expected in str(failure.value)
