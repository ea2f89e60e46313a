"""Fold LoRA adapters into their base checkpoint, writing a new checkpoint in the same layout.

The merged model needs no LoRA code to run: any consumer of the base layout (this trainer,
`trainer.generate`, a converter to Hugging Face) reads it as it reads the base. The folder is
written under a temporary name beside OUT and renamed when complete, so OUT never holds half a
checkpoint.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from trainer.checkpoint import TOKENIZER, load_model, save_model
from trainer.lora import load_adapters, lora_state_dict, merge_lora
from trainer.report import report


def merge(checkpoint: Path, lora: Path, out: Path) -> dict[str, Any]:
    """Base + adapters -> OUT; the adapters are merged here, once, in float32 then cast back to the
    base's dtype."""
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new folder")
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint folder {checkpoint} not found")
    model, _ = load_model(checkpoint)
    config = load_adapters(model, lora)
    adapted = len(lora_state_dict(model)) // 2
    merge_lora(model)

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        partial.chmod(0o755)  # mkdtemp's 0700 would outlive the rename
        save_model(model, partial)
        if (checkpoint / TOKENIZER).is_file():
            shutil.copyfile(checkpoint / TOKENIZER, partial / TOKENIZER)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return {
        "out": str(out),
        "checkpoint": str(checkpoint),
        "lora": str(lora),
        "lora_config": config.to_dict(),
        "merged_modules": adapted,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.merge", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="base checkpoint folder")
    parser.add_argument("--lora", required=True, type=Path, help="lora.safetensors (or its folder)")
    parser.add_argument("--out", required=True, type=Path, help="merged checkpoint folder (must not exist)")
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    try:
        summary = merge(args.checkpoint, args.lora, args.out)
    except (FileNotFoundError, FileExistsError, ValueError) as err:  # AdapterError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary["seconds"] = round(time.perf_counter() - start, 3)
    return report(
        summary,
        args.json,
        f"merged {summary['merged_modules']} adapted layers into {args.out} in {summary['seconds']} s",
    )


if __name__ == "__main__":
    sys.exit(main())
