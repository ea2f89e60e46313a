"""The instance's data disk too small for the image, or filling up while the image is unpacked
or while `docker load` writes it into the engine (real size-limited filesystems on real sshd
hosts, a real dockerd): one clear line, exit code 3, and nothing half-made left to be taken for
whole. A disk filling up while the trainer checkpoints is
tests/trainer/test_resume.py's (the last complete checkpoint is kept)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from runner.docker_runtime import DockerRuntime
from runner.errors import ProviderFailure
from runner.layers import RemoteLayout, digest_hex, image_layers, sync_layers
from runner.remote import RemoteHost
from runner.runtimes import RootfsRuntime, open_runtime
from runner.store import Store
from tests.remote.vm_host import start_vm_host

pytestmark = [pytest.mark.integration]


def files_under(host, folder: str) -> list[str]:
    found = subprocess.run(
        ["docker", "exec", host.container, "find", folder, "-type", "f"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return found.stdout.split()


def test_an_image_too_big_for_the_data_disk_is_refused_before_anything_is_sent(start_host, images, tmp_path):
    host = start_host(docker_args=("--tmpfs", "/root/small:size=16m"))
    argv = [sys.executable, "-m", "runner", "image", "sync", images["first"], "--host"]
    argv += [f"root@127.0.0.1:{host.port}", "--key", str(host.root_key), "--data-dir", "/root/small/data"]
    done = subprocess.run(
        argv, env={**os.environ, "RUNNER_HOME": str(tmp_path)}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 3, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith(
        f"error: not enough space on 127.0.0.1:{host.port} in /root/small/data for image sha256:"
    )
    assert "MB needed, 16.8 MB free" in line and "Traceback" not in done.stderr
    assert files_under(host, "/root/small") == []  # nothing was sent


def test_a_disk_filling_up_while_the_image_unpacks_fails_in_one_line_leaving_no_rootfs(
    start_host, images, tmp_path
):
    host = start_host(docker_args=("--tmpfs", "/root/small:size=300m"))  # the layers fit, their rootfs not
    layers = image_layers(images["first"])
    data_dir = "/root/small/data"
    with Store(tmp_path) as store, RemoteHost(host.endpoint(), store) as remote:
        remote.connect()
        sync_layers(remote, layers, data_dir)  # room for the layers: only the rootfs is asked for later
        layout = RemoteLayout.at(data_dir)
        runtime = RootfsRuntime(remote, data_dir)
        with pytest.raises(ProviderFailure) as raised:
            runtime.prepare(
                layers.image_id,
                [layout.layer(d) for d in layers.diff_ids],
                [digest_hex(d) for d in layers.diff_ids],
            )
    message = raised.value.message
    assert (
        message.startswith(f"cannot unpack image {layers.image_id} on ")
        and "No space left on device" in message
    )
    assert "\n" not in message
    rootfs = f"{data_dir}/runner/rootfs"
    assert files_under(host, rootfs) == []  # the half-unpacked tree is gone, nothing under the real name


def test_a_disk_filling_up_while_docker_loads_fails_in_one_line_and_the_layers_stay_cached(
    root_key, images, tmp_path_factory, tmp_path
):
    host = start_vm_host(tmp_path_factory.mktemp("small-engine"), root_key, data_root_mb=48)
    try:
        data_dir = str(host.folder / "data")  # the layers fit; the engine's own disk does not
        layers = image_layers(images["first"])
        with Store(tmp_path) as store, RemoteHost(host.endpoint(), store) as remote:
            remote.connect()
            runtime = open_runtime(remote, data_dir, "docker")
            assert isinstance(runtime, DockerRuntime)
            with pytest.raises(ProviderFailure) as raised:
                runtime.prepare_image(layers)
        message = raised.value.message
        assert message.startswith(f"the Docker engine on {host.address}:22 has no space left for image")
        assert layers.image_id in message and "docker system prune" in message
        assert "\n" not in message
        assert host.docker("image", "inspect", layers.image_id).returncode != 0  # no half image
        cached = [Path(RemoteLayout.at(data_dir).layer(d)) for d in layers.diff_ids]
        assert all(path.is_file() for path in cached)  # kept for the next try, not sent again
    finally:
        host.stop()
