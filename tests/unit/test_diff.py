"""`runner diff`: what differs between two manifests, section by section."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from runner.cli import main
from runner.diff import differences, flatten
from runner.store import Store
from tests.unit.test_store import make_run

pytestmark = pytest.mark.unit

BASE = {
    "run_id": "a",
    "created_at": 1.0,
    "runner": {"version": "0.1.0", "python": "3.11.7"},
    "source": {"runner": {"commit": "c" * 40, "dirty": False, "diff_sha256": None}, "job": None},
    "job": {"spec": {"name": "demo", "train": {"run": "train --lr 3e-3", "gpus": 1}}},
    "image": {"image": {"id": "sha256:1", "layers": ["sha256:l1", "sha256:l2"]}, "base": {"id": "sha256:b"}},
    "inputs": [{"src": "/x/data.json", "dest": "in/data.json", "sha256": "d1"}],
    "trainer": {"config": {"seed": 7, "lr": 0.003, "out_dir": "/out"}, "environment": {"torch": "2.5.1"}},
    "metrics": {"final": {"step": 60, "loss": 1.5}},
    "artifacts": [{"path": "artifacts/lora.safetensors", "sha256": "w1", "bytes": 10}],
}


def changed(**edits) -> dict:
    other = copy.deepcopy(BASE)
    for path, value in edits.items():
        *parents, leaf = path.split("__")
        target = other
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target[key]
        target[leaf] = value
    return other


def test_identical_runs_differ_in_nothing_but_what_names_and_times_them():
    other = changed(run_id="b", created_at=2.0, job__spec__name="renamed")
    other["inputs"][0]["src"] = "/elsewhere/data.json"  # the same bytes from another folder
    other["trainer"]["config"]["out_dir"] = "/out/elsewhere"
    other["image"]["base"] = None  # the same image ID, pinned instead of built: the same image
    assert differences(BASE, other) == []


def test_each_section_reports_its_own_change():
    other = changed(
        job__spec__train__run="train --lr 1e-3",
        trainer__config__lr=0.001,
        trainer__environment__torch="2.6.0",
        metrics__final__loss=1.25,
    )
    other["image"]["image"]["layers"][1] = "sha256:l3"
    other["image"]["image"]["id"] = "sha256:2"
    other["inputs"][0]["sha256"] = "d2"
    other["artifacts"][0]["sha256"] = "w2"
    found = {(d.section, d.key): (d.a, d.b) for d in differences(BASE, other)}
    assert found == {
        ("spec", "train.run"): ("train --lr 3e-3", "train --lr 1e-3"),
        ("image", "id"): ("sha256:1", "sha256:2"),
        ("image", "layers.001"): ("sha256:l2", "sha256:l3"),
        ("inputs", "in/data.json"): ("d1", "d2"),
        ("trainer", "lr"): (0.003, 0.001),
        ("versions", "environment.torch"): ("2.5.1", "2.6.0"),
        ("metrics", "loss"): (1.5, 1.25),
        ("artifacts", "artifacts/lora.safetensors"): ("w1", "w2"),
    }


def test_something_present_on_one_side_only_is_a_difference():
    other = copy.deepcopy(BASE)
    other["inputs"].append({"src": "/x/more.json", "dest": "in/more.json", "sha256": "m"})
    (found,) = differences(BASE, other)
    assert (found.section, found.key, found.a, found.b) == ("inputs", "in/more.json", None, "m")
    assert found.line() == "inputs    in/more.json: (none) -> 'm'"


def test_flatten_keys_nested_mappings_and_lists_of_mappings():
    assert flatten({"a": {"b": 1}, "c": [1, 2], "d": [{"e": 3}]}) == {"a.b": 1, "c": [1, 2], "d.0.e": 3}


def test_runner_diff_reads_manifests_from_the_store_when_the_folders_are_gone():
    with Store(Path(os.environ["RUNNER_HOME"])) as store:
        for run_id, manifest in (("run-a", BASE), ("run-b", changed(metrics__final__loss=1.0))):
            store.create_run(make_run(run_id))
            store.put_manifest(run_id, manifest)
    result = CliRunner().invoke(main, ["diff", "run-a", "run-b", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["same"] is False
    assert payload["differences"] == [{"section": "metrics", "key": "loss", "a": 1.5, "b": 1.0}]
    same = CliRunner().invoke(main, ["diff", "run-a", "run-a"])
    assert same.exit_code == 0 and same.stdout == "run-a and run-a: no differences\n"


def test_downloads_count_as_inputs_by_the_path_they_were_fetched_to():
    fetched = {"url": "https://example.org/w.bin", "path": "/data/w.bin", "sha256": "a1", "bytes": 3}
    first, second = changed(downloads=[fetched]), changed(downloads=[{**fetched, "sha256": "a2"}])
    (found,) = differences(first, second)
    assert (found.section, found.key, found.a, found.b) == ("inputs", "/data/w.bin", "a1", "a2")
