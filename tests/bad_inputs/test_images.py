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


def test_a_layer_corrupt_in_the_laptops_cache_is_refused_by_the_host_and_dropped(
    workspace, sshd_host, images
):
    """A bit flipped in a cached layer (same size, other bytes) arrives with the wrong digest:
    the host refuses it, the laptop drops its copy, and the next sync takes it from the engine."""
    from runner.layers import LayerCache, image_layers

    cache = LayerCache(workspace.home / "layers")
    layers = image_layers(images["first"], cache)
    top = cache.layer(layers.diff_ids[-1])
    data = bytearray(top.read_bytes())
    data[len(data) // 2] ^= 0xFF
    top.write_bytes(bytes(data))
    login = ["--host", f"root@127.0.0.1:{sshd_host.port}", "--key", str(sshd_host.root_key)]
    login += ["--data-dir", f"/root/corrupt-{workspace.home.parent.name}"[:60]]

    failed = workspace.runner("image", "sync", images["first"], *login, timeout=600)
    assert failed.returncode == 3, failed.stderr[-2000:]
    line = failed.stderr.strip().splitlines()[-1]  # after the transfer's progress lines: one error line
    assert line.startswith("error: ") and "Traceback" not in failed.stderr
    assert f"layer {layers.diff_ids[-1]} arrived on 127.0.0.1:{sshd_host.port} as sha256:" in line
    assert f"the laptop's cached copy {top} was corrupt and is removed, retry the sync" in line
    assert not top.exists()
    again = workspace.runner("image", "sync", images["first"], *login, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert top.exists() and top.stat().st_size == len(data)
