"""`runner image sync` as a user runs it (a subprocess), against the container host (no Docker:
the rootfs runtime) and the VM-like host (its own dockerd): only missing layers are sent, a
repeated sync sends nothing, a one-line change sends one layer, and the host ends up with the
laptop's image ID. Bad input exits 2 with one line."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from runner.errors import BadInput
from runner.image_sync import parse_host
from runner.images import docker_client

RUNNER = [sys.executable, "-m", "runner"]
integration = pytest.mark.integration
unit = pytest.mark.unit


def sync(home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "RUNNER_HOME": str(home), **(env or {})}
    return subprocess.run(
        [*RUNNER, "image", "sync", *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )


def sync_json(home: Path, *args: str) -> dict:
    proc = sync(home, *args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def local_image(tag: str) -> tuple[str, list[str]]:
    """The image's ID and its layers' diffIDs, as the laptop's engine has them."""
    attrs = docker_client().api.inspect_image(tag)
    return attrs["Id"], attrs["RootFS"]["Layers"]


def job_spec(folder: Path, provider: str, image_id: str) -> Path:
    path = folder / f"job-{secrets.token_hex(3)}.yaml"
    path.write_text(
        f"version: 1\nname: sync-test\nprovider:\n{provider}image:\n  ref: {image_id}\n"
        "train:\n  gpus: 0\n  run: 'true'\noutputs:\n  - /out/x\n",
        encoding="utf-8",
    )
    return path


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2 and proc.stdout == "", (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


# -- bad input: nothing is contacted ----------------------------------------------------------


@unit
@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("gpu.example.com", (None, "gpu.example.com", None)),
        ("ubuntu@10.0.0.5:2222", ("ubuntu", "10.0.0.5", 2222)),
        ("root@[fe80::1]:22", ("root", "fe80::1", 22)),
        ("fe80::1", (None, "fe80::1", None)),
    ],
)
def test_parse_host(text, parts):
    assert parse_host(text) == parts


@unit
@pytest.mark.parametrize("text", ["host:0", "host:port", "Bad User@host", "-host", "a@b@:22", ""])
def test_parse_host_refuses_malformed(text):
    with pytest.raises(BadInput):
        parse_host(text)


@unit
def test_an_image_without_host_exits_2_with_one_line(tmp_path):
    line = one_error_line(sync(tmp_path, "runner-test/none:1"))
    assert "--host" in line


@unit
def test_a_missing_key_file_exits_2_with_one_line(tmp_path):
    missing = tmp_path / "no-such-key"
    proc = sync(tmp_path, "runner-test/none:1", "--host", "127.0.0.1:1", "--key", str(missing))
    line = one_error_line(proc)
    assert "SSH key file not found" in line and str(missing) in line


@unit
def test_an_unset_password_variable_exits_2_naming_the_variable(tmp_path):
    proc = sync(tmp_path, "img:1", "--host", "127.0.0.1:1", "--password-env", "SYNC_TEST_NO_SUCH_VAR")
    assert "SYNC_TEST_NO_SUCH_VAR" in one_error_line(proc)


@unit
def test_a_local_job_without_host_exits_2_with_one_line(tmp_path):
    spec = job_spec(tmp_path, "  type: local\n", "sha256:" + "0" * 64)
    line = one_error_line(sync(tmp_path, str(spec)))
    assert "provider is local" in line and "--host" in line


# -- the container host: no Docker, the rootfs runtime ------------------------------------------


@pytest.fixture(scope="module")
def rootfs_syncs(sshd_host, images, tmp_path_factory) -> dict:
    """The first image synced, then again through a job spec naming the host, then its variant,
    into a data folder of this module's own (the shared host keeps other modules' layers)."""
    home = tmp_path_factory.mktemp("sync-home")
    data_dir = f"/root/sync-{secrets.token_hex(4)}"
    login = ["--host", f"root@127.0.0.1:{sshd_host.port}", "--key", str(sshd_host.root_key)]
    login += ["--data-dir", data_dir]
    first_id, _ = local_image(images["first"])
    provider = (
        f"  type: ssh\n  host: 127.0.0.1\n  port: {sshd_host.port}\n  key_file: {sshd_host.root_key}\n"
        f"  data_dir: {data_dir}\n"
    )
    spec = job_spec(home, provider, first_id)
    return {
        "data_dir": data_dir,
        "first": sync_json(home, images["first"], *login),
        "again": sync_json(home, str(spec)),
        "variant": sync_json(home, images["variant"], *login),
        "human": sync(home, images["variant"], *login),
    }


@integration
def test_rootfs_first_sync_sends_every_layer(rootfs_syncs, sshd_host, images):
    image_id, diff_ids = local_image(images["first"])
    first = rootfs_syncs["first"]
    assert first["runtime"] == "rootfs" and first["host"] == f"root@127.0.0.1:{sshd_host.port}"
    assert first["image_id"] == image_id
    assert set(first["sent"]) == set(diff_ids) and first["bytes_sent"] > 0 and first["skipped"] == []


@integration
def test_rootfs_sync_of_a_job_naming_the_host_sends_nothing_again(rootfs_syncs, images):
    image_id, diff_ids = local_image(images["first"])
    again = rootfs_syncs["again"]
    assert again["runtime"] == "rootfs" and again["image_id"] == image_id
    assert again["bytes_sent"] == 0 and again["sent"] == [] and set(again["skipped"]) == set(diff_ids)


@integration
def test_rootfs_variant_sends_only_its_last_layer_and_is_unpacked(rootfs_syncs, sshd_host, images):
    image_id, diff_ids = local_image(images["variant"])
    variant = rootfs_syncs["variant"]
    assert variant["image_id"] == image_id and variant["sent"] == [diff_ids[-1]]
    assert 0 < variant["bytes_sent"] < 10_000 and variant["bytes_skipped"] > 0
    rootfs = f"{rootfs_syncs['data_dir']}/runner/rootfs/{image_id.removeprefix('sha256:')}"
    assert sshd_host.exec("cat", f"{rootfs}/opt/t/last.txt").stdout == "a one-line change\n"


@integration
def test_rootfs_human_summary_is_one_line_on_stdout(rootfs_syncs, images):
    image_id, _ = local_image(images["variant"])
    proc = rootfs_syncs["human"]
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()
    assert "(rootfs): 0 layers sent" in line and "0.0 MB sent" in line
    assert line.endswith(f"image {image_id} verified")


# -- the VM-like host: its own Docker engine ----------------------------------------------------


@pytest.fixture(scope="module")
def docker_syncs(vm_host, images, tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("sync-home-vm")
    login = ["--host", f"root@{vm_host.address}", "--key", str(vm_host.root_key)]
    login += ["--data-dir", str(vm_host.folder / "data")]
    return {
        "first": sync_json(home, images["first"], *login),
        "again": sync_json(home, images["first"], *login),
        "variant": sync_json(home, images["variant"], *login),
    }


def engine_image_id(vm_host, image_id: str) -> str:
    return vm_host.docker("image", "inspect", "--format", "{{.Id}}", image_id).stdout.strip()


@integration
def test_docker_first_sync_loads_the_image_with_the_same_id(docker_syncs, vm_host, images):
    image_id, _ = local_image(images["first"])
    first = docker_syncs["first"]
    assert first["runtime"] == "docker" and first["host"] == f"root@{vm_host.address}:22"
    assert first["image_id"] == image_id and first["bytes_sent"] > 0 and first["sent"]
    assert engine_image_id(vm_host, image_id) == image_id


@integration
def test_docker_second_sync_sends_nothing(docker_syncs, images):
    image_id, diff_ids = local_image(images["first"])
    again = docker_syncs["again"]
    assert again["image_id"] == image_id and again["bytes_sent"] == 0 and again["sent"] == []
    assert set(again["skipped"]) == set(diff_ids)


@integration
def test_docker_variant_sends_one_layer_and_the_engine_has_it(docker_syncs, vm_host, images):
    image_id, diff_ids = local_image(images["variant"])
    variant = docker_syncs["variant"]
    assert variant["sent"] == [diff_ids[-1]] and 0 < variant["bytes_sent"] < 10_000
    assert engine_image_id(vm_host, image_id) == image_id


# -- layer sources: a registry the laptop reaches and the host does not ---------------------------


@pytest.fixture(scope="module")
def loopback_registry(registry_storage, tmp_path_factory):
    """A registry on this machine's 127.0.0.1 holding the test base image: the laptop resolves
    the base there, but for the container host 127.0.0.1 is itself."""
    from tests.remote import registry_server
    from tests.remote.conftest import BASE_IMAGE

    registry_storage.push(BASE_IMAGE, "base/bookworm:minbase")
    server = registry_server.start_local(tmp_path_factory.mktemp("loopback-registry"), registry_storage.path)
    yield server
    server.stop()


def registry_job(folder: Path, provider: str, image_id: str, registry: str) -> Path:
    spec = job_spec(folder, provider, image_id)
    text = spec.read_text(encoding="utf-8").replace(
        f"  ref: {image_id}\n",
        f"  ref: {image_id}\n  registry: {{base: '{registry}/base/bookworm:minbase'}}\n",
    )
    spec.write_text(text, encoding="utf-8")
    return spec


@integration
def test_image_plan_shows_which_layers_a_registry_serves(loopback_registry, images, tmp_path):
    from tests.remote.conftest import BASE_IMAGE

    image_id, diff_ids = local_image(images["first"])
    _, base_layers = local_image(BASE_IMAGE)
    spec = registry_job(tmp_path, "  type: local\n", image_id, loopback_registry.host)
    proc = subprocess.run(
        [*RUNNER, "image", "plan", str(spec), "--json"],
        env={**os.environ, "RUNNER_HOME": str(tmp_path)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    sources = {layer["diff_id"]: layer["source"] for layer in plan["layers"]}
    assert sources == {d: loopback_registry.host if d in base_layers else "laptop" for d in diff_ids}
    assert plan["registry"]["manifest_digest"].startswith("sha256:") and plan["laptop_bytes"] < 1_000_000
    human = subprocess.run(
        [*RUNNER, "image", "plan", str(spec)],
        env={**os.environ, "RUNNER_HOME": str(tmp_path)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert human.stdout.splitlines()[0].split() == ["LAYER", "SIZE", "SOURCE", "BLOB"]
    assert (
        f"{base_layers[0].removeprefix('sha256:')[:12]}" in human.stdout
        and "the laptop sends" in human.stdout
    )


@integration
def test_a_registry_the_host_cannot_reach_falls_back_to_the_laptop(
    loopback_registry, sshd_host, images, tmp_path
):
    image_id, diff_ids = local_image(images["first"])
    data_dir = f"/root/sync-{secrets.token_hex(4)}"
    provider = (
        f"  type: ssh\n  host: 127.0.0.1\n  port: {sshd_host.port}\n  key_file: {sshd_host.root_key}\n"
        f"  data_dir: {data_dir}\n"
    )
    spec = registry_job(tmp_path, provider, image_id, loopback_registry.host)
    proc = sync(tmp_path, str(spec), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["fetched"] == [] and set(report["sent"]) == set(diff_ids)
    assert set(report["sources"].values()) == {"laptop"} and report["image_id"] == image_id
    assert f"registry {loopback_registry.host} cannot be reached" in proc.stderr
    assert "no registry could serve it; sent from the laptop" in proc.stderr


@pytest.mark.security
@integration
def test_registry_credentials_reach_the_fetch_but_no_log_store_or_process_list(
    registry_storage, start_host, images, tmp_path
):
    """A basic-auth registry the host reaches: the host fetches the base with the job's
    credentials; the password is in no process's command line while the sync runs, nowhere in
    the state folder, and the fetcher's private folder is gone afterwards. A wrong password is
    one line and exit 2, before anything is sent."""
    import threading

    from tests.remote import registry_server
    from tests.remote.conftest import BASE_IMAGE

    registry_storage.push(BASE_IMAGE, "base/bookworm:minbase")
    host = start_host()
    image_id, diff_ids = local_image(images["first"])
    _, base_layers = local_image(BASE_IMAGE)
    with registry_server.container_registry(
        host.container, registry_storage.path, tmp_path, BASE_IMAGE, basic_auth=True
    ) as registry:
        provider = (
            f"  type: ssh\n  host: 127.0.0.1\n  port: {host.port}\n  key_file: {host.root_key}\n"
            "  data_dir: /srv/d\n"
        )
        spec = registry_job(tmp_path, provider, image_id, registry.host)
        spec.write_text(
            spec.read_text(encoding="utf-8").replace(
                "minbase'}",
                f"minbase', insecure: ['{registry.host}'], username_env: REG_U, password_env: REG_P}}",
            ),
            encoding="utf-8",
        )
        wrong = sync(tmp_path, str(spec), env={"REG_U": registry.user, "REG_P": "not-" + registry.password})
        assert f"registry {registry.host} refused the credentials" in one_error_line(wrong)

        seen: list[str] = []
        done = threading.Event()

        def watch_processes() -> None:
            while not done.is_set():
                seen.append(subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout)
                done.wait(0.05)

        watcher = threading.Thread(target=watch_processes)
        watcher.start()
        try:
            proc = sync(
                tmp_path, str(spec), "--json", env={"REG_U": registry.user, "REG_P": registry.password}
            )
        finally:
            done.set()
            watcher.join()
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert set(report["fetched"]) == set(base_layers) and report["image_id"] == image_id
        assert set(report["sent"]) == set(diff_ids) - set(base_layers)
        assert any("registry_fetch.py" in listing for listing in seen)  # the watch saw the fetch run
        assert not any(registry.password in listing for listing in seen)
        for path in tmp_path.rglob("*"):
            if path.is_file():
                assert registry.password.encode() not in path.read_bytes(), path
        leftovers = host.exec("sh", "-c", "ls -A /srv/d/runner/fetch").stdout
        assert leftovers == "", leftovers
