"""Low-rank adapters (Hu et al., 2021) for the LLaMA in `trainer.model`.

The adapted Linear layers are replaced explicitly and merged explicitly, once: nothing happens
behind `train()` or `eval()`, so frozen weights never drift through repeated merge round trips.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save_file

from trainer.model import LLaMA

# Which Linear layers each target name adapts, relative to a transformer block.
LAYER_TARGETS: dict[str, tuple[str, ...]] = {
    "q": ("attention.wq",),
    "k": ("attention.wk",),
    "v": ("attention.wv",),
    "o": ("attention.wo",),
    "mlp": ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3"),
}
TARGETS = (*LAYER_TARGETS, "head")


@dataclass(frozen=True)
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q", "v")

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        unknown = set(self.targets) - set(TARGETS)
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets must be a non-empty subset of {TARGETS}: {self.targets}")
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoRAConfig:
        return cls(**{**data, "targets": tuple(data["targets"])})


class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable low-rank update: y = base(x) + scale * B A dropout(x).

    The adapter lives in float32 even when the base is bf16, so small updates are not rounded away.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout)
        device = base.weight.device
        self.lora_a = nn.Parameter(torch.empty(r, base.in_features, device=device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, r, device=device))
        # A like a Linear layer's default init, B zero: the adapted model starts equal to the base.
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.dropout(x).to(self.lora_a.dtype) @ self.lora_a.T @ self.lora_b.T  # (..., out)
        return self.base(x) + (update * self.scale).to(x.dtype)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain Linear whose weight includes the update (summed in float32)."""
        weight = self.base.weight
        merged = nn.Linear(
            self.base.in_features,
            self.base.out_features,
            bias=self.base.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        delta = (self.lora_b @ self.lora_a) * self.scale  # (out, in)
        merged.weight.copy_((weight.float() + delta).to(weight.dtype))
        if self.base.bias is not None:
            merged.bias.copy_(self.base.bias)
        return merged.requires_grad_(False)


def target_module_names(model: LLaMA, targets: tuple[str, ...]) -> list[str]:
    names = [
        f"layers.{i}.{suffix}"
        for i in range(len(model.layers))
        for target in targets
        for suffix in LAYER_TARGETS.get(target, ())
    ]
    return [*names, "output"] if "head" in targets else names


def apply_lora(model: LLaMA, config: LoRAConfig) -> LLaMA:
    """Freeze every parameter, then replace each targeted Linear with a LoRALinear around it."""
    model.requires_grad_(False)
    for name in target_module_names(model, config.targets):
        base = model.get_submodule(name)
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{name} is {type(base).__name__}, not a plain Linear")
        _replace(model, name, LoRALinear(base, config.r, config.alpha, config.dropout))
    return model


def merge_lora(model: LLaMA) -> LLaMA:
    """Fold every adapter into its base weight, leaving plain Linear layers."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            _replace(model, name, module.merge())
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, keyed like `layers.0.attention.wq.lora_a`."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            out[f"{name}.lora_a"] = module.lora_a.detach()
            out[f"{name}.lora_b"] = module.lora_b.detach()
    return out


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors into a model that `apply_lora` prepared; the keys must match exactly."""
    own = lora_state_dict(model)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise KeyError(f"LoRA keys differ: missing {missing}, unexpected {unexpected}")
    for key, tensor in own.items():
        tensor.copy_(state[key])


ADAPTER_FILE = "lora.safetensors"


def save_adapters(model: nn.Module, config: LoRAConfig, out_dir: str | Path) -> Path:
    """Write the adapters to OUT/lora.safetensors, their LoRA config in the file's metadata.

    One metadata key only: safetensors orders keys arbitrarily, and the file must be
    byte-identical across identical runs."""
    path = Path(out_dir) / ADAPTER_FILE
    save_file(lora_state_dict(model), path, metadata={"lora_config": json.dumps(config.to_dict())})
    return path


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)
