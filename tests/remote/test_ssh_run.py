"""Whole `runner submit` runs over SSH on both kinds of test host: a container host (sshd +
proot, no Docker: the rootfs runtime) and a VM-like host (its own dockerd: the docker runtime).

A tiny image (the offline base plus one small layer) is pinned by its ID; the job uses shell
commands only (the base has no python3). The runs share one RUNNER_HOME per host kind, so the
second one finds the host key pinned and the layers on the host.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from infra.base import Lines
from infra.ssh import SshProvider
from runner.errors import BadInput, SpecError
from runner.spec import load_spec
from runner.store import Store
from tests.own_image import build_own_image
from tests.remote import registry_server
from tests.remote.conftest import BASE_IMAGE, REPO


def whole_run(test):
    """Marks a test that submits a whole job to the test host."""
    return pytest.mark.integration(pytest.mark.e2e(test))


RUN_TIMEOUT_S = 300
DOCKERFILE = f"""FROM {BASE_IMAGE}
RUN mkdir -p /opt/job && echo "from the image" > /opt/job/banner
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def image_id() -> str:
    import docker

    client = docker.from_env()
    image_id = build_own_image(client, DOCKERFILE, "runner-test/ssh-run")
    try:
        yield image_id
    finally:
        client.images.remove(image_id, force=True)
        client.close()


@dataclass(frozen=True)
class Target:
    """A test host as the whole-run tests see it, whatever its kind."""

    kind: str
    runtime: str
    address: str
    port: int
    data_dir: str
    exists: Callable[[str], bool]  # whether a path exists on the host
    busy: Callable[[], bool]  # whether a step's `sleep N` is running there (not a launcher's `sleep 0.1`)
    registry: str  # host:port of a registry both the host and this machine reach


@pytest.fixture(scope="module", params=["container", "vm"])
def ssh_host(request, registry_storage, tmp_path_factory) -> Target:
    folder = tmp_path_factory.mktemp(f"registry-{request.param}")
    if request.param == "container":
        host = request.getfixturevalue("start_host")()

        def on_host(*argv: str) -> bool:
            proc = subprocess.run(["docker", "exec", host.container, *argv], capture_output=True, timeout=60)
            return proc.returncode == 0

        # the registry: in a container on a network of the test's own, which the host joins
        with registry_server.container_registry(
            host.container, registry_storage.path, folder, BASE_IMAGE
        ) as registry:
            yield Target(
                "container", "rootfs", "127.0.0.1", host.port, "/srv/runner-data",
                exists=lambda path: on_host("test", "-e", path),
                busy=lambda: on_host("pgrep", "-f", "^sleep [0-9]+$"), registry=registry.host,
            )  # fmt: skip
        return
    vm = request.getfixturevalue("vm_host")

    def sleeping_container() -> bool:
        return "sleep" in vm.docker("ps", "--no-trunc", "--format", "{{.Command}}").stdout

    # the registry: inside the host's network namespace, on its address
    registry = registry_server.start_in_namespace(folder, registry_storage.path, vm.namespace, vm.address)
    try:
        yield Target(
            "vm", "docker", vm.address, vm.port, str(vm.folder / "runner-data"),
            exists=lambda path: Path(path).exists(), busy=sleeping_container, registry=registry.host,
        )  # fmt: skip
    finally:
        registry.stop()


@pytest.fixture(scope="module")
def job_folder(tmp_path_factory, ssh_host, root_key) -> Path:
    """A folder with the login key and an input file; the specs are written next to them."""
    folder = tmp_path_factory.mktemp(f"ssh-job-{ssh_host.kind}")
    shutil.copy(root_key.private_file, folder / "id_ed25519")
    (folder / "id_ed25519").chmod(0o600)
    (folder / "records.bin").write_bytes(os.urandom(10_000))
    return folder


def write_spec(folder: Path, host: Target, image_id: str, name: str, train: str, outputs: list[str]) -> Path:
    text = f"""\
name: {name}
provider:
  type: ssh
  host: {host.address}
  port: {host.port}
  key_file: id_ed25519
  data_dir: {host.data_dir}
image: {{ref: '{image_id}'}}
inputs:
  - src: records.bin
    dest: in/records.bin
setup:
  - name: prepare
    run: "sha256sum /data/in/records.bin | cut -d' ' -f1 > /data/x; echo prepared"
train:
  gpus: 0
  run: {json.dumps(train)}
outputs: {json.dumps(outputs)}
"""
    spec = folder / f"{name}.yaml"
    spec.write_text(text, encoding="utf-8")
    return spec


def runner_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "runner", *args]


def cli(folder: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a runner command with the folder's RUNNER_HOME."""
    return subprocess.run(
        runner_cli(*args), env=cli_env(folder), capture_output=True, text=True, timeout=timeout
    )


def cli_env(folder: Path) -> dict[str, str]:
    return {**os.environ, "RUNNER_HOME": str(folder / "home")}


def submit(folder: Path, spec: Path, *options: str, timeout: float = RUN_TIMEOUT_S) -> tuple[int, dict, str]:
    proc = cli(
        folder, "submit", str(spec), "--json", "--out", str(folder / "runs"), *options, timeout=timeout
    )
    return proc.returncode, json.loads(proc.stdout), proc.stderr


def events(folder: Path, run_id: str, kind: str) -> list[dict]:
    with Store(folder / "home") as store:
        return [e.data for e in store.events(run_id) if e.kind == kind]


GOOD_TRAIN = (
    "cat /opt/job/banner; mkdir -p /out/sub;"
    " { cat /data/x; sha256sum /data/in/records.bin | cut -d' ' -f1; } > /out/result;"
    " echo nested > /out/sub/file; echo trained"
)


@pytest.fixture(scope="module")
def good_runs(job_folder, ssh_host, image_id):
    """The same job submitted twice: the second finds the layers on the host."""
    spec = write_spec(job_folder, ssh_host, image_id, "ssh-good", GOOD_TRAIN, ["/out/result", "/out/sub"])
    return [submit(job_folder, spec) for _ in range(2)]


@whole_run
def test_whole_run_over_ssh_brings_back_verified_outputs(good_runs, job_folder, ssh_host):
    code, payload, stderr = good_runs[0]
    assert code == 0, stderr[-4000:]
    phases = {p["name"]: p["status"] for p in payload["phases"]}
    assert list(phases) == ["plan", "provision", "stage", "boot_gpu", "train", "collect", "teardown"]
    assert phases["provision"] == phases["boot_gpu"] == "skipped"
    assert {phases[n] for n in ("plan", "stage", "train", "collect", "teardown")} == {"succeeded"}

    run_dir = Path(payload["run_dir"])
    artifacts = {a["path"]: a["sha256"] for a in payload["artifacts"]}
    assert set(artifacts) == {"artifacts/result", "artifacts/sub/file"}
    for path, digest in artifacts.items():
        assert sha256(run_dir / path) == digest
    # the outputs, then the run's own files looked for beside the metrics (none written here)
    listed, *run_files = events(job_folder, payload["run_id"], "outputs.listed")
    assert [f["missing"] for f in run_files] == [
        ["metrics.jsonl"],
        ["train_config.json"],
        ["environment.json"],
        ["downloads.jsonl"],
    ]
    assert {f"artifacts/{f['path']}": f["sha256"] for f in listed["files"]} == artifacts
    assert listed["refused"] == listed["missing"] == []

    # the input was placed where the setup and train steps could read it, unchanged
    digest = sha256(job_folder / "records.bin")
    assert (run_dir / "artifacts" / "result").read_text().split() == [digest, digest]
    assert (run_dir / "artifacts" / "sub" / "file").read_text() == "nested\n"
    assert (run_dir / "logs" / "setup-01-prepare.log").read_text() == "prepared\n"
    assert (run_dir / "logs" / "train.log").read_text() == "from the image\ntrained\n"
    # a run that succeeded leaves nothing in its folder on the host
    assert not ssh_host.exists(f"{ssh_host.data_dir}/runner/runs/{payload['run_id']}")


@whole_run
def test_second_run_reuses_the_layers_on_the_host(good_runs, job_folder, ssh_host):
    (first_code, first, _), (second_code, second, stderr) = good_runs
    assert first_code == second_code == 0, stderr[-4000:]
    (sync1,) = events(job_folder, first["run_id"], "image.synced")
    (sync2,) = events(job_folder, second["run_id"], "image.synced")
    assert sync1["runtime"] == sync2["runtime"] == ssh_host.runtime
    assert sync1["bytes_sent"] > 0 and sync1["sent"]
    assert sync2["bytes_sent"] == 0 and sync2["sent"] == []
    assert sorted(sync2["skipped"]) == sorted(set(sync1["sent"]) | set(sync1["skipped"]))
    assert [a["sha256"] for a in second["artifacts"]] == [a["sha256"] for a in first["artifacts"]]


@whole_run
def test_failing_train_step_exits_1_with_its_log(job_folder, ssh_host, image_id):
    spec = write_spec(job_folder, ssh_host, image_id, "ssh-fail", "echo boom >&2; exit 7", ["/out"])
    code, payload, stderr = submit(job_folder, spec)
    assert code == 1, stderr[-4000:]
    assert "train exited with code 7" in payload["error"]
    phases = {p["name"]: p["status"] for p in payload["phases"]}
    assert phases["train"] == "failed" and phases["teardown"] == "succeeded" and "collect" not in phases
    assert (Path(payload["run_dir"]) / "logs" / "train.log").read_text() == "boom\n"
    # a failed run's folder is kept on the host for inspection
    assert ssh_host.exists(f"{ssh_host.data_dir}/runner/runs/{payload['run_id']}/data/x")


@whole_run
def test_a_stalled_trainer_is_stopped_by_the_watchdog_and_its_checkpoint_collected(
    job_folder, ssh_host, image_id
):
    """On a host the user owns nothing is powered off, but a stuck trainer still gets SIGTERM."""
    steps = "; ".join(f"echo '{{\"step\": {i}}}' >> /out/metrics.jsonl" for i in (1, 2))
    train = f"trap 'echo saved > /out/ckpt; exit 143' TERM; {steps}; while true; do sleep 1; done"
    spec = write_spec(job_folder, ssh_host, image_id, "ssh-stall", train, ["/out/ckpt"])
    spec.write_text(spec.read_text() + "watchdog: {stall_s: 3, interval_s: 1, grace_s: 10}\n")
    code, payload, stderr = submit(job_folder, spec)
    assert code == 1, stderr[-4000:]
    assert payload["error"].startswith(
        "the watchdog stopped training: no new training step for 3s (last step 2)"
    )
    assert (Path(payload["run_dir"]) / "artifacts" / "ckpt").read_text() == "saved\n"
    log = (Path(payload["run_dir"]) / "logs" / "watchdog.log").read_text().splitlines()
    assert [json.loads(line)["action"] for line in log] == ["start", "stop", "done"]  # no power-off here
    assert not ssh_host.busy()


@whole_run
@pytest.mark.parametrize(
    ("train", "outputs", "expected"),
    [
        ("ln -s /etc/passwd /out/leak", ["/out"], "output leak is a link; refusing to follow it"),
        ("ln -s /etc /out/etc", ["/out/etc/passwd"], "output etc/passwd lies below a link"),
    ],
    ids=["link-in-out", "path-below-link"],
)
@pytest.mark.security
def test_output_link_pointing_out_is_refused(job_folder, ssh_host, image_id, train, outputs, expected):
    spec = write_spec(job_folder, ssh_host, image_id, "ssh-link", train, outputs)
    code, payload, stderr = submit(job_folder, spec)
    assert code == 1, stderr[-4000:]
    assert expected in payload["error"]
    assert not [p for p in (Path(payload["run_dir"]) / "artifacts").rglob("*") if p.is_file()]


def interrupt_when_busy(folder: Path, spec: Path, host: Target) -> tuple[int, dict, str]:
    """Submit, wait until the train step's `sleep` runs on the host, then SIGTERM the controller."""
    argv = runner_cli("submit", str(spec), "--json", "--out", str(folder / "runs"))
    proc = subprocess.Popen(
        argv, env=cli_env(folder), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while not host.busy():
            assert proc.poll() is None and time.monotonic() < deadline, "the train step never started"
            time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, json.loads(stdout), stderr


@whole_run
def test_an_interrupted_controller_leaves_the_step_running_and_logs_f_reattaches(
    job_folder, ssh_host, image_id
):
    """Ctrl-C or SIGTERM on the laptop never kills the remote step; `runner logs -f` picks it up."""
    spec = write_spec(
        job_folder, ssh_host, image_id, "ssh-detach", "echo started; sleep 5; echo finished", ["/out"]
    )
    code, payload, stderr = interrupt_when_busy(job_folder, spec, ssh_host)
    assert code == 130, stderr[-4000:]
    assert payload["status"] == "interrupted"
    assert "keeps running on its host" in stderr
    run_id = payload["run_id"]
    left = json.loads(cli(job_folder, "status", run_id, "--json").stdout)["left_running"]
    assert left["name"] == "train" and left["state"] in ("running", "exited")
    follow = cli(job_folder, "logs", run_id, "-f")
    assert follow.returncode == 0, follow.stderr
    # the setup log, the train log as far as it was shown before the interrupt, then the rest
    assert follow.stdout == "prepared\nstarted\nfinished\n"
    assert "==> setup-01-prepare.log <==" in follow.stderr
    assert "train on root@" in follow.stderr and "exited with code 0" in follow.stderr
    assert not ssh_host.busy()

    resumed = cli(job_folder, "resume", run_id, "--json", timeout=RUN_TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stderr[-4000:]  # the step is not started again: collected
    assert json.loads(resumed.stdout)["status"] == "succeeded"
    train_log = (Path(payload["run_dir"]) / "logs" / "train.log").read_text().splitlines()
    assert train_log[0].startswith("runner: reattached to train") and train_log[1:] == ["started", "finished"]
    assert not ssh_host.exists(f"{ssh_host.data_dir}/runner/runs/{run_id}")  # cleaned up at the end


@whole_run
def test_runner_stop_ends_a_step_left_running(job_folder, ssh_host, image_id):
    spec = write_spec(job_folder, ssh_host, image_id, "ssh-stop", "echo started; sleep 300", ["/out"])
    code, payload, stderr = interrupt_when_busy(job_folder, spec, ssh_host)
    assert code == 130, stderr[-4000:]
    assert ssh_host.busy()
    run_id = payload["run_id"]
    stopped = cli(job_folder, "stop", run_id)
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped train on root@" in stopped.stderr
    assert not ssh_host.busy()
    assert ssh_host.exists(f"{ssh_host.data_dir}/runner/runs/{run_id}/steps/train/exit_code")
    again = cli(job_folder, "stop", run_id)
    assert again.returncode == 2 and "has no step left running on a host" in again.stderr


@whole_run
def test_smoke_job_over_ssh(job_folder, ssh_host, registry_storage):
    """The repository's smoke job (trainer image built from this checkout, 1.5 GB) over SSH. Its
    base (the Dockerfile's FROM) is in a registry the host reaches: the host fetches the base's
    layers itself, and only the trainer's own layers travel from here."""
    base = os.environ.get("RUNNER_BASE_TAG", "runner-base/torch-cpu:2.13.0")
    registry_storage.push(base, base)
    base_ref = f"{ssh_host.registry}/{base}"
    subprocess.run(["docker", "tag", base, base_ref], check=True, capture_output=True, timeout=60)
    text = (REPO / "jobs" / "smoke.yaml").read_text(encoding="utf-8")
    provider = (
        f"  type: ssh\n  host: {ssh_host.address}\n  port: {ssh_host.port}\n  key_file: id_ed25519\n"
        f"  data_dir: {ssh_host.data_dir}\n"
    )
    text = text.replace("context: ..", f"context: {REPO}").replace("  type: local\n", provider)
    text = text.replace(
        f"BASE_IMAGE: {base}", f"BASE_IMAGE: {base_ref}\n  registry: {{insecure: ['{ssh_host.registry}']}}"
    )
    spec = job_folder / "smoke.yaml"
    spec.write_text(text.replace("name: smoke", "name: smoke-ssh"), encoding="utf-8")
    try:
        code, payload, stderr = submit(job_folder, spec, timeout=600)
    finally:  # untag the built image (its layers are shared with the local smoke run's)
        subprocess.run(
            ["docker", "rmi", "runner/smoke-ssh:latest", base_ref], capture_output=True, timeout=120
        )
    assert code == 0, stderr[-4000:]
    run_dir = Path(payload["run_dir"])
    artifacts = {a["path"]: a["sha256"] for a in payload["artifacts"]}
    assert "artifacts/lora.safetensors" in artifacts and "artifacts/eval.json" in artifacts
    # metrics.jsonl and train_config.json came back with the outputs, so they are not fetched a
    # second time; environment.json (written by the trainer, not declared) and downloads.jsonl are
    listed, environment, downloads = events(job_folder, payload["run_id"], "outputs.listed")
    assert [f["path"] for f in environment["files"]] == ["environment.json"]
    assert downloads["missing"] == ["downloads.jsonl"]
    assert {f"artifacts/{f['path']}": f["sha256"] for f in listed["files"]} == artifacts
    for path, digest in artifacts.items():
        assert sha256(run_dir / path) == digest
    scores = json.loads((run_dir / "artifacts" / "eval.json").read_text(encoding="utf-8"))
    assert scores["lora"]["loss"] < scores["base"]["loss"]
    assert (run_dir / "metrics.jsonl").is_file()
    assert_base_layers_came_from_the_registry(job_folder, payload, ssh_host, base, stderr)


def assert_base_layers_came_from_the_registry(
    folder: Path, payload: dict, host: Target, base: str, stderr: str
) -> None:
    """Every layer of the base came from the registry (or was on the host); the laptop sent
    only the trainer's own layers: under 5 % of the image."""
    [synced] = events(folder, payload["run_id"], "image.synced")
    image = json.loads((Path(payload["run_dir"]) / "manifest.json").read_text(encoding="utf-8"))["image"]
    inspect = subprocess.run(
        ["docker", "image", "inspect", "-f", "{{json .RootFS.Layers}}", base], capture_output=True, text=True
    )
    base_layers = json.loads(inspect.stdout)
    own = [d for d in image["image"]["layers"] if d not in base_layers]
    sources = synced["sources"]
    assert {sources[d] for d in base_layers} <= {"instance", host.registry}
    assert synced["fetched"] and set(synced["fetched"]) <= set(base_layers)
    assert {sources[d] for d in own} == {"laptop"}
    assert synced["bytes_sent"] < 0.05 * image["image"]["size"], synced
    assert image["registry"]["manifest_digest"].startswith("sha256:")
    recorded = {entry["diff_id"]: entry for entry in image["layer_sources"]}
    assert {d: recorded[d]["source"] for d in sources} == sources
    assert all(recorded[d]["blob"].startswith("sha256:") for d in synced["fetched"])
    assert "the instance fetches" in stderr and "can come from a registry" in stderr
    if host.runtime == "rootfs":  # the root file system is named after the image ID it was made for
        image_hex = image["image"]["id"].removeprefix("sha256:")
        assert host.exists(f"{host.data_dir}/runner/rootfs/{image_hex}/.runner-unpacked.json")


# -- without a host -------------------------------------------------------------------

SSH_SPEC = """\
name: demo
provider:
  type: ssh
  host: gpu.example.org
{login}
image: {{ref: 'sha256:{digest}'}}
train: {{run: 'true'}}
outputs: [/out]
"""


def load(tmp_path: Path, login: str):
    spec = tmp_path / "job.yaml"
    spec.write_text(SSH_SPEC.format(login=login, digest="a" * 64), encoding="utf-8")
    return load_spec(spec)


@pytest.mark.unit
def test_ssh_provider_defaults_and_key_path(tmp_path):
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "id").write_text("not read at validation")
    provider = load(tmp_path, "  key_file: keys/id").spec.provider
    assert (provider.port, provider.user, provider.data_dir) == (22, "root", "/root/runner-data")
    assert provider.runtime == "auto"
    assert provider.key_path == tmp_path / "keys" / "id"
    assert "_key_path" not in load(tmp_path, "  key_file: keys/id").spec.model_dump()["provider"]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("login", "expected"),
    [
        ("  user: root", ":3: provider: give exactly one of 'key_file' or 'password_env'"),
        ("  key_file: id\n  password_env: PW", ":3: provider: give exactly one of"),
        ("  key_file: missing", ":5: provider.key_file: key file not found"),
        ("  password_env: 'A B'", ":5: provider.password_env: must be an environment variable name"),
        ("  password_env: PW\n  data_dir: relative", ":6: provider.data_dir: must be an absolute path"),
        ("  password_env: PW\n  port: 70000", ":6: provider.port: Input should be less than or equal"),
        ("  password_env: PW\n  runtime: podman", ":6: provider.runtime: Input should be 'auto'"),
        ("  password_env: PW\n  colour: blue", ":6: provider.colour: unknown field"),
    ],
)
def test_ssh_provider_problems_name_the_field(tmp_path, login, expected):
    (tmp_path / "id").write_text("key")
    with pytest.raises(SpecError) as caught:
        load(tmp_path, login)
    problems = caught.value.details or [caught.value.message]  # one problem: the message itself
    assert any(expected in line for line in problems), problems


@pytest.mark.unit
def test_unknown_provider_type_lists_the_known_ones(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text(SSH_SPEC.format(login="", digest="a" * 64).replace("type: ssh", "type: gcp"))
    with pytest.raises(SpecError) as caught:
        load_spec(spec)
    known = "'local', 'ssh', 'autodl', 'emulator' or 'aws'"
    assert caught.value.message == f"{spec}:3: provider.type: Input should be {known}"


@pytest.mark.unit
def test_missing_password_variable_is_bad_input(tmp_path, monkeypatch):
    monkeypatch.delenv("RUNNER_TEST_NO_SUCH_PW", raising=False)
    settings = load(tmp_path, "  password_env: RUNNER_TEST_NO_SUCH_PW").spec.provider
    with pytest.raises(BadInput, match="RUNNER_TEST_NO_SUCH_PW is not set"):
        SshProvider(settings).open_host("demo-run")


@pytest.mark.unit
def test_log_chunks_are_cut_into_lines():
    seen: list[str] = []
    lines = Lines(seen.append)
    for chunk in (b"one\ntw", b"o\r\n", "thr\u00e9e".encode()[:4], "thr\u00e9e".encode()[4:]):
        lines.feed(chunk)
    lines.flush()
    assert seen == ["one", "two", "thr\u00e9e"]


@pytest.mark.security
@whole_run
def test_a_recreated_host_is_refused_until_its_new_key_is_accepted(start_host, root_key, image_id, tmp_path):
    """The first run pins the host key; a host recreated on the same address is refused with both
    fingerprints, and --accept-new-host-key lets one run through and pins the new key."""
    from tests.remote.conftest import stop_host

    first = start_host()
    shutil.copy(root_key.private_file, tmp_path / "id_ed25519")
    (tmp_path / "records.bin").write_bytes(b"records")
    target = Target("container", "rootfs", "127.0.0.1", first.port, "/srv/runner-data", Path.exists, bool, "")
    spec = write_spec(tmp_path, target, image_id, "ssh-keys", "echo ok > /out/ok", ["/out/ok"])
    assert submit(tmp_path, spec)[0] == 0
    stop_host(first)
    second = start_host(first.port)

    code, payload, stderr = submit(tmp_path, spec)
    assert code == 2, stderr[-4000:]  # the user has to decide: a refusal, not a provider failure
    pinned = f"host key for 127.0.0.1:{first.port} changed: pinned ssh-ed25519 {first.host_fingerprint}"
    assert pinned in payload["error"]
    assert second.host_fingerprint in payload["error"] and "--accept-new-host-key" in payload["error"]
    assert submit(tmp_path, spec, "--accept-new-host-key")[0] == 0
    assert submit(tmp_path, spec)[0] == 0  # the new key is the pinned one now
