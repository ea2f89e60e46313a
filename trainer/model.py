"""LLaMA in plain PyTorch.

Architecture after Meta's reference implementation (facebookresearch/llama) and lit-llama:
RMSNorm, rotary embeddings on interleaved pairs, SwiGLU MLP, grouped-query attention, KV cache.
Module names follow Meta's checkpoints (`layers.N.attention.wq`, `feed_forward.w1`, ...).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

PRESETS: dict[str, dict[str, Any]] = {
    "7B": dict(n_layer=32, n_head=32, n_kv_head=32, n_embd=4096, intermediate_size=11008),
    "13B": dict(n_layer=40, n_head=40, n_kv_head=40, n_embd=5120, intermediate_size=13824),
    # Trains in seconds on a CPU; vocab_size comes from the tokenizer. The width is what lets
    # LoRA on q and v move the loss of a random frozen model: through a frozen head of std 0.02
    # and a unit-RMS final norm, a logit can move by at most about 0.02 * n_embd.
    "tiny": dict(n_layer=2, n_head=8, n_kv_head=4, n_embd=512, intermediate_size=1376, max_seq_len=512),
}


@dataclass(frozen=True)
class Config:
    """A LLaMA's shape; a checkpoint's config.json holds exactly these fields."""

    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int = 32
    n_embd: int = 4096
    intermediate_size: int = 11008
    norm_eps: float = 1e-6
    rope_base: float = 10000.0
    max_seq_len: int = 2048

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} is not divisible by n_kv_head {self.n_kv_head}")
        if self.head_size % 2:
            raise ValueError(f"RoPE needs an even head size, got {self.head_size}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> Config:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
        return replace(cls(**PRESETS[name]), **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**data)


class LLaMA(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        # Given its weight, nn.Embedding skips its own init: reset_parameters below is the one
        # init, and it leaves a meta-device model alone (normal_ there costs seconds of imports).
        embedding = torch.empty(config.vocab_size, config.n_embd)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.n_embd, _weight=embedding)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.output = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.register_buffer("causal_mask", None, persistent=False)
        self.checkpointed_layers = 0  # the first N blocks recompute their activations in backward
        self.init_rope()
        self.reset_parameters()

    def init_rope(self) -> None:
        """Build the RoPE tables. They are derived, not stored, so a model built on the meta
        device needs this again after its weights are loaded."""
        device = self.tok_embeddings.weight.device
        device = torch.device("cpu") if device.type == "meta" else device
        cos, sin = build_rope_cache(self.config, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def reset_parameters(self) -> None:
        if self.tok_embeddings.weight.is_meta:
            return  # no values to set: the weights arrive later, by `load_state_dict(assign=True)`
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def setup_kv_cache(self, batch_size: int, max_seq_len: int | None = None) -> None:
        """Give every attention layer a cache so `forward(idx, input_pos)` can decode step by step."""
        c = self.config
        max_seq_len = max_seq_len or c.max_seq_len
        weight = self.tok_embeddings.weight
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(
                batch_size, c.n_kv_head, max_seq_len, c.head_size, weight.device, weight.dtype
            )
        mask = torch.ones(max_seq_len, max_seq_len, dtype=torch.bool, device=weight.device)
        self.register_buffer("causal_mask", torch.tril(mask), persistent=False)

    def clear_kv_cache(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None
        self.causal_mask = None

    def forward(
        self,
        idx: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for every position of `idx` (B, T).

        With `input_pos` (T,), the positions of these tokens, attention reads from and writes to
        the KV cache. Rows packed with several samples give `position_ids` (B, T), each token's
        position within its sample, and `document_ids` (B, T), which sample it belongs to:
        attention then stays within each sample, as if each were alone in its row."""
        seq_len = idx.size(1)
        if input_pos is None:
            max_len = self.config.max_seq_len
            if seq_len > max_len:
                raise ValueError(f"sequence length {seq_len} exceeds max_seq_len {max_len}")
            positions = slice(0, seq_len) if position_ids is None else position_ids
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # ([B,] T, hs/2)
            mask = None if document_ids is None else document_mask(document_ids)
        else:
            if self.causal_mask is None:
                raise RuntimeError("input_pos given but no KV cache; call setup_kv_cache first")
            cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
            mask = self.causal_mask[None, None, input_pos]  # (1, 1, T, S)

        x = self.tok_embeddings(idx)  # (B, T, C)
        for i, layer in enumerate(self.layers):
            if i < self.checkpointed_layers and self.training:
                # Recompute the block in backward instead of keeping its activations.
                x = checkpoint(layer, x, cos, sin, mask, input_pos, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, input_pos)
        return self.output(self.norm(x))  # (B, T, vocab_size)


def document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) True where a query may attend a key: an earlier or the same position of the
    same sample. Padding (-1) attends to padding only, so no row of the mask is empty."""
    T = document_ids.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()
    same = document_ids[:, :, None] == document_ids[:, None, :]  # (B, T, T)
    return (same & causal)[:, None]


class Block(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.feed_forward = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        input_pos: torch.Tensor | None,
    ) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, input_pos)
        return x + self.feed_forward(self.ffn_norm(x))


class Attention(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_size = config.head_size
        kv_dim = config.n_kv_head * config.head_size
        self.wq = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.wk = nn.Linear(config.n_embd, kv_dim, bias=False)
        self.wv = nn.Linear(config.n_embd, kv_dim, bias=False)
        self.wo = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        input_pos: torch.Tensor | None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_size)  # (B, T, nh, hs)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_size)  # (B, T, nkv, hs)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_size)  # (B, T, nkv, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh|nkv, T, hs)

        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, nkv, S, hs)
        # Grouped-query attention: each key/value head serves n_head // n_kv_head query heads.
        groups = self.n_head // self.n_kv_head
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)  # (B, nh, S, hs)
            v = v.repeat_interleave(groups, dim=1)  # (B, nh, S, hs)

        # Without a cache, is_causal lets PyTorch pick the flash kernel; an explicit mask would not.
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.wo(y)


class KVCache(nn.Module):
    def __init__(
        self,
        batch_size: int,
        n_kv_head: int,
        max_seq_len: int,
        head_size: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        shape = (batch_size, n_kv_head, max_seq_len, head_size)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(
        self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B = k.size(0)
        self.k[:B, :, input_pos] = k
        self.v[:B, :, input_pos] = v
        return self.k[:B], self.v[:B]  # (B, nkv, S, hs)


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.n_embd, bias=False)
        self.w3 = nn.Linear(config.n_embd, config.intermediate_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32: the mean of squares overflows or loses precision in half types.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def build_rope_cache(config: Config, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * theta_i, each (max_seq_len, head_size // 2)."""
    hs = config.head_size
    theta = 1.0 / (config.rope_base ** (torch.arange(0, hs, 2, device=device).float() / hs))
    positions = torch.arange(config.max_seq_len, device=device).float()
    angles = torch.outer(positions, theta)  # (max_seq_len, hs/2)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs (x[2i], x[2i+1]) of every head, as Meta's checkpoints expect
    (Hugging Face rotates halves instead and permutes q/k rows to compensate).

    The angles are computed in float32 (`build_rope_cache`); the rotation runs in x's type, as
    Hugging Face's does: a float32 copy of q and k would cost memory and bandwidth, and its
    result is rounded back to x's type anyway."""
    x1, x2 = x[..., 0::2], x[..., 1::2]  # (B, T, nh, hs/2)
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)  # ([B,] T, 1, hs/2)
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, T, nh, hs/2, 2)
    return rotated.flatten(-2)  # (B, T, nh, hs)
