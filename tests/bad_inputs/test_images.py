"""Bad images: a spec pinning an image ID the engine does not have, submitted in the foreground
or detached, planned, or synced by hand. Each is refused before any run exists or any host is
contacted, with exit code 2 and one line naming the image; the earlier run is untouched."""

from __future__ import annotations

import pytest

from tests.bad_inputs.conftest import one_line_error
from tests.bad_inputs.test_job_specs import BASE, write

pytestmark = [pytest.mark.integration]

ABSENT = "sha256:" + "0" * 64
NOT_IN_ENGINE = f"error: image {ABSENT} is not in the local engine; build it or `docker load` it"


@pytest.mark.parametrize(
    "command",
    [("submit",), ("submit", "--detach"), ("image", "plan")],
    ids=["submit", "submit-detach", "image-plan"],
)
def test_a_spec_pinning_an_image_the_engine_lacks_is_refused_before_a_run_exists(workspace, command):
    spec = write(workspace.folder, "absent-image", {**BASE, "image": {"ref": ABSENT}})
    before = workspace.snapshot()
    extra = ("--out", str(workspace.runs)) if command[0] == "submit" else ()
    line = one_line_error(workspace.runner(*command, str(spec), *extra))
    assert line.startswith(NOT_IN_ENGINE), line
    assert workspace.snapshot() == before


def test_syncing_an_image_the_engine_lacks_is_refused_before_the_host_is_contacted(workspace):
    key = workspace.folder / "key"
    key.write_text("not used: the image is looked up first\n", encoding="utf-8")
    before = workspace.snapshot()
    proc = workspace.runner("image", "sync", ABSENT, "--host", "127.0.0.1:1", "--key", str(key))
    line = one_line_error(proc)
    assert ABSENT in line and "local" in line, line
    assert workspace.snapshot() == before
