"""The 7B recipe's cost on paper: useful share of GPU FLOPs, peak memory and projected GPU hours
for each batching mode x activation-checkpointing mode, on the CPU, no GPU needed.

The seed job: LoRA (q, v; r 8) on LLaMA-7B, 3 epochs of 51,000 Chinese instruction records,
on an RTX 4090 at 2.15 CNY/h. Sample lengths come from bench/lengths.py (a stated model of
instinwild_ch.json with the LLaMA tokenizer) or, with --lengths-from, from the histogram
`trainer.prepare` wrote for real data. Each mode draws one epoch of micro-batches with the
trainer's own BatchSampler (the order, grouping and packing training uses).

Useful FLOPs: forward and backward of every real token (prompt and answer): per token
4 x frozen matmul parameters (forward, and backward through the frozen weights for the
activations' gradients only) + 6 x LoRA parameters, plus causal attention within its own
sample, 12 x n_layer x n_embd x (its position + 1): QK^T and AV, 4 x n_embd per key forward,
twice that backward.
Computed FLOPs add what is spent on nothing: padding positions, the attention a kernel computes
over a whole row (a causal row computes the lower triangle of T x T; a packed row, whose mask
is not causal-only, the whole square), and the forward pass again of each checkpointed block.

Peak memory: trainer.memory's plan, with what one 7B block and the head keep for backward
measured here on a real 7B-wide block in bf16 (per token; the CUDA kernels keep the same
tensors), and the weights, adapters and AdamW state counted. `auto` is the fewest checkpointed
blocks within --budget-gib, as `--activation-checkpointing auto` chooses on the GPU.

Hours: computed FLOPs / (peak x --utilization), the share of the card's dense bf16 peak that
the kernels reach on what they compute (stated: 0.45 by default, the target MFU of the GPU
bench; bench/gpu_check.sh measures it).

    python bench/trainer_recipe.py [--budget-gib 22] [--utilization 0.45] [--lengths-from prepare.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.lengths import SEED_RECORDS, instinwild_like_lengths, lengths_from_histogram
from trainer.batching import BatchSampler
from trainer.lora import LoRAConfig, apply_lora
from trainer.memory import MemoryPlan, gib, plan
from trainer.model import Config, LLaMA

EPOCHS = 3
RTX_4090_TFLOPS = 165.2
CNY_PER_HOUR = 2.15


@dataclass(frozen=True)
class Mode:
    name: str
    micro_batch_size: int  # rows
    packed: bool
    length_grouped: bool


def modes(max_seq_length: int) -> list[Mode]:
    """The seed's micro-batch of 4 samples, padded or grouped by length, and packed rows: as
    many as hold about as many tokens, and one (the least memory)."""
    packed_rows = max(1, 2048 // max_seq_length)
    found = [Mode("padded", 4, False, False), Mode("length-grouped", 4, False, True)]
    for n in sorted({packed_rows, 1}, reverse=True):
        found.append(Mode(f"packed {n}x{max_seq_length}", n, True, False))
    return found


def per_token_plan() -> tuple[MemoryPlan, Config, int, int]:
    """The memory plan of one adapted 7B block and the head at 1 x 128 tokens, in bf16, and the
    7B model's frozen matmul and LoRA parameter counts."""
    config = Config.from_name("7B")
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = LLaMA(Config.from_name("7B", n_layer=1))
    finally:
        torch.set_default_dtype(torch.float32)
    model.init_rope()
    apply_lora(model, LoRAConfig(r=8, alpha=16, dropout=0.05, targets=("q", "v"))).train()
    measured = plan(model, 1, 128, packed=False)
    C, hidden, V, L = config.n_embd, config.intermediate_size, config.vocab_size, config.n_layer
    frozen_matmul = L * (4 * C * C + 3 * C * hidden) + C * V  # the embedding is a lookup, not a matmul
    lora = L * 2 * 8 * (C + C)
    return measured, config, frozen_matmul, lora


def memory(measured: MemoryPlan, config: Config, rows: int, T: int, packed: bool) -> MemoryPlan:
    """The whole model's plan for micro-batches of `rows` x `T`, from the per-token measurement."""
    scale = rows * T / 128
    weights = (
        config.n_layer * (4 * config.n_embd**2 + 3 * config.n_embd * config.intermediate_size)
        + 2 * config.vocab_size * config.n_embd
    ) * 2  # bf16
    lora = config.n_layer * 2 * 8 * 2 * config.n_embd
    mask = rows * T * T if packed else 0  # one (B, 1, T, T) bool mask, shared by every block
    return MemoryPlan(
        static=weights + lora * 4 * 4,  # adapters, their gradients and AdamW's two moments, float32
        per_layer=round(measured.per_layer * scale),
        per_checkpointed_layer=rows * T * config.n_embd * 2,
        head=round(measured.head * scale) + mask,
        logits_grad=round(measured.logits_grad * scale),
        n_layer=config.n_layer,
    )


def epoch_flops(
    lengths: list[int],
    mode: Mode,
    max_seq_length: int,
    config: Config,
    frozen: int,
    lora: int,
    recompute: int,
) -> dict[str, float]:
    """Useful and computed FLOPs of one epoch as the sampler draws it, `recompute` blocks
    checkpointed."""
    sampler = BatchSampler(
        lengths,
        mode.micro_batch_size,
        seed=0,
        length_grouped=mode.length_grouped,
        pack_capacity=max_seq_length if mode.packed else None,
    )
    L, C = config.n_layer, config.n_embd
    per_position = 4 * frozen + 6 * lora  # matmuls, forward + backward
    block_forward = 2 * (frozen - C * config.vocab_size) / L  # one block's matmuls, forward
    useful = computed = 0.0
    positions = real = n_rows = drawn = 0
    while drawn < len(lengths):
        batch = sampler.next()
        drawn += sum(len(row) for row in batch)
        n_rows += len(batch)
        sizes = [[lengths[i] - 1 for i in row] for row in batch]
        T = max_seq_length if mode.packed else max(s for row in sizes for s in row)
        n_real = sum(map(sum, sizes))
        real += n_real
        positions += len(batch) * T
        # attention, summed over query positions: causal within each sample (useful), over the
        # row the kernel sees (computed)
        useful_attention = sum(s * (s + 1) / 2 for row in sizes for s in row)
        row_attention = T * T if mode.packed else T * (T + 1) / 2
        useful += n_real * per_position + 12 * L * C * useful_attention
        computed += len(batch) * (T * per_position + 12 * L * C * row_attention)
        computed += recompute * len(batch) * (T * block_forward + 4 * C * row_attention)
    return {
        "useful": useful,
        "computed": computed,
        "positions": positions,
        "real_tokens": real,
        "rows": n_rows,
    }


def truncation(full: list[int], limit: int) -> dict[str, float]:
    """What each --on-truncate policy does to the data at `limit`: the share of samples cut, and,
    under `drop`, the training tokens lost and how much shorter the remaining samples are (the
    longest answers are the ones dropped, so the model would learn to answer shorter)."""
    kept = [n for n in full if n <= limit]
    trained = sum(min(n, limit) for n in full)
    return {
        "max_seq_length": limit,
        "cut_share": round(1 - len(kept) / len(full), 4),
        "drop_tokens_lost": round(1 - sum(kept) / trained, 4),
        "mean_length": round(sum(full) / len(full), 1),
        "drop_mean_length": round(sum(kept) / len(kept), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-seq-length", type=int, default=1280)
    parser.add_argument("--budget-gib", type=float, default=22.0, help="memory for auto (default 22)")
    parser.add_argument("--utilization", type=float, default=0.45, help="share of the peak (default 0.45)")
    parser.add_argument("--peak-tflops", type=float, default=RTX_4090_TFLOPS, help="default: RTX 4090")
    parser.add_argument("--price", type=float, default=CNY_PER_HOUR, help="CNY per GPU hour")
    parser.add_argument("--lengths-from", type=Path, help="a prepare.json whose histogram to draw from")
    parser.add_argument("--records", type=int, default=SEED_RECORDS)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    L = args.max_seq_length
    if args.lengths_from:
        lengths, source = lengths_from_histogram(args.lengths_from, args.records, 0, L), args.lengths_from
    else:
        lengths, source = instinwild_like_lengths(args.records, 0, L), "bench/lengths.py (modelled)"
    full = (
        lengths_from_histogram(args.lengths_from, args.records, 0)
        if args.lengths_from
        else instinwild_like_lengths(args.records, 0)
    )
    for limit in sorted({512, L}):
        print(json.dumps({"truncation": truncation(full, limit)}))
    measured, config, frozen, lora = per_token_plan()
    print(
        f"{args.records} samples from {source}, max_seq_length {L}: mean "
        f"{sum(lengths) / len(lengths):.0f} tokens;"
        f" {EPOCHS} epochs; {args.peak_tflops} TFLOP/s at {args.utilization:.0%}, {args.price} CNY/h;"
        f" budget {args.budget_gib} GiB",
        file=sys.stderr,
    )
    budget = round(args.budget_gib * 2**30)
    rows = []
    for mode in modes(L):
        T = L if mode.packed else L - 1  # the longest micro-batch bounds the peak
        estimate = memory(measured, config, mode.micro_batch_size, T, mode.packed)
        try:
            auto = estimate.fewest_checkpointed(budget)
        except ValueError:
            auto = None
        for checkpointing, k in (("all", config.n_layer), ("off", 0), ("auto", auto)):
            if k is None:
                print(json.dumps({"mode": mode.name, "checkpointing": checkpointing, "fits": False}))
                continue
            flops = epoch_flops(lengths, mode, L, config, frozen, lora, k)
            hours = EPOCHS * flops["computed"] / (args.peak_tflops * 1e12 * args.utilization) / 3600
            row = {
                "mode": mode.name,
                "checkpointing": checkpointing,
                "checkpointed_layers": k,
                "useful_flops_share": round(flops["useful"] / flops["computed"], 4),
                "padding_share": round(1 - flops["real_tokens"] / flops["positions"], 4),
                "peak_gib": round(gib(estimate.peak(k)), 2),
                "fits_budget": estimate.peak(k) <= budget,
                "rows_per_epoch": flops["rows"],
                "gpu_hours": round(hours, 2),
                "cny": round(hours * args.price, 2),
            }
            rows.append(row)
            print(json.dumps(row))
    fitting = [r for r in rows if r["fits_budget"]]
    best = max(fitting, key=lambda r: (r["useful_flops_share"], -r["peak_gib"])) if fitting else None
    heading = ("mode", "ckpt", "layers", "useful", "padding", "peak GiB", "hours", "CNY")
    print("{:<18} {:<5} {:>6} {:>7} {:>8} {:>9} {:>6} {:>6}".format(*heading))
    for r in rows:
        mark = " <- fastest that fits" if r is best else ("" if r["fits_budget"] else "  (over budget)")
        print(
            f"{r['mode']:<18} {r['checkpointing']:<5} {r['checkpointed_layers']:>6} "
            f"{r['useful_flops_share']:>7.1%} {r['padding_share']:>8.1%} {r['peak_gib']:>9.1f} "
            f"{r['gpu_hours']:>6.2f} {r['cny']:>6.2f}{mark}"
        )
    if best:
        target = "meets" if best["useful_flops_share"] >= 0.9 else "misses"
        print(
            f"fastest within {args.budget_gib} GiB: {best['mode']}, checkpointing {best['checkpointing']} "
            f"({best['checkpointed_layers']} blocks): {best['useful_flops_share']:.1%} useful FLOPs "
            f"({target} the 90% target), {best['rows_per_epoch']} rows an epoch, "
            f"{best['gpu_hours']} GPU hours, {best['cny']} CNY"
        )


if __name__ == "__main__":
    main()
