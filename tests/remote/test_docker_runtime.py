"""The docker runtime on the VM-like host (its own sshd and dockerd): registry-free loads from
the layer cache, only missing layers sent, steps detached as `docker run`, stopped by signal."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from runner.docker_runtime import DockerRuntime, Engine, container_name, engine_chain, parse_probe
from runner.layers import RemoteLayout, image_layers
from runner.remote import RemoteHost, RetryPolicy
from runner.runtimes import RootfsRuntime, open_runtime
from runner.steps import StepState
from runner.store import Store

FAST = RetryPolicy(attempts=4, first_delay=0.2, max_delay=1.0, deadline=20)
integration = pytest.mark.integration


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    with Store(tmp_path_factory.mktemp("docker-runtime-home")) as opened:
        yield opened


@pytest.fixture(scope="module")
def data_dir(vm_host) -> str:
    return str(vm_host.folder / "data")


def connect(vm_host, store) -> RemoteHost:
    host = RemoteHost(vm_host.endpoint(), store, retry=FAST)
    host.connect()
    return host


@pytest.fixture
def runtime(vm_host, store, data_dir) -> DockerRuntime:
    with connect(vm_host, store) as host:
        runtime = open_runtime(host, data_dir, "auto")
        assert isinstance(runtime, DockerRuntime)
        yield runtime


@pytest.fixture(scope="module")
def loaded(vm_host, store, data_dir, images, cache) -> dict:
    """The test image prepared on the host's engine twice, then its one-line variant."""
    reports = {}
    with connect(vm_host, store) as host:
        for name in ("first", "again", "variant"):
            runtime = open_runtime(host, data_dir, "docker")
            layers = image_layers(images["variant" if name == "variant" else "first"], cache)
            reports[name] = (layers, runtime.prepare_image(layers))
    return reports


def engine_image_id(vm_host, image_id: str) -> str:
    return vm_host.docker("image", "inspect", "--format", "{{.Id}}", image_id).stdout.strip()


@integration
def test_first_load_sends_every_layer_and_the_engine_has_the_same_image_id(loaded, vm_host, data_dir):
    layers, report = loaded["first"]
    assert set(report.sent) == set(layers.diff_ids) and report.bytes_sent > 0
    assert engine_image_id(vm_host, layers.image_id) == layers.image_id
    # once loaded, the engine holds the layers: the cache's copies are gone from the data disk
    layout = RemoteLayout.at(data_dir)
    assert not any(Path(layout.layer(d)).exists() for d in layers.diff_ids)  # the VM shares this disk


@integration
def test_loading_an_image_the_engine_has_sends_nothing(loaded):
    layers, report = loaded["again"]
    assert report.bytes_sent == 0 and report.sent == ()
    assert set(report.skipped) == set(layers.diff_ids)


@integration
def test_a_one_line_change_sends_only_the_last_layer_and_loads_a_partial_archive(loaded, vm_host):
    first, first_report = loaded["first"]
    variant, report = loaded["variant"]
    assert variant.diff_ids[:-1] == first.diff_ids[:-1] and variant.diff_ids[-1] != first.diff_ids[-1]
    assert report.sent == (variant.diff_ids[-1],)
    assert report.bytes_sent < first_report.bytes_sent / 100  # a small layer, the config, the list
    assert engine_image_id(vm_host, variant.image_id) == variant.image_id
    listing = vm_host.docker("run", "--rm", variant.image_id, "cat", "/opt/t/last.txt").stdout
    assert listing == "a one-line change\n"


@integration
def test_a_step_runs_in_the_image_with_its_folders_and_keeps_values_out_of_argv(
    runtime, loaded, data_dir, vm_host
):
    layers, _ = loaded["variant"]
    runtime.prepare_image(layers)
    run_dir = f"{data_dir}/runs/show"
    secret = "s3cr3t-value-not-in-argv"
    script = "cat /opt/t/last.txt; echo $TOKEN > /out/token; pwd; id -u; touch /job/x 2>/dev/null || echo ro"
    handle = runtime.start_step(run_dir, "01-show", script, {"TOKEN": secret}, gpus=0)
    chunks: list[bytes] = []
    assert runtime.wait(handle, timeout=120, on_output=chunks.append) == 0
    assert b"".join(chunks).decode().split("\n") == ["a one-line change", "/data", "0", "ro", ""]
    assert Path(f"{run_dir}/out/token").read_text() == secret + "\n"
    command = json.loads(Path(f"{run_dir}/steps/01-show/command.json").read_text())
    assert secret not in json.dumps(command["argv"]) and command["env"] == {"TOKEN": secret}
    assert "DOCKER_HOST" in command["inherit"]
    assert vm_host.docker("ps", "-aq").stdout.strip() == ""  # --rm: the container went with the step


@integration
def test_stop_signals_the_container_which_can_handle_sigterm(runtime, loaded, data_dir, vm_host):
    layers, _ = loaded["first"]
    runtime.prepare_image(layers)
    script = "trap 'echo got TERM; exit 7' TERM; echo waiting; while :; do sleep 0.2; done"
    handle = runtime.start_step(f"{data_dir}/runs/stop", "01-trap", script, {}, gpus=0)
    with pytest.raises(Exception, match="still runs"):
        runtime.wait(handle, timeout=2)
    assert vm_host.docker("ps", "-q", "--filter", f"name={container_name(handle.step_dir)}").stdout.strip()
    assert runtime.stop(handle, grace_s=20) == 7
    assert runtime.read_log(handle)[0] == b"waiting\ngot TERM\n"
    assert vm_host.docker("ps", "-aq").stdout.strip() == ""


@integration
def test_a_step_outlives_the_ssh_session_that_started_it(vm_host, store, data_dir, loaded):
    layers, _ = loaded["first"]
    with connect(vm_host, store) as host:
        runtime = open_runtime(host, data_dir, "docker")
        runtime.prepare_image(layers)
        handle = runtime.start_step(f"{data_dir}/runs/outlive", "01-sleep", "sleep 3; echo done", {}, gpus=0)
    with connect(vm_host, store) as host:
        later = open_runtime(host, data_dir, "docker")
        assert later.poll(handle).state is StepState.RUNNING
        assert later.wait(handle, timeout=60) == 0
        assert later.read_log(handle)[0] == b"done\n"


@integration
def test_auto_picks_rootfs_on_a_host_without_docker(sshd_host, store):
    with RemoteHost(sshd_host.endpoint(), store, retry=FAST) as host:
        assert isinstance(open_runtime(host, "/srv/auto", "auto"), RootfsRuntime)
        with pytest.raises(Exception, match="has no Docker engine this login can use"):
            open_runtime(host, "/srv/auto", "docker")


# -- without a host -------------------------------------------------------------------


@pytest.mark.unit
def test_probe_lines_say_engine_store_user_and_gpus():
    lines = [
        "engine 29.1.0",
        'driver [["driver-type","io.containerd.snapshotter.v1"]]',
        "user 1000:1000",
        "dev /dev/nvidia0",
    ]
    assert parse_probe(lines) == Engine("29.1.0", containerd_store=True, user="1000:1000", gpus=True)
    classic = parse_probe(["engine 20.10.24", 'driver [["Backing Filesystem","extfs"]]', "user 0:0"])
    assert classic == Engine("20.10.24", containerd_store=False, user="0:0", gpus=False)
    assert parse_probe(["no-engine permission denied while trying to connect"]) is None


@pytest.mark.unit
@pytest.mark.parametrize(
    ("engine", "expected"),
    [
        ([], 0),
        ([["sha256:a", "sha256:b"]], 2),
        ([["sha256:a", "sha256:x", "sha256:c"], ["sha256:a"]], 1),
        ([["sha256:b", "sha256:c"]], 0),  # the same layers in another chain do not count
        ([["sha256:a", "sha256:b", "sha256:c", "sha256:d"]], 3),
    ],
)
def test_engine_chain_is_the_longest_shared_prefix(engine, expected):
    assert engine_chain(("sha256:a", "sha256:b", "sha256:c"), engine) == expected


@integration
def test_limits_cap_the_step_container(vm_host, store, data_dir, loaded):
    from runner.spec import StepLimits

    layers, _ = loaded["first"]
    with connect(vm_host, store) as host:
        runtime = open_runtime(host, data_dir, "docker", StepLimits(memory="256m", cpus=0.5))
        runtime.prepare_image(layers)
        handle = runtime.start_step(f"{data_dir}/runs/limits", "01-limits", "sleep 60", {}, gpus=0)
        try:
            inspect = ["inspect", "--format", "{{.HostConfig.Memory}} {{.HostConfig.NanoCpus}}"]
            deadline = time.monotonic() + 30
            while (found := vm_host.docker(*inspect, container_name(handle.step_dir))).returncode:
                assert time.monotonic() < deadline, found.stderr
                time.sleep(0.2)
            assert found.stdout.split() == ["268435456", "500000000"]
        finally:
            runtime.stop(handle, grace_s=5)
