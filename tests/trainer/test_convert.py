"""Checkpoint conversion: Meta and Hugging Face layouts round-trip exactly, large checkpoints are
sharded, and every kind of bad input fails with one line naming the file and key, leaving nothing."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.trainer.conftest import tiny_config
from trainer import convert as convert_module
from trainer.checkpoint import INDEX, WEIGHTS, load_model, save_model
from trainer.convert import convert, main, meta_intermediate_size, parse_size
from trainer.hf_format import config_from_hf, config_to_hf, needs_row_permutation, to_hf_module, to_hf_rows
from trainer.model import Config, LLaMA

pytestmark = pytest.mark.unit

# Meta's model-parallel layers: column-parallel ones hold a slice of the output rows, row-parallel
# ones and the embedding a slice of the input columns; everything else is copied to every rank.
COLUMN_PARALLEL = (
    "attention.wq",
    "attention.wk",
    "attention.wv",
    "feed_forward.w1",
    "feed_forward.w3",
    "output",
)
ROW_PARALLEL = ("attention.wo", "feed_forward.w2", "tok_embeddings")


def tiny_model(vocab_size: int) -> LLaMA:
    config = tiny_config(vocab_size, norm_eps=1e-5, rope_base=500000.0, max_seq_len=64)
    torch.manual_seed(0)
    model = LLaMA(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)  # not all ones, so a norm taken from the wrong place shows
    return model


def meta_params(config: Config) -> dict:
    """params.json as Meta writes it; with this multiple_of and ffn_dim_multiplier, Meta's rule
    turns width 32 into the tiny model's intermediate size 64."""
    return {
        "dim": config.n_embd,
        "n_layers": config.n_layer,
        "n_heads": config.n_head,
        "n_kv_heads": config.n_kv_head,
        "vocab_size": -1,
        "multiple_of": 32,
        "ffn_dim_multiplier": 0.75,
        "norm_eps": config.norm_eps,
        "rope_theta": config.rope_base,
    }


def write_meta(state: dict[str, torch.Tensor], params: dict, folder: Path, n_shards: int) -> None:
    """A checkpoint as Meta's model-parallel code saves it: each rank's slice of every split
    weight, its own copy of the norms, and the rope.freqs buffer."""
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps(params))
    for rank in range(n_shards):
        shard = {"rope.freqs": torch.rand(params["dim"] // params["n_heads"] // 2)}
        for name, tensor in state.items():
            module = name.removesuffix(".weight")
            if module.endswith(COLUMN_PARALLEL):
                tensor = tensor.chunk(n_shards, dim=0)[rank]
            elif module.endswith(ROW_PARALLEL):
                tensor = tensor.chunk(n_shards, dim=1)[rank]
            shard[name] = tensor.clone()  # a view would save the whole tensor
        torch.save(shard, folder / f"consolidated.{rank:02d}.pth")


def hf_state(model: LLaMA) -> dict[str, torch.Tensor]:
    c = model.config
    state = {}
    for name, tensor in model.state_dict().items():
        module = name.removesuffix(".weight")
        if needs_row_permutation(module):
            tensor = to_hf_rows(tensor, c.n_head if module.endswith("wq") else c.n_kv_head)
        state[to_hf_module(module) + ".weight"] = tensor.contiguous()
    return state


def write_hf(model: LLaMA, folder: Path) -> None:
    folder.mkdir(parents=True)
    save_file(hf_state(model), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config_to_hf(model.config)))


@pytest.fixture()
def model(tokenizer) -> LLaMA:
    return tiny_model(tokenizer.vocab_size)


@pytest.fixture()
def meta_dir(model, tokenizer, tmp_path) -> Path:
    """llama/7B/{params.json, consolidated.0N.pth} with llama/tokenizer.model beside, as Meta ships it."""
    write_meta(model.state_dict(), meta_params(model.config), tmp_path / "llama" / "7B", n_shards=2)
    shutil.copyfile(tokenizer.path, tmp_path / "llama" / "tokenizer.model")
    return tmp_path / "llama" / "7B"


@pytest.fixture()
def hf_dir(model, tokenizer, tmp_path) -> Path:
    write_hf(model, tmp_path / "hf")
    shutil.copyfile(tokenizer.path, tmp_path / "hf" / "tokenizer.model")
    return tmp_path / "hf"


def assert_same_model(path: Path, model: LLaMA) -> None:
    loaded, config = load_model(path)
    assert config == model.config
    expected = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_meta_intermediate_size_matches_published_models():
    assert meta_intermediate_size(4096, 256, None) == 11008  # LLaMA 7B
    assert meta_intermediate_size(5120, 256, None) == 13824  # LLaMA 13B
    assert meta_intermediate_size(8192, 4096, 1.3) == 28672  # Llama 2 70B
    assert meta_intermediate_size(64, 32, 0.75) == 128


def test_meta_shards_join_back_into_the_model(meta_dir, model, tmp_path, capsys):
    argv = [
        "--from",
        "meta",
        "--input",
        str(meta_dir),
        "--output",
        str(tmp_path / "out"),
        "--max-seq-len",
        "64",
    ]
    assert main([*argv, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["config"]["vocab_size"] == model.config.vocab_size  # params.json says -1
    assert summary["files"] == [WEIGHTS]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", WEIGHTS, "tokenizer.model"]
    assert_same_model(tmp_path / "out", model)


def test_hf_checkpoint_converts_into_shards(hf_dir, model, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--from", "hf", "--input", str(hf_dir), "--output", str(out), "--shard-size", "40KB", "--json"]
    assert main(argv) == 0
    files = json.loads(capsys.readouterr().out)["files"]
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    weight_map = json.loads((out / INDEX).read_text())["weight_map"]
    assert list(weight_map) == list(model.state_dict())  # model order, shard after shard
    for name in files:
        held = [key for key, file in weight_map.items() if file == name]
        # under the limit (plus the header), unless one tensor alone is larger
        assert len(held) == 1 or (out / name).stat().st_size < 40_000 + 2_000, (name, held)
    assert not (out / WEIGHTS).exists()
    assert_same_model(out, model)


def test_dtype_is_converted_on_the_way(hf_dir, model, tmp_path):
    assert (
        main(["--from", "hf", "--input", str(hf_dir), "--output", str(tmp_path / "out"), "--dtype", "bf16"])
        == 0
    )
    stored = load_file(tmp_path / "out" / WEIGHTS)
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    original = model.state_dict()["layers.1.attention.wk.weight"]
    assert torch.equal(stored["layers.1.attention.wk.weight"], original.to(torch.bfloat16))


def test_save_model_shards_and_load_model_reads_either_layout(model, tmp_path):
    save_model(model, tmp_path, shard_bytes=50_000)
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / INDEX).exists() and not (tmp_path / WEIGHTS).exists()
    with safe_open(shards[0], framework="pt") as f:  # safetensors' own reader accepts our files
        assert list(f.keys()) == ["tok_embeddings.weight"]
    assert_same_model(tmp_path, model)
    save_model(model, tmp_path)  # over the sharded one: only a single file must remain
    assert sorted(p.name for p in tmp_path.glob("model*")) == [WEIGHTS]
    assert_same_model(tmp_path, model)


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("500mb") == 5 * 10**8 and parse_size("1024") == 1024
    with pytest.raises(Exception, match="not a size"):
        parse_size("lots")


def test_hf_config_mapping():
    config = tiny_model(600).config
    assert config_from_hf(config_to_hf(config)) == config
    older = {**config_to_hf(config), "rope_theta": 1e6, "rope_scaling": None}
    del older["rope_parameters"]
    assert config_from_hf(older).rope_base == 1e6
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        config_from_hf({**config_to_hf(config), "tie_word_embeddings": True})
    with pytest.raises(ValueError, match="rope scaling 'llama3'"):
        config_from_hf({**config_to_hf(config), "rope_parameters": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ValueError, match="rope scaling 'linear'"):
        config_from_hf({**older, "rope_scaling": {"type": "linear", "factor": 2.0}})
    with pytest.raises(ValueError, match="'rms_norm_eps'"):
        config_from_hf({k: v for k, v in config_to_hf(config).items() if k != "rms_norm_eps"})


class RunsCode:
    """Unpickling this would create `marker`: what a malicious checkpoint would do, harmlessly."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def drop_hf_key(folder: Path) -> None:
    state = load_file(folder / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, folder / "model.safetensors")


def reshape_hf_key(folder: Path) -> None:
    state = load_file(folder / "model.safetensors")
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 32)
    save_file(state, folder / "model.safetensors")


def add_hf_key(folder: Path) -> None:
    state = load_file(folder / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    save_file(state, folder / "model.safetensors")


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def edit_meta_shard(folder: Path, edit) -> None:
    path = folder / "consolidated.01.pth"
    shard = torch.load(path, weights_only=True)
    edit(shard)
    torch.save(shard, path)


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


BAD_META = {
    "no params.json": (lambda d: (d / "params.json").unlink(), "params.json: not found"),
    "bad params.json": (lambda d: (d / "params.json").write_text("{"), "params.json: bad JSON"),
    "params.json without dim": (
        lambda d: (d / "params.json").write_text(json.dumps({"n_layers": 2})),
        "params.json: missing 'dim'",
    ),
    "no tokenizer": (lambda d: (d.parent / "tokenizer.model").unlink(), "tokenizer.model: not found"),
    "missing key": (
        lambda d: edit_meta_shard(d, lambda s: s.pop("layers.1.feed_forward.w3.weight")),
        "consolidated.01.pth: missing key 'layers.1.feed_forward.w3.weight'",
    ),
    "unexpected key": (
        lambda d: edit_meta_shard(d, lambda s: s.update({"layers.2.ffn_norm.weight": torch.ones(32)})),
        "consolidated.01.pth: unexpected key 'layers.2.ffn_norm.weight'",
    ),
    "wrong shape": (
        lambda d: edit_meta_shard(
            d, lambda s: s.update({"layers.0.attention.wo.weight": torch.zeros(16, 32)})
        ),
        "consolidated.01.pth: layers.0.attention.wo.weight has shape (16, 32), expected (32, 16)",
    ),
    "norms disagree": (
        lambda d: edit_meta_shard(d, lambda s: s["layers.1.ffn_norm.weight"].mul_(2)),
        "consolidated.01.pth: layers.1.ffn_norm.weight differs from consolidated.00.pth",
    ),
    "truncated shard": (lambda d: truncate(d / "consolidated.01.pth"), "consolidated.01.pth: cannot read"),
    "wrong dim in params.json": (
        lambda d: edit_json(d / "params.json", dim=64),
        "consolidated.00.pth: tok_embeddings.weight has shape",
    ),
}

BAD_HF = {
    "no config.json": (lambda d: (d / "config.json").unlink(), "config.json: not found"),
    "tied embeddings": (
        lambda d: edit_json(d / "config.json", tie_word_embeddings=True),
        "config.json: tie_word_embeddings is true",
    ),
    "rope scaling": (
        lambda d: edit_json(d / "config.json", rope_parameters={"rope_type": "yarn", "factor": 4.0}),
        "config.json: rope scaling 'yarn' is not supported",
    ),
    "no weights": (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors, pytorch_model.bin"),
    "missing key": (drop_hf_key, "model.safetensors: missing key 'model.layers.1.mlp.up_proj.weight'"),
    "unexpected key": (
        add_hf_key,
        "model.safetensors: unexpected key 'model.layers.0.self_attn.q_proj.bias'",
    ),
    "wrong shape": (
        reshape_hf_key,
        "model.safetensors: model.layers.0.self_attn.k_proj.weight has shape (32, 32), expected (16, 32)",
    ),
    "truncated safetensors": (
        lambda d: truncate(d / "model.safetensors"),
        "model.safetensors: cannot read as safetensors",
    ),
    "tokenizer not SentencePiece": (
        lambda d: (d / "tokenizer.model").write_bytes(b"IQ== 0\n"),
        "tokenizer.model: not a SentencePiece model",
    ),
}


def run_bad(source: str, folder: Path, out: Path, capsys) -> str:
    assert main(["--from", source, "--input", str(folder), "--output", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert not out.exists() and not list(out.parent.glob(".out.*")), "left something behind"
    return captured.err


def assert_one_line_error(err: str, expected: str) -> None:
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err


@pytest.mark.parametrize("case", BAD_META)
def test_bad_meta_input_exits_2_naming_the_file(case, meta_dir, tmp_path, capsys):
    breaks, expected = BAD_META[case]
    breaks(meta_dir)
    assert_one_line_error(run_bad("meta", meta_dir, tmp_path / "out", capsys), expected)


@pytest.mark.parametrize("case", BAD_HF)
def test_bad_hf_input_exits_2_naming_the_file(case, hf_dir, tmp_path, capsys):
    breaks, expected = BAD_HF[case]
    breaks(hf_dir)
    assert_one_line_error(run_bad("hf", hf_dir, tmp_path / "out", capsys), expected)


@pytest.mark.parametrize("layout", ["meta", "hf"])
def test_pickle_with_code_is_refused_and_not_run(layout, meta_dir, hf_dir, model, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    if layout == "meta":
        folder, path = meta_dir, meta_dir / "consolidated.00.pth"
        torch.save({**model.state_dict(), "rope.freqs": RunsCode(marker)}, path)
    else:
        folder, path = hf_dir, hf_dir / "pytorch_model.bin"
        (hf_dir / "model.safetensors").unlink()
        torch.save({**hf_state(model), "lm_head.weight": RunsCode(marker)}, path)
    err = run_bad(layout, folder, tmp_path / "out", capsys)
    assert_one_line_error(err, f"{path}: refused: the pickle holds Python objects")
    assert "it would call io.open" in err
    assert not marker.exists()


def test_existing_output_is_left_alone(hf_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["--from", "hf", "--input", str(hf_dir), "--output", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_failure_while_writing_leaves_nothing(hf_dir, tmp_path, monkeypatch):
    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(convert_module, "save_config", disk_full)
    with pytest.raises(OSError, match="No space"):
        convert("hf", hf_dir, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
