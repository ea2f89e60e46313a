"""Write a randomly initialised base checkpoint in the layout of `trainer.checkpoint`.

It stands in for a converted pretrained model wherever the weights do not matter: rehearsals,
smoke jobs and tests. The vocabulary size comes from the tokenizer, which is copied alongside.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from trainer.checkpoint import TOKENIZER, save_model
from trainer.model import PRESETS, Config, LLaMA
from trainer.report import report
from trainer.tokenizer import Tokenizer


def init_model(preset: str, tokenizer: Path, out: Path, seed: int) -> dict[str, Any]:
    config = Config.from_name(preset, vocab_size=Tokenizer(tokenizer).vocab_size)
    torch.manual_seed(seed)
    model = LLaMA(config)
    save_model(model, out)
    shutil.copyfile(tokenizer, out / TOKENIZER)
    return {
        "out": str(out),
        "config": config.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.init_model", description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=tuple(PRESETS), default="tiny", help="model preset")
    parser.add_argument("--tokenizer", required=True, type=Path, help="SentencePiece .model file")
    parser.add_argument("--out", required=True, type=Path, help="checkpoint folder to write")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    args = parser.parse_args(argv)

    summary = init_model(args.config, args.tokenizer, args.out, args.seed)
    return report(
        summary,
        args.json,
        f"wrote a random {args.config} model ({summary['parameters']:,} parameters) to {args.out}",
    )


if __name__ == "__main__":
    sys.exit(main())
