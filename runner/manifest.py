"""The run manifest: everything needed to know what a run was, to check its results and to run
it again.

Written atomically to runs/<id>/manifest.json, and into the store, after every phase and when
the run ends, so even a failed or interrupted run says which spec, image and inputs it used,
and a run folder deleted by hand does not take the record with it. Secrets never enter it: the
spec names them, their values live only in the environment of the steps that asked for them.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from runner import __version__
from runner.files import json_lines, write_json_atomic
from runner.spec import SPEC_VERSION

if TYPE_CHECKING:
    from runner.pipeline import RunContext
    from runner.store import Phase, Run, Store

MANIFEST_VERSION = 2
# What the trainer writes next to its metrics (trainer/finetune.py), brought home by collect.
TRAINER_FILES = {"config": "train_config.json", "environment": "environment.json"}
DOWNLOADS = "downloads.jsonl"  # what `trainer.fetch --record` fetched on the host
FINAL_METRICS = ("step", "loss", "val_loss", "lr", "tokens")


@dataclass(frozen=True)
class Artifact:
    path: str
    """Relative to the run folder."""
    sha256: str
    bytes: int


@dataclass(frozen=True)
class InputRecord:
    src: str
    dest: str
    """Relative to /data."""
    sha256: str
    bytes: int


def write(ctx: RunContext, run: Run, phases: list[Phase]) -> Path:
    """Write the manifest of the run as it stands to its folder and to the store."""
    spec = ctx.loaded.spec
    payload = {
        "manifest_version": MANIFEST_VERSION,
        "run_id": run.id,
        "reproduces": ctx.reproduces,
        "status": run.status,
        "exit_code": run.exit_code,
        "error": run.error,
        "created_at": run.created_at,
        "ended_at": run.ended_at,
        "runner": {"version": __version__, "python": platform.python_version()},
        "source": ctx.source,
        "job": {
            "name": spec.name,
            "spec_version": SPEC_VERSION,
            "spec_path": str(ctx.loaded.path),
            "spec_sha256": ctx.loaded.sha256,
            "spec_text": ctx.loaded.text,
            "spec": spec.model_dump(mode="json"),
        },
        "provider": {
            "type": ctx.provider.type,
            "instance_id": ctx.instance_id,
            "instance_created": ctx.instance_created if ctx.instance_id else None,
        },
        "image": _image(ctx),
        "inputs": [asdict(item) for item in ctx.inputs],
        "downloads": json_lines(ctx.run_dir / DOWNLOADS),
        "trainer": {key: _read_json(ctx.run_dir / name) for key, name in TRAINER_FILES.items()},
        "metrics": {"final": final_metrics(ctx.run_dir / "metrics.jsonl")},
        "phases": [
            {
                "name": p.name,
                "status": p.status,
                "attempt": p.attempt,
                "started_at": p.started_at,
                "ended_at": p.ended_at,
                "seconds": p.seconds,
                "detail": p.detail,
            }
            for p in phases
        ],
        "artifacts": [asdict(a) for a in ctx.artifacts],
    }
    path = ctx.run_dir / "manifest.json"
    write_json_atomic(path, payload)
    ctx.store.put_manifest(run.id, payload)
    return path


def _image(ctx) -> dict | None:
    """The image, its base at the registry, and where each layer came from at the last sync
    (diffID, source: "instance", "laptop" or a registry, and the registry's blob digest)."""
    if ctx.image is None:
        return None
    synced = [event.data for event in ctx.store.events(ctx.run.id) if event.kind == "image.synced"]
    sources = synced[-1].get("sources", {}) if synced else {}
    blobs = ctx.registry.blobs if ctx.registry is not None else {}
    return {
        **ctx.image.to_dict(),
        "registry": ctx.registry.to_lock() if ctx.registry is not None else None,
        "layer_sources": [
            {"diff_id": diff_id, "source": where, "blob": _fetched_blob(blobs, diff_id, where)}
            for diff_id, where in sources.items()
        ],
    }


def _fetched_blob(blobs: dict, diff_id: str, where: str) -> str | None:
    """The registry blob a layer was fetched as (None when the laptop sent it or the host had it)."""
    return blobs[diff_id].digest if where not in ("instance", "laptop") and diff_id in blobs else None


def final_metrics(path: Path) -> dict:
    """The last value of each of FINAL_METRICS in a metrics.jsonl ({} without the file)."""
    final: dict = {}
    for entry in json_lines(path):
        final.update({key: entry[key] for key in FINAL_METRICS if key in entry})
    return final


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read(run: Run, store: Store | None = None) -> dict:
    """The run's manifest as last written: its folder's, else the store's ({} if neither)."""
    try:
        payload = json.loads((Path(run.run_dir) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        payload = None
    if not isinstance(payload, dict) and store is not None:
        payload = store.manifest(run.id)
    return payload if isinstance(payload, dict) else {}


def read_artifacts(run: Run) -> list[Artifact]:
    """The artifacts a finished run recorded (none if its manifest is missing)."""
    return [Artifact(**item) for item in read(run).get("artifacts", [])]
