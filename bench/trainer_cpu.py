"""LoRA fine-tuning speed and memory on a CPU: this trainer against Hugging Face transformers'
LlamaForCausalLM wrapped by peft, on the same model shape, batches, step count and threads.

The shape is a small LLaMA (4 layers, 256 wide, 8 heads, LLaMA's 32,000-token vocabulary),
LoRA r 8 on q and v, float32, sequences of 256 random tokens with the loss on every position.
Ours runs the real training loop (`trainer.finetune.train`) on a checkpoint and data written
here; theirs is the usual loop: forward with labels, backward, clip, AdamW step. Each run is a
subprocess of its own, so each has its own peak RSS (read from wait4), and the first steps of
every run are left out of its tokens/s. Prints one JSON line per run and a one-line summary.

    .venv/bin/python bench/trainer_cpu.py [--threads N] [--steps 20] [--repeats 2]

Each side imports only its own libraries, lazily, so neither's RSS carries the other's modules.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
# LLaMA's MLP width rule, 2/3 of 4 * n_embd rounded up to a multiple of 256, gives 768 at 256 wide.
SHAPE = dict(vocab_size=32000, n_layer=4, n_head=8, n_kv_head=8, n_embd=256, intermediate_size=768)
SEQ = 256
LORA = dict(r=8, alpha=16.0, dropout=0.05)
LR = 3e-4


def write_inputs(root: Path, rows: int, seed: int) -> None:
    """A random base checkpoint and `rows` samples of SEQ + 1 random tokens (SEQ after the shift)."""
    from trainer.checkpoint import save_model
    from trainer.model import Config, LLaMA

    torch.manual_seed(seed)
    save_model(LLaMA(Config(**SHAPE, max_seq_len=2 * SEQ)), root / "checkpoint")
    data = root / "prepared"
    data.mkdir()
    ids = torch.randint(3, SHAPE["vocab_size"], (rows, SEQ + 1))
    torch.save([{"input_ids": row, "labels": row.clone()} for row in ids], data / "train.pt")
    torch.save(list(torch.load(data / "train.pt", weights_only=True)[:1]), data / "test.pt")
    (data / "prepare.json").write_text(json.dumps({"max_seq_length": SEQ + 1}))


def tokens_per_s(records: list[dict[str, Any]], warmup: int) -> float:
    timed = records[warmup:]
    return sum(r["tokens"] for r in timed) / sum(r["seconds"] for r in timed)


def run_ours(root: Path, steps: int, batch: int, warmup: int) -> dict[str, Any]:
    from trainer.finetune import TrainConfig, train

    out = root / f"ours-{os.getpid()}"
    cfg = TrainConfig(
        checkpoint_dir=str(root / "checkpoint"),
        data_dir=str(root / "prepared"),
        out_dir=str(out),
        lora_r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        lr=LR,
        micro_batch_size=batch,
        max_steps=steps,
        warmup_steps=1,
        eval_samples=0,
        save_interval=0,
        precision="fp32",
        device="cpu",
    )
    train(cfg, lambda _: None)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    records = [{"tokens": r["tokens"], "seconds": r["tokens"] / r["tokens_per_s"]} for r in lines]
    return {"impl": "ours", "tokens_per_s": tokens_per_s(records, warmup)}


def run_hf(root: Path, steps: int, batch: int, warmup: int) -> dict[str, Any]:
    import peft
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=SHAPE["vocab_size"],
        hidden_size=SHAPE["n_embd"],
        intermediate_size=SHAPE["intermediate_size"],
        num_hidden_layers=SHAPE["n_layer"],
        num_attention_heads=SHAPE["n_head"],
        num_key_value_heads=SHAPE["n_kv_head"],
        max_position_embeddings=2 * SEQ,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    lora = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=["q_proj", "v_proj"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    rows = torch.stack(
        [row["input_ids"] for row in torch.load(root / "prepared" / "train.pt", weights_only=True)]
    )
    records = []
    for step in range(steps):
        inputs = rows[step * batch : (step + 1) * batch, :-1]  # (B, SEQ), as ours sees them
        start = time.perf_counter()
        loss = model(input_ids=inputs, labels=inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        records.append({"tokens": inputs.numel(), "seconds": time.perf_counter() - start})
    return {
        "impl": "transformers+peft",
        "tokens_per_s": tokens_per_s(records, warmup),
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def measure(impl: str, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run one worker subprocess; its JSON line plus its own peak RSS."""
    argv = [sys.executable, __file__, "--worker", impl, "--root", str(root)]
    argv += ["--threads", str(args.threads), "--steps", str(args.steps), "--batch", str(args.batch)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    output = proc.stdout.read()
    proc.stdout.close()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"error: the {impl} run failed")
    result = json.loads(output.splitlines()[-1])
    rss_bytes = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {**result, "peak_rss_gib": round(rss_bytes / 2**30, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, both")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of tokens/s")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each; the best counts")
    parser.add_argument("--worker", choices=("ours", "hf"), help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")

    if args.worker:
        torch.set_num_threads(args.threads)
        worker = run_ours if args.worker == "ours" else run_hf
        result = worker(args.root, args.steps, args.batch, args.warmup)
        print(json.dumps(result))
        return

    common = {"threads": args.threads, "steps": args.steps, "batch": args.batch, "seq": SEQ, **SHAPE}
    best: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="trainer-bench-") as tmp:
        write_inputs(Path(tmp), args.steps * args.batch, seed=0)
        for _ in range(args.repeats):
            for impl in ("ours", "hf"):  # alternating, so drift in machine load hits both alike
                result = {**measure(impl, Path(tmp), args), **common, "torch": torch.__version__}
                print(json.dumps({k: round(v, 1) if k == "tokens_per_s" else v for k, v in result.items()}))
                if result["tokens_per_s"] > best.get(impl, {}).get("tokens_per_s", 0):
                    best[impl] = result
    ours, hf = best["ours"], best["hf"]
    print(
        f"summary: ours {ours['tokens_per_s']:.0f} tok/s, transformers+peft {hf['tokens_per_s']:.0f} "
        f"tok/s: {ours['tokens_per_s'] / hf['tokens_per_s']:.2f}x (target 1.2x); peak RSS "
        f"{ours['peak_rss_gib']:.2f} vs {hf['peak_rss_gib']:.2f} GiB; {args.threads} threads, "
        f"best of {args.repeats}, fp32, batch {args.batch} x {SEQ} tokens, {args.steps} steps"
    )


if __name__ == "__main__":
    main()
