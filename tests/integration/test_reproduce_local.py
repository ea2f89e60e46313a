"""The run manifest and `runner reproduce` / `runner diff` on the local provider: the smoke job
run again from its manifest gives bitwise-identical LoRA weights on the CPU."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from runner.store import Store

from .conftest import quick_job, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

SHA256 = re.compile(r"sha256:[0-9a-f]{64}")


def test_the_manifest_records_what_a_reproduction_needs(smoke_run):
    run_dir = Path(smoke_run["payload"]["run_dir"])
    manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    assert {
        "manifest_version", "run_id", "reproduces", "status", "runner", "source", "job", "provider",
        "image", "inputs", "trainer", "metrics", "phases", "artifacts",
    } <= set(manifest)  # fmt: skip
    job = manifest["job"]
    assert job["spec_text"] == smoke_run["spec"].read_text(encoding="utf-8") and job["spec_version"] == 1
    assert job["spec"]["watchdog"]["stall_s"] == 1800  # as resolved: defaults filled in
    image = manifest["image"]
    assert SHA256.fullmatch(image["image"]["id"]) and SHA256.fullmatch(image["base"]["id"])
    assert image["image"]["layers"] and all(SHA256.fullmatch(layer) for layer in image["image"]["layers"])
    assert image["image"]["layers"][: len(image["base"]["layers"])] == image["base"]["layers"]
    assert manifest["trainer"]["config"]["seed"] == 7 and manifest["trainer"]["config"]["max_steps"] == 60
    assert (
        manifest["trainer"]["environment"]["torch"].startswith("2.")
        and manifest["trainer"]["environment"]["device"] == "cpu"
    )
    assert manifest["metrics"]["final"]["step"] == 60 and manifest["metrics"]["final"]["loss"] > 0
    assert manifest["runner"]["version"] and manifest["provider"]["type"] == "local"
    assert manifest["source"]["job"] is None  # the spec lies outside any git checkout
    commit = manifest["source"]["runner"]["commit"]  # runner runs from this repository's checkout
    assert re.fullmatch(r"[0-9a-f]{40}", commit)
    for phase in manifest["phases"]:
        if phase["status"] == "succeeded":
            assert phase["ended_at"] - phase["started_at"] == pytest.approx(phase["seconds"], abs=1e-3)
    with Store(smoke_run["home"]) as store:
        assert store.manifest(manifest["run_id"]) == manifest  # kept in the store too


def test_reproducing_the_smoke_run_gives_bitwise_identical_adapters(smoke_run, tmp_path):
    original = smoke_run["payload"]
    again = run_cli(
        smoke_run["home"], "reproduce", original["run_id"], "--json", "--out", str(tmp_path / "runs")
    )
    assert again.code == 0, again.stderr[-4000:]
    report = again.json["reproduction"]
    assert report["reproduces"] == original["run_id"] and not report["missing"]
    assert {
        "artifacts/lora.safetensors",
        "artifacts/adapter_model.safetensors",
        "artifacts/eval.json",
    } <= set(report["identical"])
    assert report["loss"]["steps_compared"] == 60 and report["loss"]["max_abs_diff"] == 0.0
    (spec,) = (smoke_run["home"] / "specs").glob(f"smoke.reproduce-{original['run_id']}-*.yaml")
    assert "sha256:" in spec.read_text()  # the image pinned by ID, not rebuilt
    assert not list(smoke_run["spec"].parent.glob("*.reproduce-*"))  # nothing added to the job's folder

    diff = run_cli(smoke_run["home"], "diff", original["run_id"], again.json["run_id"], "--json")
    assert diff.code == 0, diff.stderr
    changed = {(d["section"], d["key"]) for d in diff.json["differences"]}
    assert not {key for section, key in changed if section in ("trainer", "inputs", "image")}
    assert ("artifacts", "artifacts/lora.safetensors") not in changed
    assert {section for section, _ in changed} <= {"spec", "artifacts", "versions"}  # build -> pinned ref
    human = run_cli(smoke_run["home"], "diff", original["run_id"], again.json["run_id"])
    assert human.code == 0 and "spec      image.ref: (none) -> 'sha256:" in human.stdout


def test_reproduce_refuses_a_changed_input_and_an_image_that_is_gone(image_id, tmp_path):
    data = tmp_path / "data.json"
    data.write_text('{"x": 1}\n', encoding="utf-8")
    extra = "inputs:\n  - {src: data.json, dest: in/data.json}\n"
    fetched = {"url": "https://example.org/w.bin", "path": "/data/w.bin", "sha256": "ab" * 32, "bytes": 3}
    train = f"cp /data/in/data.json /out/copy; echo '{json.dumps(fetched)}' > /out/downloads.jsonl"
    spec = quick_job(tmp_path, image_id, train=train, outputs=["/out/copy"], extra=extra)
    home = tmp_path / "home"
    first = run_cli(home, "submit", str(spec), "--json", "--out", str(tmp_path / "runs"))
    assert first.code == 0, first.stderr[-4000:]
    run_id = first.json["run_id"]
    manifest = json.loads((Path(first.json["run_dir"]) / "manifest.json").read_text())
    assert manifest["downloads"] == [fetched]  # what trainer.fetch --record wrote on the host

    data.write_text('{"x": 2}\n', encoding="utf-8")
    refused = run_cli(home, "reproduce", run_id, "--json", "--out", str(tmp_path / "runs"))
    assert refused.code == 2 and refused.json["error"].startswith(f"input {data}: sha256 is ")
    data.write_text('{"x": 1}\n', encoding="utf-8")

    manifest_path = Path(first.json["run_dir"]) / "manifest.json"
    manifest["image"]["image"]["id"] = "sha256:" + "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    gone = run_cli(home, "reproduce", run_id, "--json", "--out", str(tmp_path / "runs"))
    assert gone.code == 2 and "is not in the local Docker engine" in gone.json["error"]

    missing = run_cli(home, "diff", run_id, "nope-no-such-run")
    assert missing.code == 2 and missing.stderr.startswith("error: ")
