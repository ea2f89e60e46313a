"""Bad files given to the trainer's commands (data, checkpoints) and bad replies from a host
(an outputs listing): each is refused with exit code 2 (3 for what a host sent) and one line
naming the file and the problem; nothing half-made is left under the output's name, and no
code hidden in a pickle ever runs."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest

from infra.ssh import _checked_files
from runner.errors import ProviderFailure
from runner.remote import RemoteHost
from runner.store import Store
from tests.bad_inputs.conftest import one_line_error

pytestmark = [pytest.mark.unit]
PWNED = Path("/tmp/runner-bad-input-pickle-ran")


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory) -> Path:
    from trainer.data import validate_records
    from trainer.synthetic import generate
    from trainer.tokenizer import train

    records, _ = validate_records(generate(200, seed=3))
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
    path.write_bytes(train(records, vocab_size=600))
    return path


DATA_CASES = [
    ("not-json", b"{bad\n", "is neither a JSON array nor JSON lines"),
    ("wrong-fields", b'[{"question": "1+1?", "answer": "2"}]', "missing field 'instruction'"),
    ("empty", b"", "no usable records"),
    ("empty-array", b"[]", "no usable records"),
    ("binary", os.urandom(4096).replace(b"[", b"x"), "is not UTF-8 text"),
    ("not-objects", b"[1, 2, 3]", "not an object"),
]


@pytest.mark.parametrize(("case", "content", "expected"), DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_training_data_is_one_line(workspace, tokenizer_model, case, content, expected):
    data = workspace.folder / f"{case}.json"
    data.write_bytes(content)
    out = workspace.folder / "prepared"
    proc = workspace.python(
        "-m", "trainer.prepare", "--input", str(data), "--tokenizer", str(tokenizer_model),
        "--out", str(out), "--max-seq-length", "64", "--test-size", "2",
    )  # fmt: skip
    line = one_line_error(proc)
    assert line.startswith("error: ") and expected in line, line
    assert not out.exists()


def test_a_line_too_long_for_a_record_is_refused_unread(workspace, tokenizer_model):
    from trainer.data import MAX_LINE_BYTES

    data = workspace.folder / "long.jsonl"
    with data.open("wb") as f:
        f.write(b'{"instruction": "')
        f.write(b"x" * (MAX_LINE_BYTES + 10))
    proc = workspace.python(
        "-m", "trainer.prepare", "--input", str(data), "--tokenizer", str(tokenizer_model),
        "--out", str(workspace.folder / "prepared"), "--max-seq-length", "64", "--test-size", "2",
    )  # fmt: skip
    assert "line 1 is over 64 MB" in one_line_error(proc)


def test_missing_training_data_is_one_line(workspace, tokenizer_model):
    proc = workspace.python(
        "-m", "trainer.prepare", "--input", "absent.json", "--tokenizer", str(tokenizer_model),
        "--out", str(workspace.folder / "prepared"), "--max-seq-length", "64", "--test-size", "2",
    )  # fmt: skip
    assert "cannot read absent.json" in one_line_error(proc)


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {PWNED}",))


def _saved(state: dict) -> bytes:
    """What torch.save writes for state (a zip whose pickle would call os.system on load)."""
    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


META_PARAMS = '{"dim": 32, "n_layers": 1, "n_heads": 4, "norm_eps": 1e-6, "vocab_size": -1}'


def meta_folder(folder: Path, tokenizer: Path, weights: bytes, params: str = META_PARAMS) -> Path:
    folder.mkdir()
    shutil.copy(tokenizer, folder / "tokenizer.model")
    (folder / "params.json").write_text(params, encoding="utf-8")
    (folder / "consolidated.00.pth").write_bytes(weights)
    return folder


CHECKPOINT_CASES = [
    ("truncated", lambda: os.urandom(5000), "cannot read as a PyTorch checkpoint"),
    ("pickle-with-code", lambda: _saved({"tok_embeddings.weight": _RunsCode()}), "refused"),
]


@pytest.mark.parametrize(
    ("case", "weights", "expected"), CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES]
)
@pytest.mark.security
def test_bad_meta_checkpoints_are_refused(workspace, tokenizer_model, case, weights, expected):
    source = meta_folder(workspace.folder / case, tokenizer_model, weights())
    out = workspace.folder / "converted"
    proc = workspace.python(
        "-m", "trainer.convert", "--from", "meta", "--input", str(source), "--output", str(out)
    )
    line = one_line_error(proc)
    assert str(source / "consolidated.00.pth") in line and expected in line, line
    assert not PWNED.exists(), "the pickle's code ran"
    assert not out.exists()


def test_params_that_are_not_json_are_refused(workspace, tokenizer_model):
    source = meta_folder(workspace.folder / "params", tokenizer_model, b"", params="{dim: 32")
    proc = workspace.python(
        "-m",
        "trainer.convert",
        "--from",
        "meta",
        "--input",
        str(source),
        "--output",
        str(workspace.folder / "o"),
    )
    assert "params.json" in one_line_error(proc)


def test_a_truncated_safetensors_file_is_refused(workspace, tokenizer_model):
    source = workspace.folder / "hf"
    source.mkdir()
    shutil.copy(tokenizer_model, source / "tokenizer.model")
    config = {
        "model_type": "llama", "vocab_size": 600, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 4, "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6,
    }  # fmt: skip
    (source / "config.json").write_text(json.dumps(config), encoding="utf-8")
    (source / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    proc = workspace.python(
        "-m",
        "trainer.convert",
        "--from",
        "hf",
        "--input",
        str(source),
        "--output",
        str(workspace.folder / "o"),
    )
    line = one_line_error(proc)
    assert "model.safetensors" in line and "safetensors" in line, line


# -- what a host sends back ---------------------------------------------------------------


@pytest.mark.security
@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "a/../../b", "a//b", "./a", "", "a\nb", None])
def test_a_host_listing_outputs_outside_the_run_is_refused(path):
    entry = {"path": path, "bytes": 1, "sha256": "0" * 64}
    with pytest.raises(ProviderFailure, match="names a path outside the outputs") as caught:
        _checked_files({"files": [entry]})
    assert caught.value.exit_code == 3 and "\n" not in caught.value.message.replace(repr(path), "")


def test_a_host_listing_repeats_or_lacking_hashes_and_sizes_is_refused():
    entry = {"path": "a/b", "bytes": 1, "sha256": "0" * 64}
    assert _checked_files({"files": [entry]}) == [entry]
    with pytest.raises(ProviderFailure, match="names 'a/b' twice"):
        _checked_files({"files": [entry, dict(entry)]})
    with pytest.raises(ProviderFailure, match="no sha256"):
        _checked_files({"files": [{**entry, "sha256": "xyz"}]})
    with pytest.raises(ProviderFailure, match="no size in bytes"):
        _checked_files({"files": [{**entry, "bytes": -1}]})


@pytest.mark.security
@pytest.mark.parametrize(
    ("make", "expected"),
    [
        ("ln -s /etc/shadow {f}", "is a link; refusing to download what it points to"),
        (
            "ln -s /root/.ssh {d}/linked && touch {d}/real",
            "is a link; refusing to download what it points to",
        ),
        ("mkfifo {f}", "is not a regular file; refusing to download it"),
    ],
    ids=["link-to-a-file-out", "link-to-a-folder-out", "fifo"],
)
def test_a_host_serving_a_link_or_special_file_as_an_output_is_refused(sshd_host, tmp_path, make, expected):
    """A host whose listing names a file that is really a link (or a FIFO) out of the outputs:
    the download itself refuses it, so even a lying manifest cannot pull what a link points to."""
    folder = f"/root/lying-{tmp_path.name}"
    path = f"{folder}/linked" if "{d}" in make else f"{folder}/leak"
    sshd_host.exec("sh", "-c", f"rm -rf {folder} && mkdir -p {folder} && " + make.format(f=path, d=folder))
    local = tmp_path / "artifacts" / "leak"
    with (
        Store(tmp_path / "home") as store,
        RemoteHost(sshd_host.endpoint(), store) as remote,
        pytest.raises(ProviderFailure) as caught,
    ):
        remote.get(path, local)
    assert caught.value.exit_code == 3 and "\n" not in caught.value.message
    assert caught.value.message == f"{path} on {sshd_host.endpoint().address} {expected}"
    assert not local.exists() and not local.with_name("leak.part").exists()
