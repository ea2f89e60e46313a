"""The controller must install and start without torch, and keep heavy SDKs out of start-up."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

CONTROLLER_MODULES = (
    "runner.cli",
    "runner.pipeline",
    "runner.spec",
    "runner.store",
    "runner.images",
    "runner.manifest",
    "infra.registry",
    "infra.local",
)


def loaded_after(code: str) -> set[str]:
    probe = f"import sys\n{code}\nprint(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True)
    return set(out.stdout.split())


def test_controller_never_imports_torch():
    loaded = loaded_after("\n".join(f"import {m}" for m in CONTROLLER_MODULES))
    assert "torch" not in loaded and "sentencepiece" not in loaded


def test_startup_does_not_import_cloud_or_engine_sdks():
    loaded = loaded_after("import runner.cli")
    assert not loaded & {"torch", "docker", "boto3", "paramiko", "pydantic", "yaml"}
