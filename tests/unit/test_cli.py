"""The CLI through click's runner: exit codes, JSON on stdout, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from runner.cli import main

pytestmark = pytest.mark.unit
SMOKE = Path(__file__).parents[2] / "jobs" / "smoke.yaml"


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def test_validate_good_spec_json():
    result = invoke("validate", str(SMOKE), "--json")
    assert result.exit_code == 0
    payload = json.loads(result.stdout)
    assert payload["valid"] is True and payload["name"] == "smoke" and len(payload["spec_sha256"]) == 64


def test_validate_bad_spec_exits_2_with_one_line_per_problem(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text("name: BAD\nextra: 1\n", encoding="utf-8")
    result = invoke("validate", str(spec))
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0].startswith("error: ") and "invalid job spec" in lines[0]
    assert any("job.yaml:1: name: must be" in line for line in lines)
    assert any("job.yaml:2: extra: unknown field" in line for line in lines)


def test_validate_json_error_is_one_document(tmp_path):
    result = invoke("validate", str(tmp_path / "absent.yaml"), "--json")
    assert result.exit_code == 2
    payload = json.loads(result.stdout)
    assert payload["exit_code"] == 2 and "cannot read job spec" in payload["error"]


def test_submit_bad_spec_creates_no_run(tmp_path, runner_home):
    spec = tmp_path / "job.yaml"
    spec.write_text("name: x\n", encoding="utf-8")
    result = invoke("submit", str(spec), "--out", str(tmp_path / "runs"), "--json")
    assert result.exit_code == 2
    assert not (tmp_path / "runs").exists()
    assert json.loads(invoke("runs", "--json").stdout) == {"runs": []}


def test_status_of_unknown_run(runner_home):
    result = invoke("status", "no-such-run")
    assert result.exit_code == 2
    assert "no run matches 'no-such-run'" in result.stderr


def test_help_lists_the_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("submit", "validate", "runs", "status"):
        assert command in result.stdout


def test_every_command_has_help_with_an_example():
    import click

    def commands(group: click.Group, prefix: str = ""):
        for name, command in group.commands.items():
            if isinstance(command, click.Group):
                yield from commands(command, f"{prefix}{name} ")
            else:
                yield f"{prefix}{name}"

    for name in commands(main):
        shown = invoke(*name.split(), "--help")
        assert shown.exit_code == 0, name
        assert "Example: runner " in shown.stdout, f"`runner {name} --help` has no example"
