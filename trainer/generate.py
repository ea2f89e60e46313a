"""Generate text from a checkpoint, with or without LoRA adapters, streamed as the tokens arrive.

The prompt goes through the same instruction template the model was fine-tuned with (the one
recorded in the adapters, unless --template names another), ending where the response starts,
unless --raw. Decoding uses the KV cache; each next token is drawn after temperature, top-k and
top-p (nucleus) filtering, or taken greedily at temperature 0, until EOS or, by default, until
the context is full: an answer ends where the model ends it, and says so (`stop_reason`).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from trainer.checkpoint import TOKENIZER, load_model
from trainer.data import TEMPLATES, Record, format_prompt
from trainer.devices import device_arg
from trainer.lora import load_adapters, read_provenance
from trainer.model import LLaMA
from trainer.report import report
from trainer.tokenizer import Tokenizer

DEFAULT_TEMPLATE = "alpaca"


class Answer(NamedTuple):
    text: str
    tokens: int  # new tokens, EOS included when the model produced it
    stop_reason: str  # "eos": the model ended it; "length": max_new_tokens or the context did


def answer_of(tokenizer: Tokenizer, new: list[int]) -> Answer:
    ended = bool(new) and new[-1] == tokenizer.eos_id
    return Answer(tokenizer.decode(new[:-1] if ended else new), len(new), "eos" if ended else "length")


def resolve_template(given: str | None, lora: Path | None, warn=None) -> str:
    """The template to fill prompts into: the one the adapters were trained with, unless
    `given` names one; a `given` that differs from the adapters' is used, with one warning line."""
    trained = read_provenance(lora).template if lora is not None else None
    if given is None:
        return trained or DEFAULT_TEMPLATE
    if trained is not None and given != trained:
        (warn or _warn)(f"warning: the adapters were trained with template {trained!r}, not {given!r}")
    return given


def _warn(line: str) -> None:
    print(line, file=sys.stderr)


def prompt_text(prompt: str, template: str | None, input_text: str = "") -> str:
    """The prompt as is (template None), or the template filled in: the text the model was
    fine-tuned on, up to where the response starts."""
    if template is None:
        return prompt
    return format_prompt(Record(instruction=prompt, input=input_text, output=""), template)


def next_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float,
    generator: torch.Generator | None,
) -> int:
    """One token id from the logits (vocab_size,) of the last position."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the more likely ones already hold top_p of the mass; the first stays.
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(
    model: LLaMA,
    prompt_ids: list[int],
    *,
    max_new_tokens: int | None,
    temperature: float,
    top_k: int | None,
    top_p: float,
    eos_id: int | None,
    generator: torch.Generator | None,
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """The tokens that follow `prompt_ids`, ending with `eos_id` if the model produced it.

    At most `max_new_tokens` (None: as many as the model's context, `config.max_seq_len`,
    leaves room for), and never past the context. The prompt is run once to fill the KV cache;
    then each step feeds only the newest token."""
    room = model.config.max_seq_len - len(prompt_ids)
    if not prompt_ids or room < 1:
        raise ValueError(
            f"the prompt has {len(prompt_ids)} tokens; it must have between 1 and "
            f"{model.config.max_seq_len - 1} to leave room for an answer"
        )
    steps = room if max_new_tokens is None else min(max_new_tokens, room)
    device = model.tok_embeddings.weight.device
    idx = torch.tensor([prompt_ids], device=device)  # (1, T)
    input_pos = torch.arange(len(prompt_ids), device=device)  # (T,)
    model.setup_kv_cache(batch_size=1, max_seq_len=len(prompt_ids) + steps)
    new: list[int] = []
    try:
        for _ in range(steps):
            logits = model(idx, input_pos)[0, -1]  # (vocab_size,)
            token = next_token(logits, temperature, top_k, top_p, generator)
            new.append(token)
            if on_token is not None:
                on_token(token)
            if token == eos_id:
                break
            idx = torch.tensor([[token]], device=device)  # (1, 1)
            input_pos = input_pos[-1:] + 1  # (1,)
    finally:
        model.clear_kv_cache()
    return new


class StreamDecoder:
    """Text from tokens as they arrive.

    A character outside the vocabulary comes as several byte tokens, and a partial one decodes to
    U+FFFD, so the text is held back while it ends in one. The whole sequence is decoded each
    time: SentencePiece drops the leading space of the first piece only, so the pieces decoded so
    far are always a prefix of what follows."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0  # characters already returned

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        return "" if text.endswith("\ufffd") else self._new(text)

    def flush(self) -> str:
        """Whatever is held back, incomplete bytes included."""
        return self._new(self.tokenizer.decode(self.ids))

    def _new(self, text: str) -> str:
        new, self.emitted = text[self.emitted :], len(text)
        return new


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="base or merged checkpoint folder")
    parser.add_argument("--lora", type=Path, help="lora.safetensors (or its folder) to apply unmerged")
    parser.add_argument("--prompt", required=True, help="the instruction, or the whole prompt with --raw")
    parser.add_argument("--input", default="", help="the record's input field, if any (templates only)")
    parser.add_argument("--raw", action="store_true", help="feed the prompt as is, after BOS")
    parser.add_argument(
        "--template",
        choices=tuple(TEMPLATES),
        help=f"default: the one the adapters were trained with, else {DEFAULT_TEMPLATE}",
    )
    parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default 0.8)")
    parser.add_argument("--top-k", type=int, default=200, help="keep the k likeliest; 0 is off (default 200)")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus mass kept; 1 is off (default 0.9)")
    parser.add_argument(
        "--max-new-tokens", type=int, help="stop after N tokens (default: when the context is full)"
    )
    parser.add_argument("--seed", type=int, default=1337, help="sampling seed (default 1337)")
    parser.add_argument(
        "--device", type=device_arg, default="auto", help="auto, cpu, cuda or cuda:N (default auto)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of streaming")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    too_few = args.max_new_tokens is not None and args.max_new_tokens < 1
    if args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1 or too_few:
        parser.error("need --temperature >= 0, --top-k >= 0, 0 < --top-p <= 1 and --max-new-tokens >= 1")
    if args.raw and args.input:
        parser.error("--input fills a template; with --raw put everything in --prompt")


def load(checkpoint: Path, lora: Path | None, device: torch.device) -> tuple[LLaMA, Tokenizer]:
    """The model on `device` in eval mode, with the adapters applied (not merged) when given."""
    if not (checkpoint / TOKENIZER).is_file():
        raise FileNotFoundError(f"{checkpoint / TOKENIZER} not found: is {checkpoint} a checkpoint folder?")
    model, _ = load_model(checkpoint)
    if lora is not None:
        load_adapters(model, lora)
    return model.to(device).eval(), Tokenizer(checkpoint / TOKENIZER)


def run(args: argparse.Namespace, model: LLaMA, tokenizer: Tokenizer) -> dict[str, Any]:
    """Generate for the parsed command line; stream the text to stdout unless --json."""
    template = None if args.raw else resolve_template(args.template, args.lora)
    text = prompt_text(args.prompt, template, args.input)
    ids = tokenizer.encode(text, bos=True)
    if len(ids) >= model.config.max_seq_len:
        raise ValueError(f"the prompt has {len(ids)} tokens, the model's context {model.config.max_seq_len}")
    decoder = StreamDecoder(tokenizer)

    def stream(token: int) -> None:
        if token != tokenizer.eos_id:
            sys.stdout.write(decoder.push(token))
            sys.stdout.flush()

    device = model.tok_embeddings.weight.device
    start = time.perf_counter()
    new = generate(
        model,
        ids,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k or None,
        top_p=args.top_p,
        eos_id=tokenizer.eos_id,
        generator=torch.Generator(device).manual_seed(args.seed),
        on_token=None if args.json else stream,
    )
    seconds = time.perf_counter() - start
    if not args.json:
        print(decoder.flush())
    answer = answer_of(tokenizer, new)
    return {
        "prompt": text,
        "template": template,
        "text": answer.text,
        "token_ids": new,
        "new_tokens": answer.tokens,
        "stop_reason": answer.stop_reason,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(len(new) / seconds, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        model, tokenizer = load(args.checkpoint, args.lora, args.device)
        result = run(args, model, tokenizer)
    except (FileNotFoundError, ValueError) as err:  # AdapterError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    return report(
        result,
        args.json,
        (
            f"{result['new_tokens']} tokens in {result['seconds']} s ({result['tokens_per_s']} tokens/s), "
            f"stopped at {result['stop_reason']}"
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
