"""Bad job specs given to `runner submit`: each is refused before any run exists, with exit code
2 and one line naming the field (and its YAML line where it has one); the earlier run's record
and artifact are untouched, and no shell ever saw a string from the spec."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

from tests.bad_inputs.conftest import one_line_error

pytestmark = [pytest.mark.unit]

PWNED = Path("/tmp/runner-bad-input-pwned")
BASE = {
    "version": 1,
    "name": "bad-input",
    "provider": {"type": "local"},
    "image": {"ref": "sha256:" + "0" * 64},
    "inputs": [{"src": "data.json"}],
    "setup": [{"name": "prep", "run": "echo prep"}],
    "train": {"run": "echo train", "gpus": 0},
    "outputs": ["/out/lora.safetensors"],
}
ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 8)}]\n" for p, n in zip("abcdefg", "bcdefgh", strict=True)
)


def changed(path: str, value: object) -> dict:
    """BASE with the value at a dotted path (list items by index) set, or removed for DELETE."""
    spec = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = spec
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    if value is DELETE:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return spec


DELETE = object()
SSH = {"type": "ssh", "host": "gpu.example.org", "key_file": "data.json"}
TEXT_CASES = [
    ("malformed-yaml", "version: 1\nname: a\n  bad: [\n", "invalid YAML"),
    ("tab-indented", "version: 1\nprovider:\n\ttype: local\n", "invalid YAML"),
    ("a-list", "- 1\n- 2\n", "must be a mapping of fields"),
    ("empty", "", "job spec is empty"),
    ("alias-bomb", ALIAS_BOMB, "anchors and aliases are not allowed"),
    ("key-twice", "version: 1\nname: a\nname: b\n", "name: key given twice"),
]
FIELD_CASES = [
    ("name-not-a-string", changed("name", 5), "name"),
    ("unknown-field", {**BASE, "extra": 1}, "extra"),
    ("unknown-nested-field", changed("train.gpu", 1), "train.gpu"),
    ("no-train", changed("train", DELETE), "train"),
    ("huge-gpu-count", changed("train.gpus", 10**12), "train.gpus"),
    ("negative-budget", changed("budget.max_cost", -1), "budget.max_cost"),
    ("missing-input", changed("inputs.0.src", "nope.json"), "input file not found"),
    ("input-hash-not-hex", changed("inputs.0.sha256", "xyz"), "sha256"),
    ("input-dest-escapes", changed("inputs.0.dest", "../x"), "inputs.0.dest"),
    ("input-dest-absolute", changed("inputs.0.dest", "/etc/x"), "inputs.0.dest"),
    ("output-outside-out", changed("outputs.0", "/etc/passwd"), "must be a path under /out"),
    ("output-dot-dot", changed("outputs.0", "/out/../etc/passwd"), "without '..'"),
    ("name-with-shell", changed("name", "x; rm -rf /"), "name"),
    ("name-with-newline", changed("name", "a\nb"), "name"),
    ("step-name-substitution", changed("setup.0.name", f"$(touch {PWNED})"), "setup.0.name"),
    ("env-name-with-shell", changed("setup.0.env", {"A;B": "1"}), "setup.0.env"),
    ("secret-name-with-shell", changed("train.secrets", ["X`id`"]), "train.secrets"),
    ("version-2", changed("version", 2), "version"),
    ("empty-train-command", changed("train.run", ""), "train.run"),
    ("no-build-context", changed("image", {"build": {"context": "nope"}}), "build context folder not found"),
    ("no-dockerfile", changed("image", {"build": {"dockerfile": "Nope"}}), "dockerfile not found"),
    ("build-and-ref", changed("image.build", {}), "exactly one of 'build' or 'ref'"),
    ("ref-by-tag", changed("image.ref", "python:3.11"), "image.ref"),
    ("tag-with-newline", changed("image", {"build": {"tag": "a\nb"}}), "image.build.tag"),
    ("unknown-provider", changed("provider", {"type": "gcp"}), "provider"),
    ("ssh-host-with-shell", changed("provider", {**SSH, "host": "h; ls"}), "provider.host"),
    ("ssh-port-too-big", changed("provider", {**SSH, "port": 70000}), "provider.port"),
    ("mirror-not-a-url", changed("image.registry", {"mirrors": ["ftp://x"]}), "image.registry.mirrors"),
    ("base-with-shell", changed("image.registry", {"base": "x; rm -rf /"}), "image.registry.base"),
    ("registry-user-alone", changed("image.registry", {"username_env": "U"}), "and password_env"),
    ("negative-stall", changed("watchdog", {"stall_s": -5}), "watchdog.stall_s"),
    ("currency-lowercase", changed("pricing", {"currency": "cny"}), "pricing.currency"),
    ("setup-not-a-list", changed("setup", "echo hi"), "setup"),
]  # fmt: skip


def write(folder: Path, name: str, content: str | bytes | dict) -> Path:
    (folder / "data.json").write_text("[]", encoding="utf-8")
    (folder / "Dockerfile").write_text("FROM scratch\n", encoding="utf-8")
    path = folder / f"{name}.yaml"
    if isinstance(content, dict):
        content = yaml.safe_dump(content, sort_keys=False)
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def refused(workspace, spec: Path, expected: str) -> str:
    before = workspace.snapshot()
    proc = workspace.runner("submit", str(spec), "--out", str(workspace.runs))
    line = one_line_error(proc)
    assert line.startswith("error: ") and expected in line, line
    assert workspace.snapshot() == before  # no run recorded, nothing written or overwritten
    assert not PWNED.exists()
    return line


# cases that are security checks too: strings that would mean something to a shell or a path
SECURITY = {
    "alias-bomb", "input-dest-escapes", "input-dest-absolute", "output-outside-out", "output-dot-dot",
    "name-with-shell", "name-with-newline", "step-name-substitution", "env-name-with-shell",
    "secret-name-with-shell", "tag-with-newline", "ssh-host-with-shell", "base-with-shell",
}  # fmt: skip


def cases(table: list[tuple]) -> list:
    return [
        pytest.param(*c, id=c[0], marks=[pytest.mark.security] if c[0] in SECURITY else []) for c in table
    ]


@pytest.mark.parametrize(("case", "text", "expected"), cases(TEXT_CASES))
def test_unreadable_specs_are_refused(workspace, case, text, expected):
    line = refused(workspace, write(workspace.folder, case, text), expected)
    assert f"{case}.yaml" in line  # the file is named


@pytest.mark.parametrize(("case", "spec", "expected"), cases(FIELD_CASES))
def test_invalid_fields_are_refused_naming_them(workspace, case, spec, expected):
    refused(workspace, write(workspace.folder, case, spec), expected)


def test_a_binary_file_is_refused(workspace):
    refused(workspace, write(workspace.folder, "binary", os.urandom(3000)), "not UTF-8 text")


def test_a_huge_spec_is_refused_unread(workspace):
    spec = write(workspace.folder, "huge", "version: 1\n" + "# padding\n" * 300_000)
    refused(workspace, spec, "over 1 MB")


def test_a_folder_or_a_missing_file_is_not_a_spec(workspace):
    (workspace.folder / "folder.yaml").mkdir()
    refused(workspace, workspace.folder / "folder.yaml", "folder.yaml")
    refused(workspace, workspace.folder / "absent.yaml", "absent.yaml")
