"""The Hugging Face layout of a LLaMA checkpoint, and how it maps onto ours.

Our modules are named like Meta's checkpoints (`layers.N.attention.wq`); Hugging Face names
them `model.layers.N.self_attn.q_proj`. HF also rotates the two halves of each head instead
of interleaved pairs, so its q and k rows are permuted; `to_hf_rows` and `from_hf_rows` apply
that permutation and its exact inverse (to weights, or to a LoRA B matrix, whose rows are the
same output features).
"""

from __future__ import annotations

import re

import torch

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
