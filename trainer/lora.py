"""Low-rank adapters (Hu et al., 2021) for the LLaMA in `trainer.model`.

The adapted Linear layers are replaced explicitly and merged explicitly, once: nothing happens
behind `train()` or `eval()`, so frozen weights never drift through repeated merge round trips.
Adapters are saved twice: in our own layout (lora.safetensors) and as a PEFT adapter folder for
the Hugging Face layout of the same base model, which PEFT and vLLM load as is.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from trainer.hf_format import needs_row_permutation, to_hf_module, to_hf_rows
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

ADAPTER_FILE = "lora.safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


class AdapterError(ValueError):
    """Adapters that cannot be read, or that do not fit the model they are loaded into."""


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


@dataclass(frozen=True)
class Provenance:
    """What the adapters were trained with besides their shape: the prompt template, which is
    the default wherever they are used, and the base model's name, which PEFT's
    `AutoPeftModelForCausalLM` loads them onto."""

    template: str | None = None
    base_model: str | None = None


class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable low-rank update: y = base(x) + scale * B A dropout(x).

    The adapter's weights live in float32 even when the base is bf16, so small updates are not
    rounded away; they are applied in the input's type, as the frozen product is, so no float32
    copy of the activations is made or kept for backward.
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
        a, b = self.lora_a.to(x.dtype), self.lora_b.to(x.dtype)
        update = self.dropout(x) @ a.T @ b.T  # (..., out)
        return self.base(x) + update * self.scale

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
    """Copy adapter tensors into a model that `apply_lora` prepared; keys and shapes must match."""
    own = lora_state_dict(model)
    check_fit({key: tuple(tensor.shape) for key, tensor in own.items()}, state)
    for key, tensor in own.items():
        tensor.copy_(state[key])


def check_fit(expected: dict[str, tuple[int, ...]], state: dict[str, torch.Tensor]) -> None:
    """Raise AdapterError naming the keys that are missing, unexpected or of the wrong shape."""
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [
        f"{key} {tuple(state[key].shape)} (model needs {shape})"
        for key, shape in expected.items()
        if key in state and tuple(state[key].shape) != shape
    ]
    listed = {"missing": missing, "unexpected": unexpected, "wrong shape": wrong}
    problems = [f"{what} {_first(keys)}" for what, keys in listed.items() if keys]
    if problems:
        raise AdapterError("LoRA adapters do not fit the model: " + "; ".join(problems))


def _first(items: list[str], limit: int = 4) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def expected_shapes(model: LLaMA, config: LoRAConfig) -> dict[str, tuple[int, ...]]:
    """The adapter tensors `apply_lora(model, config)` would create, and their shapes."""
    shapes = {}
    for name in target_module_names(model, config.targets):
        base = model.get_submodule(name)
        if not isinstance(base, nn.Linear):
            raise AdapterError(
                f"{name} is {type(base).__name__}, not a plain Linear (adapters applied twice?)"
            )
        shapes[f"{name}.lora_a"] = (config.r, base.in_features)
        shapes[f"{name}.lora_b"] = (base.out_features, config.r)
    return shapes


def read_adapters(path: str | Path) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """The LoRA config and tensors of a lora.safetensors written by `save_adapters`, or of the
    one in the folder `path`."""
    path = adapter_path(path)
    metadata = _metadata(path)
    try:
        state = load_file(path)
    except (OSError, SafetensorError) as err:
        raise AdapterError(f"cannot read adapters {path}: {err}") from err
    known = {f.name for f in fields(LoRAConfig)}
    try:
        config = LoRAConfig.from_dict({k: v for k, v in metadata.items() if k in known})
    except (ValueError, TypeError, KeyError) as err:
        raise AdapterError(f"{path} has an unusable lora_config: {err}") from err
    return config, state


def read_provenance(path: str | Path) -> Provenance:
    """What the adapters at `path` were trained with, from the file's header alone."""
    metadata = _metadata(adapter_path(path))
    return Provenance(metadata.get("template"), metadata.get("base_model"))


def adapter_path(path: str | Path) -> Path:
    """lora.safetensors itself, or the one in the folder `path`."""
    path = Path(path)
    return path / ADAPTER_FILE if path.is_dir() else path


def _metadata(path: Path) -> dict[str, Any]:
    try:
        with safe_open(path, framework="pt") as file:
            metadata = file.metadata() or {}
    except (OSError, SafetensorError) as err:
        raise AdapterError(f"cannot read adapters {path}: {err}") from err
    if "lora_config" not in metadata:
        raise AdapterError(f"{path} has no lora_config metadata; it was not written by save_adapters")
    try:
        found = json.loads(metadata["lora_config"])
    except json.JSONDecodeError as err:
        raise AdapterError(f"{path} has an unusable lora_config: {err}") from err
    if not isinstance(found, dict):
        raise AdapterError(f"{path} has an unusable lora_config: not a JSON object")
    return found


def load_adapters(model: LLaMA, path: str | Path) -> LoRAConfig:
    """Apply the LoRA of a lora.safetensors to `model` and load its tensors, unmerged.

    Everything is checked against the model before it is changed, so a file for another model
    leaves it as it was."""
    config, state = read_adapters(path)
    check_fit(expected_shapes(model, config), state)
    load_lora_state_dict(apply_lora(model, config), state)
    return config


def save_adapters(
    model: nn.Module, config: LoRAConfig, out_dir: str | Path, provenance: Provenance | None = None
) -> Path:
    """Write OUT/lora.safetensors (our layout; the LoRA config and the provenance in its
    metadata) and a PEFT adapter for the Hugging Face layout of the base model
    (OUT/adapter_model.safetensors and OUT/adapter_config.json); return the path of
    lora.safetensors.

    One metadata key only, holding one JSON object: safetensors orders keys arbitrarily, and the
    file must be byte-identical across identical runs. The template is not written into
    adapter_config.json: PEFT warns about any key it does not know, telling the user to upgrade."""
    out = Path(out_dir)
    provenance = provenance or Provenance()
    state = lora_state_dict(model)
    shape = model.config
    # Each file is written under a temporary name and renamed, so a run killed while saving
    # never leaves a truncated adapter that looks complete.
    with _replaced(out / ADAPTER_FILE) as tmp:
        recorded = {**config.to_dict(), **asdict(provenance)}
        save_file(state, tmp, metadata={"lora_config": json.dumps(recorded)})
    with _replaced(out / PEFT_WEIGHTS) as tmp:
        save_file(peft_state_dict(state, shape.n_head, shape.n_kv_head), tmp, {"format": "pt"})
    with _replaced(out / PEFT_CONFIG) as tmp:
        tmp.write_text(json.dumps(peft_config(config, provenance.base_model), indent=2) + "\n")
    return out / ADAPTER_FILE


@contextmanager
def _replaced(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` that replaces it once the block has written it."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def peft_state_dict(state: dict[str, torch.Tensor], n_head: int, n_kv_head: int) -> dict[str, torch.Tensor]:
    """Our adapter tensors, renamed and reordered for PEFT on the Hugging Face model.

    Hugging Face permutes the rows of q and k for its rotate-half RoPE; B's rows are the same
    output features, so B gets the same permutation. A acts on the inputs and is unchanged."""
    out = {}
    for key, tensor in state.items():
        module, _, matrix = key.rpartition(".")
        if matrix == "lora_b" and needs_row_permutation(module):
            tensor = to_hf_rows(tensor, n_head if module.endswith("wq") else n_kv_head)
        name = "lora_A" if matrix == "lora_a" else "lora_B"  # A (r, in), B (out, r) in both layouts
        out[f"base_model.model.{to_hf_module(module)}.{name}.weight"] = tensor.contiguous()
    return out


def peft_target_modules(targets: tuple[str, ...]) -> list[str]:
    """Hugging Face's short module names (q_proj, gate_proj, lm_head, ...) for our targets."""
    ours = [f"layers.0.{suffix}" for target in targets for suffix in LAYER_TARGETS.get(target, ())]
    ours += ["output"] if "head" in targets else []
    return sorted({to_hf_module(name).rpartition(".")[2] for name in ours})


def peft_config(config: LoRAConfig, base_model: str | None = None) -> dict[str, Any]:
    """adapter_config.json for PEFT's LoraConfig. PEFT scales by lora_alpha / r, as we do, as long
    as rsLoRA is off; adapters sit on every layer, so short module names select them all."""
    alpha = config.alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "revision": None,
        "inference_mode": True,
        "r": config.r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": config.dropout,
        "target_modules": peft_target_modules(config.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)
