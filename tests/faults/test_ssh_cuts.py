"""SSH cut while a run moves data: during the image sync, the input upload, the log streaming
and the artifact download, each at random moments. The link goes through a relay held to
80 Mbit/s so that each transfer lasts seconds; a cut kills every sshd session on the container
host (the steps run on: they are detached). The run must still succeed, with the input hashed
on the host equal to the laptop's file, the artifact equal to what the step wrote, and
nothing left running."""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.throttle import throttled
from runner.store import Store
from tests.faults.checks import assert_artifacts_intact, assert_store_consistent
from tests.faults.conftest import FULL
from tests.own_image import build_own_image
from tests.remote.conftest import BASE_IMAGE

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

MB = 1 << 20
OUTPUT = "yes runner-fault-output | head -c 67108864"  # 64 MB, the same bytes every time
TRAIN = (
    "sha256sum /data/in/input.bin | cut -d' ' -f1 > /out/input.sha;"
    f" echo training; sleep 3; {OUTPUT} > /out/big"
)
Moment = Callable[[Store, str, Path], bool]


def _phase(name: str) -> Moment:
    return lambda store, run_id, run_dir: any(p.name == name for p in store.phases(run_id))


def _event(kind: str) -> Moment:
    return lambda store, run_id, run_dir: any(e.kind == kind for e in store.events(run_id))


def _log(text: str) -> Moment:
    return lambda store, run_id, run_dir: text in _read(run_dir / "logs" / "train.log")


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


# when the cut may come: after this moment, plus a random delay up to the second number
PHASES = {
    "image-sync": (_phase("stage"), 2.0),
    "input-upload": (_event("image.synced"), 1.5),
    "log-streaming": (_log("training"), 2.0),
    "artifact-download": (_phase("collect"), 4.0),
}
POINTS = 3 if FULL else 1


@pytest.fixture(scope="module")
def fat_image():
    """The base plus a 32 MB layer, so the image sync lasts seconds on the slowed link."""
    import docker

    client = docker.from_env()
    dockerfile = f"FROM {BASE_IMAGE}\nRUN head -c 33554432 /dev/urandom > /opt/fat.bin\n"
    image_id = build_own_image(client, dockerfile, "runner-test/fat")
    yield image_id
    client.images.remove(image_id, force=True)
    client.close()


def cases() -> list:
    return [pytest.param(phase, point, id=f"{phase}-{point}") for phase in PHASES for point in range(POINTS)]


@pytest.mark.parametrize(("phase", "point"), cases())
def test_a_run_survives_an_ssh_cut(start_host, root_key, fat_image, tmp_path, phase, point):
    host = start_host()
    relay = throttled(host.port, 80e6)
    folder = tmp_path
    shutil.copy(root_key.private_file, folder / "id_ed25519")
    (folder / "id_ed25519").chmod(0o600)
    data = os.urandom(24 * MB)
    (folder / "input.bin").write_bytes(data)
    spec = folder / "job.yaml"
    spec.write_text(
        f"""name: cut-{phase}
provider:
  type: ssh
  host: 127.0.0.1
  port: {relay.port}
  key_file: id_ed25519
  data_dir: /srv/cut-{secrets.token_hex(3)}
image: {{ref: '{fat_image}'}}
inputs: [{{src: input.bin, dest: in/input.bin}}]
train: {{gpus: 0, run: {json.dumps(TRAIN)}}}
outputs: [/out/input.sha, /out/big]
""",
        encoding="utf-8",
    )
    moment, spread = PHASES[phase]
    cuts: list[float] = []
    env = {**os.environ, "RUNNER_HOME": str(folder / "home")}
    argv = [sys.executable, "-m", "runner", "submit", str(spec), "--json", "--out", str(folder / "runs")]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cutter = threading.Thread(
        target=_cut_when, args=(host.container, folder, moment, random.uniform(0.2, spread), proc, cuts)
    )
    cutter.start()
    try:
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        cutter.join(timeout=60)
        relay.close()
    assert cuts, f"the {phase} moment never came"
    assert proc.returncode == 0, stderr[-4000:]
    payload = json.loads(stdout)
    assert_artifacts_intact(payload)
    run_dir = Path(payload["run_dir"])
    assert (run_dir / "artifacts" / "input.sha").read_text().strip() == hashlib.sha256(data).hexdigest()
    expected = subprocess.run(
        ["sh", "-c", f"{OUTPUT} | sha256sum"], capture_output=True, text=True
    ).stdout.split()[0]
    assert hashlib.sha256((run_dir / "artifacts" / "big").read_bytes()).hexdigest() == expected
    assert_store_consistent(env, payload["run_id"])


def _cut_when(container: str, folder: Path, moment: Moment, delay: float, proc, cuts: list[float]) -> None:
    """Wait for the moment in the run's records, then the delay, then kill every sshd session."""
    home, runs = folder / "home", folder / "runs"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        run_dirs = list(runs.glob("*/")) if runs.is_dir() else []
        if run_dirs and (home / "state.db").exists():
            with Store(home) as store:
                if moment(store, run_dirs[0].name, run_dirs[0]):
                    time.sleep(delay)
                    subprocess.run(
                        ["docker", "exec", container, "pkill", "-f", "sshd: root"], capture_output=True
                    )
                    cuts.append(time.monotonic())
                    return
        time.sleep(0.05)
