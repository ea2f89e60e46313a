"""LoRA training speed, MFU and peak memory of this trainer on one GPU, for LLaMA-7B's shape.

bf16 weights with float32 adapters (--precision bf16-true), LoRA r 8 on q and v, micro-batch 4 of
512 random tokens, each step through the trainer's own `optimizer_step` (forward, loss,
backward, clipping, AdamW). Random weights: speed does not depend on their values.

Depth: --layers 32 measures the whole model. A smaller --layers L (default 4) measures L/2 and
L layers and fits a straight line, time and memory = fixed + per layer x layers, which it extends
to 32 layers: the layers are identical, and the fixed part (embedding, head, loss, optimizer)
is in both runs.

MFU: FLOPs per token = 6 x trainable + 4 x frozen parameters (a frozen weight needs no weight
gradient), leaving out the token embedding (a lookup), + attention 4 x n_layer x n_embd x T
(the score and value products of the forward pass over the full T x T square, as LitGPT counts
them; causal kernels skip half of that work, and the backward pass is not counted), against
the GPU's dense bf16 peak. Recomputation under activation checkpointing counts as no useful work.

    python bench/trainer_gpu.py [--layers 4] [--activation-checkpointing both] [--peak-tflops X]

(from the repository root, with the project installed or PYTHONPATH=.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

from trainer.batching import collate
from trainer.finetune import TrainConfig, build_optimizer, optimizer_step
from trainer.lora import LoRAConfig, apply_lora, count_trainable
from trainer.model import Config, LLaMA

FULL_DEPTH = 32
# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, by a piece of torch.cuda.get_device_name;
# the first match wins, so the PCIe H100 comes before the SXM one.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
    ("RTX 4090", 165.2),
)


def peak_tflops(name: str) -> float | None:
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def build(config: Config, device: torch.device, activation_checkpointing: bool) -> LLaMA:
    """The model as the trainer prepares it for bf16-true, built in bf16 directly on the GPU."""
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            model = LLaMA(config)
    finally:
        torch.set_default_dtype(torch.float32)
    model.init_rope()  # float32 tables, as in training
    apply_lora(model, LoRAConfig(r=8, alpha=16.0, dropout=0.05, targets=("q", "v")))
    model.activation_checkpointing = activation_checkpointing
    return model.train()


def measure(
    depth: int, args: argparse.Namespace, activation_checkpointing: bool, device: torch.device
) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build(Config.from_name("7B", n_layer=depth), device, activation_checkpointing)
    cfg = TrainConfig("-", "-", "-", micro_batch_size=args.micro_batch, precision="bf16-true")
    optimizer = build_optimizer(model, cfg, device)
    rows = torch.randint(3, model.config.vocab_size, (args.micro_batch, args.seq + 1))
    batch = collate([{"input_ids": row, "labels": row} for row in rows])
    weight = 1 / batch.targets.numel()

    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        optimizer_step(model, optimizer, [batch], weight, cfg, device, "bf16-true")
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        optimizer_step(model, optimizer, [batch], weight, cfg, device, "bf16-true")
    torch.cuda.synchronize(device)
    step_s = (time.perf_counter() - start) / args.steps
    result = {
        "layers": depth,
        "activation_checkpointing": activation_checkpointing,
        "step_s": step_s,
        "tokens_per_s": batch.tokens / step_s,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30,
        "trainable": count_trainable(model),
        "frozen_matmul": sum(p.numel() for p in model.parameters() if not p.requires_grad)
        - model.tok_embeddings.weight.numel(),
    }
    del model, optimizer
    torch.cuda.empty_cache()
    return result


def extend(small: dict[str, Any], large: dict[str, Any], depth: int) -> dict[str, float]:
    """Each figure as fixed + per-layer x depth, through the two measured depths."""
    out = {}
    for key in ("step_s", "peak_mem_gib", "trainable", "frozen_matmul"):
        per_layer = (large[key] - small[key]) / (large["layers"] - small["layers"])
        out[key] = large[key] + per_layer * (depth - large["layers"])
    return out


def report(figures: dict[str, Any], tokens: int, seq: int, peak: float | None) -> dict[str, Any]:
    config = Config.from_name("7B")
    attention = 4 * FULL_DEPTH * config.n_embd * seq
    flops_per_token = 6 * figures["trainable"] + 4 * figures["frozen_matmul"] + attention
    tokens_per_s = tokens / figures["step_s"]
    mfu = tokens_per_s * flops_per_token / (peak * 1e12) if peak else None
    return {
        "tokens_per_s": round(tokens_per_s, 1),
        "step_s": round(figures["step_s"], 4),
        "peak_mem_gib": round(figures["peak_mem_gib"], 2),
        "gflop_per_token": round(flops_per_token / 1e9, 2),
        "mfu": mfu and round(mfu, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help=f"layers to measure, 2 to {FULL_DEPTH}")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--activation-checkpointing", choices=("on", "off", "both"), default="both")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if not in the table")
    args = parser.parse_args()
    if not 2 <= args.layers <= FULL_DEPTH:
        parser.error(f"--layers must be 2 to {FULL_DEPTH}")
    if not torch.cuda.is_available():
        sys.exit("error: bench/trainer_gpu.py needs a CUDA GPU, and torch sees none on this machine")
    if torch.cuda.get_device_capability() < (8, 0):
        sys.exit(f"error: {torch.cuda.get_device_name()} has no native bf16")

    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or peak_tflops(name)
    depths = [args.layers] if args.layers == FULL_DEPTH else [args.layers // 2, args.layers]
    settings = {"on": [True], "off": [False], "both": [False, True]}[args.activation_checkpointing]
    common = {"device": name, "torch": torch.__version__, "seq": args.seq, "micro_batch": args.micro_batch}
    tokens = args.micro_batch * args.seq
    summary = []
    for checkpointing in settings:
        runs = [measure(depth, args, checkpointing, torch.device("cuda")) for depth in depths]
        for run in runs:
            print(json.dumps({**common, **run}))
        figures = runs[0] if len(runs) == 1 else extend(runs[0], runs[1], FULL_DEPTH)
        method = "measured" if len(runs) == 1 else f"line through {depths[0]} and {depths[1]} layers"
        full = {**common, "layers": FULL_DEPTH, "activation_checkpointing": checkpointing, "method": method}
        full |= report(figures, tokens, args.seq, peak)
        print(json.dumps({**full, "peak_tflops": peak}))
        mfu = f"MFU {full['mfu']:.1%}" if peak else "MFU unknown (pass --peak-tflops)"
        summary.append(
            f"checkpointing {'on' if checkpointing else 'off'}: {full['tokens_per_s']:.0f} tok/s, "
            f"{mfu}, peak {full['peak_mem_gib']:.1f} GiB"
        )
    print(
        f"summary: LLaMA-7B shape ({FULL_DEPTH} layers, {method}), LoRA r 8 q,v, bf16-true, "
        f"{args.micro_batch} x {args.seq} tokens on {name} (bf16 peak {peak or '?'} TFLOP/s): "
        + "; ".join(summary)
    )


if __name__ == "__main__":
    main()
