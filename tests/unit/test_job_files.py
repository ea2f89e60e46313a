"""Every example job in jobs/ is a valid spec, so a user's first `runner validate` passes."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.spec import load_spec

JOBS = sorted((Path(__file__).parents[2] / "jobs").glob("*.yaml"))


@pytest.mark.unit
@pytest.mark.parametrize("path", JOBS, ids=[p.stem for p in JOBS])
def test_example_job_is_valid(path):
    assert load_spec(path).spec.name == path.stem


@pytest.mark.unit
def test_the_7b_job_stages_without_the_gpu_and_trains_with_it():
    spec = load_spec(Path(__file__).parents[2] / "jobs" / "llama7b-lora-zh.yaml").spec
    assert (spec.provider.type, spec.provider.api, spec.train.gpus) == ("autodl", "console", 1)
    assert [step.name for step in spec.setup] == ["fetch-weights", "fetch-data", "convert", "prepare"]
