"""Parity with Hugging Face transformers: one random LlamaForCausalLM, written in every layout it is
published in and converted by the CLI, gives our model the same logits and the same greedy
continuation as transformers."""

import json
import math
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.trainer.test_convert import write_meta
from trainer.checkpoint import load_model
from trainer.generate import generate
from trainer.hf_format import from_hf_module, from_hf_rows, needs_row_permutation
from trainer.model import LLaMA

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
LAYOUTS = ("hf-safetensors", "hf-sharded-safetensors", "hf-sharded-bin", "meta")
N_HEAD, N_KV_HEAD = 4, 2


@pytest.fixture(scope="module")
def hf_model(tokenizer) -> "transformers.LlamaForCausalLM":
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=N_HEAD,
        num_key_value_heads=N_KV_HEAD,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,  # neither value is our default: the conversion must read them
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif "embed_tokens" in name:
                p.normal_(std=0.01)  # small activations, so that RMSNorm's eps shows in the logits
            elif "lm_head" in name:
                p.normal_(std=0.05)  # logits of a few units: large enough to mean something, and
            else:  # small enough that float32 rounding stays well under the tolerance
                p.normal_(std=0.15)
    return model


def save_sharded_bin(model: "transformers.LlamaForCausalLM", folder: Path, n_shards: int = 3) -> None:
    """pytorch_model-0000K-of-0000N.bin and pytorch_model.bin.index.json, as transformers 4
    wrote them (transformers 5 saves safetensors only)."""
    state = model.state_dict()
    keys = list(state)
    per_shard = math.ceil(len(keys) / n_shards)
    weight_map = {}
    for k in range(n_shards):
        name = f"pytorch_model-{k + 1:05d}-of-{n_shards:05d}.bin"
        torch.save(
            {key: state[key].clone() for key in keys[k * per_shard : (k + 1) * per_shard]}, folder / name
        )
        weight_map.update(dict.fromkeys(keys[k * per_shard : (k + 1) * per_shard], name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    model.config.save_pretrained(folder)


def meta_state(model: "transformers.LlamaForCausalLM") -> dict[str, torch.Tensor]:
    """The weights under Meta's names, q and k rows back in Meta's interleaved RoPE order."""
    state = {}
    for key, tensor in model.state_dict().items():
        module = from_hf_module(key.removesuffix(".weight"))
        if needs_row_permutation(module):
            tensor = from_hf_rows(tensor, N_HEAD if module.endswith("wq") else N_KV_HEAD)
        state[module + ".weight"] = tensor
    return state


@pytest.fixture(scope="module")
def converted(hf_model, tokenizer, tmp_path_factory) -> dict[str, Path]:
    """Each layout written from `hf_model`, then converted by `python -m trainer.convert`."""
    root = tmp_path_factory.mktemp("parity")
    inputs = {layout: root / "in" / layout for layout in LAYOUTS}
    hf_model.save_pretrained(inputs["hf-safetensors"])
    hf_model.save_pretrained(inputs["hf-sharded-safetensors"], max_shard_size="100KB")
    inputs["hf-sharded-bin"].mkdir()
    save_sharded_bin(hf_model, inputs["hf-sharded-bin"])
    for layout in LAYOUTS[:3]:
        shutil.copyfile(tokenizer.path, inputs[layout] / "tokenizer.model")
    params = {
        "dim": 64,
        "n_layers": 2,
        "n_heads": N_HEAD,
        "n_kv_heads": N_KV_HEAD,
        "vocab_size": -1,
        "multiple_of": 32,
        "ffn_dim_multiplier": 0.75,  # 64 -> 128, as Meta's code computes it
        "norm_eps": 1e-5,
        "rope_theta": 500000.0,
    }
    write_meta(meta_state(hf_model), params, inputs["meta"] / "model", n_shards=2)
    shutil.copyfile(tokenizer.path, inputs["meta"] / "tokenizer.model")  # beside the folder, as Meta ships it
    inputs["meta"] = inputs["meta"] / "model"
    assert len(list(inputs["hf-sharded-safetensors"].glob("model-*.safetensors"))) > 1

    outputs = {layout: root / "out" / layout for layout in LAYOUTS}
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "trainer.convert", "--from", layout.split("-")[0]]
            + ["--input", str(inputs[layout]), "--output", str(outputs[layout]), "--json"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for layout in LAYOUTS
    ]
    for layout, run in zip(LAYOUTS, runs, strict=True):
        stdout, stderr = run.communicate(timeout=120)
        assert run.returncode == 0, (layout, stderr)
        assert json.loads(stdout)["output"] == str(outputs[layout])
    return outputs


def token_ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_logits_match_transformers(layout, converted, hf_model):
    ours, config = load_model(converted[layout])
    assert (config.norm_eps, config.rope_base, config.intermediate_size) == (1e-5, 500000.0, 128)
    idx = token_ids(config.vocab_size)
    with torch.no_grad():
        expected = hf_model(idx).logits
        got = ours.eval()(idx)
    assert expected.abs().max() > 1  # large enough for the comparison to mean something
    assert (got - expected).abs().max() <= 1e-5


def test_comparison_catches_a_wrong_eps_or_rope_theta(converted, hf_model):
    ours, config = load_model(converted["hf-safetensors"])
    idx = token_ids(config.vocab_size)
    with torch.no_grad():
        expected = hf_model(idx).logits
        for wrong in (replace(config, norm_eps=1e-6), replace(config, rope_base=10000.0)):
            model = LLaMA(wrong).eval()
            model.load_state_dict(ours.state_dict())
            assert (model(idx) - expected).abs().max() > 1e-3, wrong


def test_greedy_generation_matches_transformers(converted, hf_model, tokenizer):
    ours, _ = load_model(converted["meta"])
    prompt = tokenizer.encode("Give three tips for staying healthy.")
    new = generate(
        ours.eval(),
        prompt,
        max_new_tokens=20,
        temperature=0.0,
        top_k=None,
        top_p=1.0,
        eos_id=None,
        generator=None,
    )
    settings = transformers.GenerationConfig(
        do_sample=False, max_new_tokens=20, eos_token_id=None, pad_token_id=0
    )
    with torch.no_grad():
        expected = hf_model.generate(torch.tensor([prompt]), generation_config=settings)[0, len(prompt) :]
    assert len(new) == 20
    assert new == expected.tolist()
