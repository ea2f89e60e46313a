"""How a job's container runs on a host with its own Docker engine: the `docker` runtime.

VM-like instances (AWS, your own GPU box) have a Docker engine, so the image is loaded into it
and each step is a `docker run` supervised detached on the host (runner.steps): the supervisor
keeps the step's log, pid and exit code on the data disk, and the container belongs to the
engine, so neither a dropped SSH link nor the laptop going away ends it.

No registry is involved. The layers the engine already holds (as a chain: the same layers
in the same order, below the new ones) are never sent; the rest arrive in the host's layer
cache (runner.layers) and `load_image.py` streams a `docker load` archive assembled from the
cache, leaving out what the engine has. The containerd image store cannot load such a partial
archive, so there every layer is sent and loaded. The loaded image's ID must equal the
laptop's, or nothing runs.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from runner.errors import BadInput, ProviderFailure
from runner.layers import ImageLayers, LayerProgress, RemoteLayout, SyncReport, digest_hex, sync_layers
from runner.remote import RemoteHost
from runner.steps import DetachedSteps, StepHandle, absolute_folder, step_folder

if TYPE_CHECKING:
    from runner.layer_sources import RegistrySource
    from runner.spec import StepLimits

RUN_LABEL = "dev.runner.run_dir"
CONTAINER_HOME = "/tmp"  # the step runs as the login's uid, which may have no home in the image
# What the docker client itself needs from the host's environment (where the engine is).
CLIENT_ENV = ("PATH", "HOME", "DOCKER_HOST", "DOCKER_CONFIG", "DOCKER_CONTEXT", "DOCKER_TLS_VERIFY",
              "DOCKER_CERT_PATH")  # fmt: skip
_CONTAINERD_STORE = "io.containerd.snapshotter"

# One line per fact: "engine VERSION" or "no-engine REASON", then the storage driver's status,
# the login's uid:gid and the GPU devices.
_PROBE_SH = """command -v docker >/dev/null 2>&1 || { echo "no-engine docker is not installed"; exit 0; }
v=$(docker version --format '{{.Server.Version}}' 2>&1) || { echo "no-engine $v" | head -n 1; exit 0; }
echo "engine $v"
echo "driver $(docker info --format '{{json .DriverStatus}}' 2>/dev/null)"
echo "user $(id -u):$(id -g)"
for f in /dev/nvidia*; do [ -e "$f" ] && echo "dev $f"; done
exit 0"""
# Every image's layer list (diffIDs, in order), one JSON array per line.
_ENGINE_LAYERS_SH = """ids=$(docker image ls -aq --no-trunc | sort -u)
[ -n "$ids" ] || exit 0
docker image inspect --format '{{json .RootFS.Layers}}' $ids"""
# Force-removes the containers labelled with run folder $1 (none left is fine).
_REMOVE_SH = """ids=$(docker ps -aq --filter "label=$1=$2")
[ -z "$ids" ] || docker rm -f $ids >/dev/null"""


@dataclass(frozen=True)
class Engine:
    """What the probe found: the engine's version, its image store, who runs steps, GPUs."""

    version: str
    containerd_store: bool
    user: str
    gpus: bool


def probe_engine(host: RemoteHost) -> Engine | None:
    """The host's Docker engine as this login sees it, or None when there is none it can use."""
    result = host.run(["sh", "-c", _PROBE_SH], timeout=60)
    return parse_probe(result.stdout.splitlines())


def parse_probe(lines: Sequence[str]) -> Engine | None:
    facts = dict(line.partition(" ")[::2] for line in lines if line)
    if "engine" not in facts:
        return None
    return Engine(
        version=facts["engine"].strip(),
        containerd_store=_CONTAINERD_STORE in facts.get("driver", ""),
        user=facts.get("user", "").strip() or "0:0",
        gpus=any(line.startswith("dev ") for line in lines),
    )


def engine_chain(diff_ids: Sequence[str], engine_images: Sequence[Sequence[str]]) -> int:
    """How many of the image's first layers the engine holds as a chain: the longest prefix of
    diff_ids that some image on the engine starts with."""
    best = 0
    for layers in engine_images:
        count = 0
        for ours, theirs in zip(diff_ids, layers, strict=False):
            if ours != theirs:
                break
            count += 1
        best = max(best, count)
    return best


class DockerRuntime(DetachedSteps):
    """Steps of one image as `docker run` on the host's engine, detached from SSH."""

    name = "docker"

    def __init__(
        self, host: RemoteHost, data_dir: str, engine: Engine, limits: StepLimits | None = None
    ) -> None:
        super().__init__(host, f"{absolute_folder(data_dir)}/runner")
        self.data_dir = absolute_folder(data_dir)
        self.engine = engine
        self.limits = limits
        self._image: str | None = None

    # -- the image ------------------------------------------------------------------

    def prepare_image(
        self,
        layers: ImageLayers,
        progress: LayerProgress | None = None,
        registry: RegistrySource | None = None,
        note: Callable[[str], None] | None = None,
    ) -> SyncReport:
        """Make the image runnable on the engine, sending only the layers it lacks."""
        if self._engine_has(layers.image_id):
            self._image = layers.image_id
            return SyncReport.nothing_sent(layers, codec="none")
        chain = 0 if self.engine.containerd_store else engine_chain(layers.diff_ids, self._engine_layers())
        needed = set(layers.diff_ids[chain:])
        report = sync_layers(
            self.host,
            layers,
            self.data_dir,
            progress,
            needed=needed,
            registry=registry,
            steps=self,
            note=note,
        )
        self._load(layers, chain)
        self._image = layers.image_id
        cached = [RemoteLayout.at(self.data_dir).layer(diff_id) for diff_id in sorted(needed)]
        self.host.run(["rm", "-f", "--", *cached], timeout=600)  # the engine holds them now
        return report

    def _engine_has(self, image_id: str) -> bool:
        result = self.host.run(["docker", "image", "inspect", "--format", "{{.Id}}", image_id], timeout=60)
        return result.exit_code == 0 and result.stdout.strip() == image_id

    def _engine_layers(self) -> list[list[str]]:
        result = self._check(self.host.run(["sh", "-c", _ENGINE_LAYERS_SH], timeout=120), "list images")
        return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("[")]

    def _load(self, layers: ImageLayers, chain: int) -> None:
        """docker load an archive of the cache's layers (those after the engine's chain)."""
        layout = RemoteLayout.at(self.data_dir)
        plan = {
            "image_id": layers.image_id,
            "config": layout.config(layers.image_id),
            "layers": [
                {"diff_id": diff_id, "tar": layout.layer(diff_id) if index >= chain else None}
                for index, diff_id in enumerate(layers.diff_ids)
            ],
        }
        plan_file = f"{self.base}/images/{digest_hex(layers.image_id)}.load.json"
        self.put_json(plan_file, plan)
        result = self.host.run(["python3", self.ship("load_image.py"), plan_file], timeout=3600)
        if result.exit_code != 0 and "no space left on device" in result.stderr.lower():
            raise ProviderFailure(
                f"the Docker engine on {self._where()} has no space left for image {layers.image_id};"
                " free some (docker system prune) and resume: the layers stay cached on the host"
            )
        self._check(result, f"docker load {layers.image_id}")
        if not self._engine_has(layers.image_id):
            raise ProviderFailure(
                f"docker load on {self._where()} did not produce image {layers.image_id}"
                f" ({result.stdout.strip() or 'no output'})"
            )

    # -- steps ----------------------------------------------------------------------

    def start_step(
        self, run_dir_remote: str, step_name: str, script: str, env: Mapping[str, str], gpus: int
    ) -> StepHandle:
        """`docker run` the prepared image with `sh -c SCRIPT`, detached; the run's data, job
        (read-only) and out folders appear at /data, /job and /out, /data is the working folder.
        Values of env reach the container through the client's environment, never its argv."""
        if self._image is None:
            raise ProviderFailure(f"no image prepared on {self._where()} before step {step_name}")
        run_dir = absolute_folder(run_dir_remote)
        step_dir = step_folder(run_dir, step_name)
        for key, value in env.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) or "\0" in value:
                raise BadInput(f"bad environment variable name or value: {key!r}")
        folders = {name: f"{run_dir}/{name}" for name in ("data", "job", "out")}
        self._check(self.host.run(["mkdir", "-p", "--", *folders.values()]), f"create {run_dir}")
        argv = ["docker", "run", "--rm", "--name", container_name(step_dir)]
        argv += ["--label", f"{RUN_LABEL}={run_dir}"]
        argv += ["--init", "--network", "host", "--ipc", "host", "--user", self.engine.user, "-w", "/data"]
        argv += ["-v", f"{folders['data']}:/data", "-v", f"{folders['job']}:/job:ro"]
        argv += ["-v", f"{folders['out']}:/out", "-e", f"HOME={CONTAINER_HOME}"]
        if self.limits is not None and self.limits.memory:
            argv += ["--memory", self.limits.memory]
        if self.limits is not None and self.limits.cpus:
            argv += ["--cpus", f"{self.limits.cpus:g}"]
        if gpus and self.engine.gpus:
            argv += ["--gpus", "all"]
        argv += [arg for key in env for arg in ("-e", key)]
        argv += [self._image, "sh", "-c", script]
        return self.launch(step_dir, argv, env, inherit=CLIENT_ENV)

    def _signal(self, handle: StepHandle, signal: str) -> None:
        """The signal goes to the container (its init passes it on), not to the docker client:
        a client killed with SIGKILL would leave the container running."""
        self.host.run(["docker", "kill", "--signal", signal, container_name(handle.step_dir)], timeout=60)

    def clean_up(self, run_dir_remote: str) -> None:
        """Force-remove whatever containers of this run are left."""
        run_dir = absolute_folder(run_dir_remote)
        self._check(self.host.run(["sh", "-c", _REMOVE_SH, "sh", RUN_LABEL, run_dir], timeout=120), "remove")


def container_name(step_dir: str) -> str:
    """A container name derived from the step folder: the same in any later SSH session."""
    return "runner-" + hashlib.sha256(step_dir.encode()).hexdigest()[:20]
