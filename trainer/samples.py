"""Answers to a few fixed prompts before and after fine-tuning, side by side in one JSON file.

The same checkpoint answers each prompt twice, greedily (so the comparison depends on the
weights alone): first as it is, then with the LoRA adapters applied. Each answer runs until EOS
or a full context unless --max-new-tokens caps it, and records why it stopped (`eos` or
`length`) and its token count. `runner compare RUN` shows the file as a table. The default
prompts are Chinese instructions of the kinds the bundled jobs train on; --prompts takes a JSON
list of strings instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trainer.checkpoint import TOKENIZER, load_model
from trainer.data import TEMPLATES
from trainer.devices import device_arg
from trainer.generate import Answer, answer_of, generate, prompt_text, resolve_template
from trainer.lora import load_adapters
from trainer.tokenizer import Tokenizer

DEFAULT_PROMPTS = (
    "浙江省的省会是哪里？",
    "用一句话介绍一下大熊猫。",
    "把“我喜欢读书”翻译成英文。",
    "写一首关于秋天的短诗。",
)


def answers(
    model, tokenizer: Tokenizer, prompts: list[str], template: str, max_new_tokens: int | None
) -> list[Answer]:
    """The model's greedy answer to each prompt, filled into the training template."""
    found = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt_text(prompt, template), bos=True)
        new = generate(
            model,
            ids,
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            top_k=None,
            top_p=1.0,
            eos_id=tokenizer.eos_id,
            generator=None,
        )
        found.append(answer_of(tokenizer, new))
    return found


def compare(
    checkpoint: Path, lora: Path, prompts: list[str], template: str, max_new_tokens: int | None, device
) -> dict:
    model, _ = load_model(checkpoint)
    model = model.to(device).eval()
    tokenizer = Tokenizer(checkpoint / TOKENIZER)
    before = answers(model, tokenizer, prompts, template, max_new_tokens)
    load_adapters(model, lora)
    after = answers(model.to(device).eval(), tokenizer, prompts, template, max_new_tokens)
    return {
        "checkpoint": str(checkpoint),
        "lora": str(lora),
        "template": template,
        "max_new_tokens": max_new_tokens,
        "samples": [
            {"prompt": prompt, **side("before", old), **side("after", new)}
            for prompt, old, new in zip(prompts, before, after, strict=True)
        ],
    }


def side(name: str, answer: Answer) -> dict:
    """One answer's fields in a sample: the text under `name`, then why it stopped and its length."""
    return {name: answer.text, f"{name}_stop_reason": answer.stop_reason, f"{name}_tokens": answer.tokens}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer.samples", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="the base checkpoint folder")
    parser.add_argument("--lora", required=True, type=Path, help="lora.safetensors (or its folder)")
    parser.add_argument("--out", required=True, type=Path, help="the JSON file to write")
    parser.add_argument("--prompts", type=Path, help="a JSON list of instructions (default: four built in)")
    parser.add_argument(
        "--template", choices=tuple(TEMPLATES), help="default: the one the adapters were trained with"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, help="cap per answer (default: none, until EOS or a full context)"
    )
    parser.add_argument("--device", type=device_arg, default="auto", help="auto, cpu, cuda or cuda:N")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        prompts = (
            json.loads(args.prompts.read_text(encoding="utf-8")) if args.prompts else list(DEFAULT_PROMPTS)
        )
        if not (isinstance(prompts, list) and prompts and all(isinstance(p, str) and p for p in prompts)):
            raise ValueError(f"{args.prompts} must hold a JSON list of non-empty strings")
        if args.max_new_tokens is not None and args.max_new_tokens < 1:
            raise ValueError("--max-new-tokens must be at least 1")
        template = resolve_template(args.template, args.lora)
        result = compare(args.checkpoint, args.lora, prompts, template, args.max_new_tokens, args.device)
    except (OSError, ValueError) as err:  # AdapterError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
