"""The phase machine's bookkeeping when a phase fails in ways nobody planned for.

The engine side is replaced by a small in-process host that fails on purpose: what is under
test is what the pipeline records, keeps and reports, not Docker.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infra.base import Capabilities
from runner import pipeline
from runner.console import Reporter
from runner.images import ImageInfo, ResolvedImage
from runner.store import open_store

pytestmark = pytest.mark.unit

SPEC = """\
name: demo
provider: {type: local}
image: {ref: 'sha256:%s'}
train: {gpus: 0, run: 'true'}
outputs: [/out]
""" % ("a" * 64)


class FailingHost:
    """Fails the first container it runs with the given exception."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.closed_with: dict | None = None

    def ensure_image(self, image_id: str, progress=None, registry=None, note=None) -> None:
        pass

    def put_job_file(self, name: str, content: bytes) -> None:
        pass

    def run(self, request, on_output) -> int:
        raise self.error

    def fetch_host_log(self, name: str, dest: Path) -> bool:
        return False

    def close(self, *, keep_workspace: bool) -> None:
        self.closed_with = {"keep_workspace": keep_workspace}


class InProcessProvider:
    type = "local"
    capabilities = Capabilities(instances=False, power_modes=False)

    def __init__(self, host: FailingHost) -> None:
        self.host = host

    def open_host(self, run_id: str, instance: object = None) -> FailingHost:
        return self.host


@pytest.fixture
def submit(tmp_path, monkeypatch):
    spec = tmp_path / "job.yaml"
    spec.write_text(SPEC, encoding="utf-8")
    image = ResolvedImage(image=ImageInfo(ref="sha256:" + "a" * 64, id="sha256:" + "a" * 64))
    monkeypatch.setattr(pipeline, "resolve_image", lambda loaded, log: image)
    monkeypatch.setattr(pipeline, "require_pinned_id", lambda loaded: None)

    def run_with(host: FailingHost):
        monkeypatch.setattr(pipeline, "provider_for", lambda settings, **options: InProcessProvider(host))
        return pipeline.submit(spec, tmp_path / "runs", Reporter(quiet=True))

    return run_with


def recorded(run_dir: Path):
    with open_store() as store:
        run = store.list_runs(1)[0]
        phases = {p.name: (p.status, p.detail) for p in store.phases(run.id)}
    manifest = json.loads((run_dir / run.id / "manifest.json").read_text(encoding="utf-8"))
    return run, phases, manifest


def test_unexpected_error_is_recorded_torn_down_and_re_raised(submit, tmp_path):
    host = FailingHost(OSError("disk vanished"))
    with pytest.raises(OSError, match="disk vanished"):
        submit(host)
    run, phases, manifest = recorded(tmp_path / "runs")
    assert (run.status, run.exit_code) == ("failed", 1)
    assert run.error == "internal error: OSError: disk vanished"
    assert phases["train"] == ("failed", "internal error: OSError: disk vanished")
    assert phases["teardown"][0] == "succeeded"
    assert host.closed_with == {"keep_workspace": True}
    assert manifest["status"] == "failed" and manifest["error"] == run.error


def test_interrupt_is_recorded_as_interrupted(submit, tmp_path):
    host = FailingHost(KeyboardInterrupt("SIGTERM"))
    result = submit(host)
    assert (result.run.status, result.exit_code) == ("interrupted", 130)
    run, phases, _ = recorded(tmp_path / "runs")
    assert run.error == "interrupted (SIGTERM)"
    assert phases["train"][0] == "interrupted" and phases["teardown"][0] == "succeeded"
    assert host.closed_with == {"keep_workspace": True}


def test_known_provider_failure_keeps_its_exit_code(submit, tmp_path):
    from runner.errors import ProviderFailure

    result = submit(FailingHost(ProviderFailure("Docker engine failed while following train: gone")))
    assert (result.run.status, result.exit_code) == ("failed", 3)
    assert [p.name for p in result.phases][-1] == "teardown"


def test_run_folder_is_never_reused(tmp_path):
    first = pipeline._make_run_dir(tmp_path, "job-1")
    (first / "artifacts" / "weights").write_text("precious")
    from runner.errors import BadInput

    with pytest.raises(BadInput, match="already exists; refusing to overwrite it"):
        pipeline._make_run_dir(tmp_path, "job-1")
    assert (first / "artifacts" / "weights").read_text() == "precious"
