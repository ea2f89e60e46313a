"""Job spec validation: every bad spec names the field and the YAML line."""

from __future__ import annotations

import textwrap

import pytest

from runner.errors import EXIT_BAD_INPUT, SpecError
from runner.spec import load_spec

pytestmark = pytest.mark.unit

GOOD = """\
version: 1
name: demo
provider:
  type: local
image:
  ref: sha256:{digest}
inputs:
  - src: data.json
    dest: in/data.json
setup:
  - name: prep
    run: echo prep
train:
  run: echo train
  gpus: 0
outputs:
  - /out/lora.safetensors
"""
DIGEST = "a" * 64


def write_spec(tmp_path, text: str):
    (tmp_path / "data.json").write_text("[]", encoding="utf-8")
    path = tmp_path / "job.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems(tmp_path, text: str) -> list[str]:
    with pytest.raises(SpecError) as caught:
        load_spec(write_spec(tmp_path, text))
    assert caught.value.exit_code == EXIT_BAD_INPUT
    return caught.value.details or [caught.value.message]


def test_good_spec_loads_with_defaults(tmp_path):
    loaded = load_spec(write_spec(tmp_path, GOOD.format(digest=DIGEST)))
    spec = loaded.spec
    assert spec.name == "demo"
    assert spec.inputs[0].target == "in/data.json"
    assert spec.train.metrics == "/out/metrics.jsonl"
    assert spec.pricing.currency == "CNY"
    assert spec.shutdown.after == "stop"
    assert len(loaded.sha256) == 64


def test_spec_is_immutable(tmp_path):
    spec = load_spec(write_spec(tmp_path, GOOD.format(digest=DIGEST))).spec
    with pytest.raises(Exception, match="frozen"):
        spec.name = "other"


def test_smoke_job_in_the_repository_is_valid():
    from pathlib import Path

    loaded = load_spec(Path(__file__).parents[2] / "jobs" / "smoke.yaml")
    assert loaded.spec.provider.type == "local"
    assert loaded.spec.train.gpus == 0


BAD = [
    # (replace this, with that, expected fragment of the problem line)
    ("name: demo", "name: Demo Job", ":2: name: must be 1-63 lowercase"),
    ("name: demo", "name: [1, 2]", ":2: name: Input should be a valid string"),
    ("version: 1", "version: 2", ":1: version: Input should be 1"),
    ("  type: local", "  type: gcp", ":4: provider.type: Input should be 'local'"),
    ("  ref: sha256:{digest}", "  ref: ubuntu:latest", ":6: image.ref: must be NAME@sha256:<digest>"),
    ("  ref: sha256:{digest}", "  rfe: sha256:{digest}", ":6: image.rfe: unknown field"),
    ("  - src: data.json", "  - src: missing.json", ":8: inputs.0.src: input file not found"),
    ("    dest: in/data.json", "    dest: ../escape.json", ":9: inputs.0.dest: must stay inside /data"),
    ("    dest: in/data.json", "    dest: /etc/passwd", ":9: inputs.0.dest: must be a relative path"),
    ("  - name: prep", "  - name: 'bad name'", ":11: setup.0.name: must be 1-63 lowercase"),
    ("    run: echo prep", "    run: ''", ":12: setup.0.run: String should have at least 1 character"),
    ("  run: echo train", "  command: echo train", ":14: train.command: unknown field"),
    ("  gpus: 0", "  gpus: many", ":15: train.gpus: Input should be a valid integer"),
    ("  gpus: 0", "  gpus: 1000", ":15: train.gpus: Input should be less than or equal to 16"),
    ("  - /out/lora.safetensors", "  - /etc/lora.safetensors", ":17: outputs.0: must be a path under /out"),
    (
        "  - /out/lora.safetensors",
        "  - /out/../etc/x",
        ":17: outputs.0: must be a path under /out without '..'",
    ),
    ("outputs:\n  - /out/lora.safetensors", "outputs: []", ":16: outputs: Tuple should have at least 1 item"),
    ("version: 1", "version: 1\ncolour: blue", ":2: colour: unknown field"),
]


@pytest.mark.parametrize(("old", "new", "expected"), BAD, ids=[b[2].split(": ")[1] for b in BAD])
def test_bad_spec_names_field_and_line(tmp_path, old, new, expected):
    text = GOOD.replace(old, new).format(digest=DIGEST)
    lines = problems(tmp_path, text)
    assert any(expected in line for line in lines), lines
    assert all(line.startswith(str(tmp_path / "job.yaml") + ":") for line in lines)


def test_missing_required_sections_are_listed_together(tmp_path):
    lines = problems(tmp_path, "name: demo\n")
    fields = {line.split(": ")[1] for line in lines}
    assert {"provider", "image", "train", "outputs"} <= fields
    assert all("required field is missing" in line for line in lines)


def test_image_needs_exactly_one_source(tmp_path):
    text = GOOD.replace("  ref: sha256:{digest}", "  {{}}").format(digest=DIGEST)
    text = text.replace("image:\n  {}", "image: {}")
    assert any("image: give exactly one of 'build' or 'ref'" in line for line in problems(tmp_path, text))


def test_build_context_and_dockerfile_must_exist(tmp_path):
    text = GOOD.replace("  ref: sha256:{digest}", "  build:\n    context: nowhere").format(digest=DIGEST)
    assert any("image.build.context: build context folder not found" in p for p in problems(tmp_path, text))
    text = GOOD.replace("  ref: sha256:{digest}", "  build:\n    dockerfile: Missingfile").format(
        digest=DIGEST
    )
    assert any("image.build: dockerfile not found" in p for p in problems(tmp_path, text))


def test_duplicate_step_names_are_refused(tmp_path):
    text = GOOD.replace("    run: echo prep", "    run: echo a\n  - name: prep\n    run: echo b")
    assert any(
        "setup: step names must be unique; repeated: prep" in p
        for p in problems(tmp_path, text.format(digest=DIGEST))
    )


def test_env_names_are_checked(tmp_path):
    text = GOOD.replace("  gpus: 0", "  gpus: 0\n  env:\n    'A B': x").format(digest=DIGEST)
    assert any("train.env.A B" in p and "environment variable name" in p for p in problems(tmp_path, text))


def test_input_sha256_format(tmp_path):
    text = GOOD.replace("    dest: in/data.json", "    dest: in/data.json\n    sha256: xyz").format(
        digest=DIGEST
    )
    assert any(":10: inputs.0.sha256: must be a sha256" in p for p in problems(tmp_path, text))


def test_hourly_price_over_budget_is_refused(tmp_path):
    extra = "pricing:\n  gpu_per_hour: 2.15\nbudget:\n  max_hourly_price: 1.0\n"
    lines = problems(tmp_path, GOOD.format(digest=DIGEST) + extra)
    assert any("max_hourly_price 1.0 CNY/h is below pricing.gpu_per_hour 2.15" in p for p in lines)


def test_negative_money_is_refused(tmp_path):
    lines = problems(tmp_path, GOOD.format(digest=DIGEST) + "budget:\n  max_hourly_price: -5\n")
    assert any(":19: budget.max_hourly_price: Input should be greater than or equal to 0" in p for p in lines)


def test_duplicate_yaml_keys_are_refused(tmp_path):
    lines = problems(tmp_path, GOOD.format(digest=DIGEST) + "name: again\n")
    assert lines == [f"{tmp_path / 'job.yaml'}:18: name: key given twice"]


def test_malformed_yaml_gives_its_line(tmp_path):
    lines = problems(tmp_path, "name: demo\nsetup: [\n  - x\n")
    assert len(lines) == 1 and "invalid YAML" in lines[0] and "job.yaml:3" in lines[0]


def test_non_mapping_and_empty_files(tmp_path):
    assert "must be a mapping" in problems(tmp_path, "- a\n- b\n")[0]
    assert "job spec is empty" in problems(tmp_path, "# nothing\n")[0]


def test_shell_metacharacters_are_data_not_syntax(tmp_path):
    """A step's script is one argv element for `sh -c`; names can never carry shell syntax."""
    text = GOOD.replace("  - name: prep", "  - name: 'prep;rm -rf /'").format(digest=DIGEST)
    assert any("setup.0.name: must be 1-63 lowercase" in p for p in problems(tmp_path, text))


def test_yaml_aliases_are_refused(tmp_path):
    lines = problems(tmp_path, "name: &a [*a]\n")
    assert lines == [f"{tmp_path / 'job.yaml'}:1: invalid YAML: anchors and aliases are not allowed"]


@pytest.mark.parametrize("name", ["smoke-", "a..b", "a_-b", "-a"])
def test_names_docker_would_reject_are_refused(tmp_path, name):
    lines = problems(tmp_path, GOOD.replace("name: demo", f"name: '{name}'").format(digest=DIGEST))
    assert any(":2: name: must be 1-63 lowercase letters and digits" in line for line in lines)


@pytest.mark.parametrize(
    ("dests", "expected"),
    [
        (["."], "must name a file inside /data, not /data itself"),
        (["x", "./x"], "two inputs land on the same path: x"),
        (["a", "a/b"], "an input lands on a folder another input needs: a"),
    ],
)
def test_input_destinations_are_normalised_before_checks(tmp_path, dests, expected):
    (tmp_path / "other.json").write_text("{}")
    items = "".join(
        f"  - src: {'data' if i == 0 else 'other'}.json\n    dest: '{d}'\n" for i, d in enumerate(dests)
    )
    text = GOOD.replace("  - src: data.json\n    dest: in/data.json\n", items).format(digest=DIGEST)
    assert any(expected in line for line in problems(tmp_path, text))


def test_metrics_must_name_a_file(tmp_path):
    text = GOOD.replace("  gpus: 0", "  gpus: 0\n  metrics: /out").format(digest=DIGEST)
    assert any("train.metrics: must name a file under /out" in p for p in problems(tmp_path, text))


def test_caps_that_would_not_be_enforced_are_refused(tmp_path):
    """No watchdog runs next to a local trainer, so nothing could hold the caps."""
    lines = problems(tmp_path, GOOD.format(digest=DIGEST) + "budget:\n  max_cost: 5\n  max_gpu_hours: 2\n")
    assert sum("enforced by the watchdog on a remote host" in line for line in lines) == 1


RENTED = "name: demo\nprovider:\n{}\nimage: {{ref: 'sha256:{}'}}\ntrain: {{run: 'true'}}\noutputs: [/out]\n"


@pytest.mark.parametrize(
    ("provider", "expected"),
    [
        ("  type: aws\n  region: us-east-1\n  instance: i-0abc12345678", "give 'key_file'"),
        ("  type: aws\n  region: us-east-1\n  key_file: job.yaml", "to create an instance give 'ami'"),
        ("  type: autodl\n  token_env: T", "give exactly one of 'instance' (reuse) or 'create'"),
        ("  type: autodl\n  instance: pro-1\n  gpu_wait_s: 0", "provider.gpu_wait_s: Input should be"),
        ("  type: emulator\n  instance: 'a b'", "provider.instance: must be an instance ID"),
        ("  type: emulator\n  api_timeout_s: 0", "provider.api_timeout_s: Input should be greater than 0"),
    ],
)
def test_rented_provider_problems_name_the_field(tmp_path, provider, expected):
    found = problems(tmp_path, RENTED.format(provider, "a" * 64))
    assert any(expected in line for line in found), found


def test_autodl_console_refuses_release_at_the_end(tmp_path):
    text = RENTED.format("  type: autodl\n  instance: abc", "a" * 64) + "shutdown: {after: release}\n"
    assert any("release the instance in the console" in line for line in problems(tmp_path, text))
