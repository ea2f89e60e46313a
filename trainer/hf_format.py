"""The Hugging Face layout of a LLaMA checkpoint, and how it maps onto ours.

Our modules are named like Meta's checkpoints (`layers.N.attention.wq`); Hugging Face names
them `model.layers.N.self_attn.q_proj`. HF also rotates the two halves of each head instead
of interleaved pairs, so its q and k rows are permuted; `to_hf_rows` and `from_hf_rows` apply
that permutation and its exact inverse (to weights, or to a LoRA B matrix, whose rows are the
same output features).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from trainer.model import Config

# (ours, Hugging Face) per block; `{}` is the layer index.
_BLOCK_NAMES: tuple[tuple[str, str], ...] = (
    ("layers.{}.attention.wq", "model.layers.{}.self_attn.q_proj"),
    ("layers.{}.attention.wk", "model.layers.{}.self_attn.k_proj"),
    ("layers.{}.attention.wv", "model.layers.{}.self_attn.v_proj"),
    ("layers.{}.attention.wo", "model.layers.{}.self_attn.o_proj"),
    ("layers.{}.feed_forward.w1", "model.layers.{}.mlp.gate_proj"),
    ("layers.{}.feed_forward.w2", "model.layers.{}.mlp.down_proj"),
    ("layers.{}.feed_forward.w3", "model.layers.{}.mlp.up_proj"),
    ("layers.{}.attention_norm", "model.layers.{}.input_layernorm"),
    ("layers.{}.ffn_norm", "model.layers.{}.post_attention_layernorm"),
)
_TOP_NAMES: tuple[tuple[str, str], ...] = (
    ("tok_embeddings", "model.embed_tokens"),
    ("norm", "model.norm"),
    ("output", "lm_head"),
)
_LAYER = re.compile(r"\.(\d+)\.")


def to_hf_module(name: str) -> str:
    """Our module name (without `.weight`) as Hugging Face names it."""
    return _translate(name, source=0)


def from_hf_module(name: str) -> str:
    """A Hugging Face module name (without `.weight`) as we name it."""
    return _translate(name, source=1)


def _translate(name: str, source: int) -> str:
    target = 1 - source
    for pair in _TOP_NAMES:
        if name == pair[source]:
            return pair[target]
    match = _LAYER.search(name)
    if match:
        generic = name[: match.start()] + ".{}." + name[match.end() :]
        for pair in _BLOCK_NAMES:
            if generic == pair[source]:
                return pair[target].format(match.group(1))
    raise KeyError(f"no LLaMA module is named {name!r}")


def needs_row_permutation(our_module: str) -> bool:
    """True for q and k projections: their rows follow the RoPE pair layout."""
    return our_module.endswith(("attention.wq", "attention.wk"))


def to_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder rows from interleaved pairs (ours, Meta's) to rotate-half order (HF's)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def from_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The exact inverse of `to_hf_rows`."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def config_from_hf(hf: dict[str, Any]) -> Config:
    """Our Config from a Hugging Face `config.json` (LlamaConfig). Raises ValueError, naming the
    field, for a missing field or a feature this model does not implement."""
    model_type = hf.get("model_type", "llama")
    if model_type != "llama":
        raise ValueError(f"model_type {model_type!r} is not supported, only 'llama'")
    if hf.get("tie_word_embeddings", False):
        raise ValueError("tie_word_embeddings is true: tied input and output embeddings are not supported")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag, False):
            raise ValueError(f"{flag} is true: layers with biases are not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported, only 'silu'")
    # transformers 5 writes rope_parameters; older files have rope_theta and rope_scaling.
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ValueError(f"rope scaling {rope_type!r} is not supported, only plain RoPE")

    n_embd, n_head = _field(hf, "hidden_size"), _field(hf, "num_attention_heads")
    head_dim = hf.get("head_dim") or n_embd // n_head
    if head_dim * n_head != n_embd:
        raise ValueError(f"head_dim {head_dim} is not hidden_size {n_embd} / num_attention_heads {n_head}")
    return Config(
        vocab_size=_field(hf, "vocab_size"),
        n_layer=_field(hf, "num_hidden_layers"),
        n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head,
        n_embd=n_embd,
        intermediate_size=_field(hf, "intermediate_size"),
        norm_eps=float(_field(hf, "rms_norm_eps")),
        rope_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        max_seq_len=hf.get("max_position_embeddings", 2048),
    )


def config_to_hf(config: Config) -> dict[str, Any]:
    """A Hugging Face `config.json` for a LlamaForCausalLM of this shape."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_size,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_base},
        "max_position_embeddings": config.max_seq_len,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
    }


def _field(hf: dict[str, Any], key: str) -> Any:
    if key not in hf:
        raise ValueError(f"missing {key!r}")
    return hf[key]
