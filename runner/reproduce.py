"""`runner reproduce RUN`: run a finished run again from its manifest, then say what matched.

The spec as the run was given it is written again into the state folder, its relative paths
made absolute, with everything that could drift pinned: the image by the ID the run used
(never rebuilt: a rebuild is a different image), every input by the sha256 the run hashed (plan
refuses a changed file, naming it), and optionally another provider. The trainer's seeds and
configuration are in the spec's commands and come along unchanged. At the end the artifacts are
compared byte for byte and the loss curves step by step.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from runner import manifest
from runner.errors import BadInput
from runner.files import json_lines, write_json_atomic
from runner.home import private_dir, runner_home
from runner.store import Run, Store, open_store

if TYPE_CHECKING:
    from runner.console import Reporter
    from runner.pipeline import RunResult

PROVIDERS_WITHOUT_SETTINGS = ("local", "emulator")


def reproduce(
    ref: str,
    out_root: Path,
    reporter: Reporter,
    *,
    provider: str | None = None,
    loss_tolerance: float = 0.0,
    accept_new_host_key: bool = False,
) -> tuple[RunResult, dict | None]:
    """Run a succeeded run again with its image and inputs pinned, and compare the two; the
    comparison is None when the new run did not succeed."""
    from runner.pipeline import submit

    with open_store() as store:
        original = store.get_run(ref)
        if original.status != "succeeded":
            raise BadInput(f"run {original.id} {original.status}; only a succeeded run can be reproduced")
        spec_path = reproduction_spec(original, manifest.read(original, store), provider)
    reporter.info(f"reproducing {original.id} from {spec_path}")
    result = submit(
        spec_path, out_root, reporter, accept_new_host_key=accept_new_host_key, reproduces=original.id
    )
    if result.run.status != "succeeded":
        return result, None
    with open_store() as store:
        return result, compare(store, original, result.run, loss_tolerance)


def reproduction_spec(run: Run, recorded: dict, provider: str | None) -> Path:
    """Write the spec that runs `run` again and return its path (in the state folder: the
    user's job folder gets no files it did not ask for)."""
    job = recorded.get("job") or {}
    if not job.get("spec_text") or not recorded.get("image"):
        raise BadInput(
            f"run {run.id} has no complete manifest (made by an older runner?); it cannot be reproduced"
        )
    original = Path(job["spec_path"])
    spec = yaml.safe_load(job["spec_text"])
    image = recorded["image"]["image"]
    _check_image_present(image["id"], run, recorded)
    spec["image"] = {"ref": image["id"]}
    recorded_inputs = {item["dest"]: item for item in recorded.get("inputs", [])}
    for item in spec.get("inputs") or []:
        was = recorded_inputs.get(item.get("dest"))
        if was is not None:  # the file the run hashed, by its absolute path, with that hash
            item["src"], item["sha256"] = was["src"], was["sha256"]
    spec["provider"] = _absolute_key(spec["provider"], original.parent)
    if provider is not None:
        spec["provider"] = _provider_settings(provider)
    header = f"# `runner reproduce {run.id}`: that run's spec with its image and inputs pinned.\n"
    text = header + yaml.safe_dump(spec, sort_keys=False, allow_unicode=True)
    # named after its content: the same reproduction finds its file again, another (a different
    # --provider) gets its own, and no file a run was made from is ever rewritten
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]
    path = private_dir(runner_home() / "specs") / f"{original.stem}.reproduce-{run.id}-{digest}.yaml"
    if not path.exists():
        path.write_text(text, encoding="utf-8")
    return path


def _absolute_key(provider: dict, folder: Path) -> dict:
    """The provider's key_file as an absolute path (it was relative to the spec's folder)."""
    key_file = provider.get("key_file") if isinstance(provider, dict) else None
    if key_file and not Path(key_file).is_absolute():
        return {**provider, "key_file": str((folder / key_file).resolve())}
    return provider


def _check_image_present(image_id: str, run: Run, recorded: dict) -> None:
    from docker.errors import ImageNotFound

    from runner.images import docker_client, engine_errors

    try:
        with engine_errors("looking up the run's image"):
            docker_client().api.inspect_image(image_id)
    except ImageNotFound:
        commit = ((recorded.get("source") or {}).get("job") or {}).get("commit")
        where = f" (its job folder was at commit {commit[:12]})" if commit else ""
        raise BadInput(
            f"run {run.id}'s image {image_id[:19]} is not in the local Docker engine{where}:"
            " `docker load` it from a saved copy, or rebuild at that commit and check the ID matches"
        ) from None


def _provider_settings(provider: str) -> dict:
    """--provider: a provider type that needs no settings, or a YAML file with the mapping."""
    if provider in PROVIDERS_WITHOUT_SETTINGS:
        return {"type": provider}
    path = Path(provider)
    try:
        settings = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise BadInput(
            f"--provider {provider}: neither {' nor '.join(PROVIDERS_WITHOUT_SETTINGS)} nor a readable"
            f" YAML file ({type(exc).__name__})"
        ) from None
    if not isinstance(settings, dict) or "type" not in settings:
        raise BadInput(f"--provider {provider}: the file must hold a provider mapping with a 'type'")
    return _absolute_key(settings, path.resolve().parent)


def compare(store: Store, original: Run, again: Run, tolerance: float) -> dict:
    """What the second run reproduced of the first: artifacts byte for byte (by path), and the
    loss curve (largest difference at a common step, against tolerance). Written to the second
    run's folder as reproduction.json."""
    first, second = manifest.read(original, store), manifest.read(again, store)
    before = {a["path"]: a["sha256"] for a in first.get("artifacts", [])}
    after = {a["path"]: a["sha256"] for a in second.get("artifacts", [])}
    report = {
        "reproduces": original.id,
        "run_id": again.id,
        "identical": sorted(p for p in before if after.get(p) == before[p]),
        "different": sorted(p for p in before if p in after and after[p] != before[p]),
        "missing": sorted(p for p in before if p not in after),
        "loss": _loss_curves(Path(original.run_dir), Path(again.run_dir), tolerance),
    }
    write_json_atomic(Path(again.run_dir) / "reproduction.json", report)
    return report


def _loss_curves(first_dir: Path, second_dir: Path, tolerance: float) -> dict:
    a, b = _losses(first_dir / "metrics.jsonl"), _losses(second_dir / "metrics.jsonl")
    common = sorted(a.keys() & b.keys())
    worst = max((abs(a[s] - b[s]) for s in common), default=None)
    return {
        "steps_compared": len(common),
        "steps_missing": len(a.keys() - b.keys()),
        "max_abs_diff": worst,
        "tolerance": tolerance,
        "within": worst is not None and worst <= tolerance and not a.keys() - b.keys(),
    }


def _losses(path: Path) -> dict[int, float]:
    losses: dict[int, float] = {}
    for entry in json_lines(path):
        step, loss = entry.get("step"), entry.get("loss")
        if isinstance(step, int) and isinstance(loss, (int, float)) and math.isfinite(loss):
            losses[step] = float(loss)
    return losses


def summary(report: dict) -> list[str]:
    """The comparison in lines for a person."""
    lines = [f"reproduction of {report['reproduces']}:"]
    for key, label in (("identical", "identical"), ("different", "DIFFERENT"), ("missing", "MISSING")):
        for path in report[key]:
            if key == "different" and Path(path).name == "metrics.jsonl":
                lines.append(f"  {'differs':<9} {path} (it records wall-clock times: see the loss curve)")
            else:
                lines.append(f"  {label:<9} {path}")
    loss = report["loss"]
    if loss["steps_compared"]:
        verdict = "within" if loss["within"] else "OUTSIDE"
        lines.append(
            f"  loss curve: {loss['steps_compared']} steps compared, largest difference"
            f" {loss['max_abs_diff']:.3g} ({verdict} tolerance {loss['tolerance']:g})"
        )
    else:
        lines.append("  loss curve: no common steps to compare")
    return lines
