"""The run manifest: everything needed to know what a run was and to check its results.

Written atomically to runs/<id>/manifest.json after planning and again when the run ends,
so even a failed or interrupted run says which spec, image and inputs it used.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from runner import __version__
from runner.files import write_json_atomic

if TYPE_CHECKING:
    from runner.pipeline import RunContext
    from runner.store import Phase, Run

MANIFEST_VERSION = 1


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
    spec = ctx.loaded.spec
    payload = {
        "manifest_version": MANIFEST_VERSION,
        "run_id": run.id,
        "status": run.status,
        "exit_code": run.exit_code,
        "error": run.error,
        "created_at": run.created_at,
        "ended_at": run.ended_at,
        "runner": {"version": __version__, "python": platform.python_version()},
        "job": {
            "name": spec.name,
            "spec_path": str(ctx.loaded.path),
            "spec_sha256": ctx.loaded.sha256,
            "spec": spec.model_dump(mode="json"),
        },
        "provider": {"type": ctx.provider.type},
        "image": ctx.image.to_dict() if ctx.image else None,
        "inputs": [asdict(item) for item in ctx.inputs],
        "phases": [
            {
                "name": p.name,
                "status": p.status,
                "attempt": p.attempt,
                "seconds": p.seconds,
                "detail": p.detail,
            }
            for p in phases
        ],
        "artifacts": [asdict(a) for a in ctx.artifacts],
    }
    path = ctx.run_dir / "manifest.json"
    write_json_atomic(path, payload)
    return path


def read(run: Run) -> dict:
    """The run's manifest as last written ({} if it is missing or unreadable)."""
    try:
        payload = json.loads((Path(run.run_dir) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return payload if isinstance(payload, dict) else {}


def read_artifacts(run: Run) -> list[Artifact]:
    """The artifacts a finished run recorded (none if its manifest is missing)."""
    return [Artifact(**item) for item in read(run).get("artifacts", [])]
