"""Read and write the base-model checkpoint layout shared by every producer and consumer:

DIR/model.safetensors   weights, keyed like Meta's checkpoints
DIR/config.json         `trainer.model.Config`
DIR/tokenizer.model     SentencePiece model
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from trainer.model import Config, LLaMA

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.model"


def save_model(model: LLaMA, checkpoint_dir: str | Path) -> None:
    out = Path(checkpoint_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), out / WEIGHTS, metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")


def load_model(checkpoint_dir: str | Path) -> tuple[LLaMA, Config]:
    """The model on the CPU with its weights in their stored dtype; every key must match."""
    path = Path(checkpoint_dir)
    config = Config.from_dict(json.loads((path / CONFIG).read_text()))
    # Built on the meta device, the model costs no memory or init time until the weights arrive.
    with torch.device("meta"):
        model = LLaMA(config)
    model.load_state_dict(load_file(path / WEIGHTS, device="cpu"), strict=True, assign=True)
    model.init_rope()
    return model, config
