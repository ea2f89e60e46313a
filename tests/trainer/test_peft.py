"""The PEFT adapter folder that save_adapters writes gives, on Hugging Face's LLaMA loaded through
PEFT, the same logits as our LLaMA with the same adapters."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainer.hf_format import from_hf_module, from_hf_rows, needs_row_permutation
from trainer.lora import (
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    TARGETS,
    LoRAConfig,
    LoRALinear,
    apply_lora,
    lora_state_dict,
    save_adapters,
)
from trainer.model import Config, LLaMA

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = [
    pytest.mark.unit,
    # raised inside transformers when PEFT wraps the model; nothing of ours
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

VOCAB = 97
LORA = LoRAConfig(r=4, alpha=8, dropout=0.0, targets=TARGETS)


def hf_llama() -> "transformers.LlamaForCausalLM":
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        initializer_range=0.05,
    )
    return transformers.LlamaForCausalLM(config).float().eval()


def ours_from_hf(hf: "transformers.LlamaForCausalLM") -> LLaMA:
    """Our LLaMA with the weights of `hf`: names mapped, q and k rows back to interleaved pairs."""
    c = hf.config
    config = Config(
        vocab_size=c.vocab_size,
        n_layer=c.num_hidden_layers,
        n_head=c.num_attention_heads,
        n_kv_head=c.num_key_value_heads,
        n_embd=c.hidden_size,
        intermediate_size=c.intermediate_size,
        norm_eps=c.rms_norm_eps,
        rope_base=c.rope_parameters["rope_theta"],
        max_seq_len=c.max_position_embeddings,
    )
    state = {}
    for key, tensor in hf.state_dict().items():
        module = from_hf_module(key.removesuffix(".weight"))
        if needs_row_permutation(module):
            tensor = from_hf_rows(tensor, config.n_head if module.endswith("wq") else config.n_kv_head)
        state[f"{module}.weight"] = tensor
    model = LLaMA(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def adapted(hf: "transformers.LlamaForCausalLM") -> LLaMA:
    """Ours with adapters on every target, A and B random so that every adapter matters."""
    model = apply_lora(ours_from_hf(hf), LORA).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_a.normal_(std=0.1, generator=generator)
                module.lora_b.normal_(std=0.1, generator=generator)
    return model


@torch.no_grad()
def hf_logits(model: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
    return model(input_ids=idx).logits


@pytest.fixture
def idx() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))


def test_the_base_models_agree(idx):
    hf = hf_llama()
    with torch.no_grad():
        diff = (ours_from_hf(hf)(idx) - hf_logits(hf, idx)).abs().max().item()
    assert diff <= 1e-5


def test_peft_loads_our_adapters_and_gives_our_logits(tmp_path, idx):
    hf = hf_llama()
    ours = adapted(hf)
    save_adapters(ours, LORA, tmp_path)
    with torch.no_grad():
        expected = ours(idx)
    base = hf_logits(hf, idx)
    assert (expected - base).abs().max().item() > 0.1  # the adapters change the outputs a lot

    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    diff = (hf_logits(peft_model, idx) - expected).abs().max().item()
    assert diff <= 1e-5


def test_q_and_k_rows_must_be_permuted(tmp_path, idx):
    """Control for the test above: B of q and k written in our row order gives other logits."""
    hf = hf_llama()
    ours = adapted(hf)
    save_adapters(ours, LORA, tmp_path)
    state = load_file(tmp_path / PEFT_WEIGHTS)
    for key, tensor in lora_state_dict(ours).items():
        if key.endswith(("wq.lora_b", "wk.lora_b")):
            layer = key.split(".")[1]
            proj = "q_proj" if "wq" in key else "k_proj"
            state[f"base_model.model.model.layers.{layer}.self_attn.{proj}.lora_B.weight"] = tensor
    save_file(state, tmp_path / PEFT_WEIGHTS)
    with torch.no_grad():
        expected = ours(idx)
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    assert (hf_logits(peft_model, idx) - expected).abs().max().item() > 1e-3


def test_adapter_folder_layout(tmp_path):
    ours = adapted(hf_llama())
    save_adapters(ours, LORA, tmp_path)
    config = json.loads((tmp_path / PEFT_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["bias"]) == (4, 8, "none")
    assert config["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    )
    assert config["inference_mode"] is True and config["fan_in_fan_out"] is False
    loaded = peft.LoraConfig.from_pretrained(tmp_path)
    assert loaded.r == 4 and set(loaded.target_modules) == set(config["target_modules"])

    state = load_file(tmp_path / PEFT_WEIGHTS)
    assert len(state) == 2 * (2 * 7 + 1)  # A and B for 7 Linear layers per block and the head
    assert state["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"].shape == (32, 4)
    assert state["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape == (4, 128)
    assert state["base_model.model.lm_head.lora_B.weight"].shape == (VOCAB, 4)
