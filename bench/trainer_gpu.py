"""LoRA training speed, MFU and peak memory of this trainer on one GPU, for LLaMA-7B's shape,
every figure from one command, for a GPU that is lent for a few minutes.

What is measured: all 32 layers of LLaMA-7B (nothing extrapolated), random weights (speed does
not depend on their values), bf16-true as the trainer runs it (the frozen base in bf16, built
directly on the GPU; the LoRA adapters float32), each step through the trainer's own
`optimizer_step` (forward, loss, backward, clipping, fused AdamW) and, as training does, the
loss read back to the host after every step.

Configurations, each (name, micro-batch, sequence, packed, checkpointed blocks or "auto",
compile); the default set, `--configs` picks from it by name:
  recipe           the 7B job's own recipe, read at run time from the finetune command in the
                   job's `train.run` (jobs/llama7b-lora-zh.yaml): --micro-batch-size, --pack,
                   --activation-checkpointing (auto resolved by the trainer's own
                   `checkpointed_layers`, with --memory-budget-gib), --compile, --lora-*; the row
                   length is the job's --max-seq-length, or its `trainer.prepare` step's
  ckpt-all-4x512   micro-batch 4 of 512 tokens, unpacked, every block checkpointed
  ckpt-none-4x512  the same, no block checkpointed
Each is first timed on a fixed micro-batch of full rows of random tokens (--warmup untimed
steps, then --fixed-steps timed). The recipe then also runs --steps optimizer steps on batches
built the way training builds them (the trainer's BatchSampler, with pack_capacity when packed,
and draw_global_batch, which collates packed rows to their fixed length; pinned, then copied
non-blocking), sample lengths drawn from bench/lengths.py's `instinwild_like_lengths` where that
module exists, otherwise from a lognormal with median 180 tokens and sigma 0.6, clipped to
[16, max_seq_length]. Each of those steps takes --grad-accum micro-batches (default 1, not the
job's 32: the optimizer's share of a step is small for LoRA, and the lease is short), timed like
trainer.finetune's train_step: drawing and collating the batch included. From those tokens/s it
projects the seed job, 3 epochs of 51,000 records of the drawn mean length, in hours and CNY at
the job's GPU price (pricing.gpu_per_hour): on this card, and on an RTX 4090 by scaling with the
cards' peak TFLOP/s (the same MFU assumed: labelled scaled, not measured); also the hours of the
job's own --max-steps x --grad-accum micro-batches, which differ from 3 epochs with --pack.

Per configuration: tokens/s (real tokens only: padding is not counted), seconds per optimizer
step, MFU, peak memory allocated and reserved by PyTorch's caching allocator (GiB; CUDA's own
context is in neither), the trainer's memory plan for the same configuration
(`trainer.memory.plan(...).peak(k)`, which adds 5% for fragmentation and 512 MiB for the CUDA
context), and GFLOP per token. A configuration that runs out of GPU memory is reported as
{"config": ..., "oom": true, "error": ...} and the next one runs.

MFU: FLOPs per token = 6 x trainable + 4 x frozen matmul parameters (a frozen weight needs no
weight gradient; the token embedding, a lookup, is left out), + attention 4 x n_layer x n_embd
x T, T the micro-batch's row length (the score and value products of the forward pass over the
full T x T square, as LitGPT counts them; causal kernels skip half of that work, and the
backward pass is not counted), against the GPU's dense bf16 peak (the table below, or
--peak-tflops). Recomputation under activation checkpointing counts as no useful work, and so
does padding.

Output: one JSON line per figure on stdout, each with "device", "torch" and "config", then one
human summary line. Exit status 1 if a configuration failed other than by running out of memory.

    PYTHONPATH=. python bench/trainer_gpu.py [--configs recipe,ckpt-all-4x512] [--steps 20]
    PYTHONPATH=. python bench/trainer_gpu.py --cpu-dry-run   # the same code on a tiny model, no GPU

--cpu-dry-run runs the same code on the CPU on a 2-layer model 64 wide (rows cut to its 256
positions), 2 timed steps, no torch.compile, no MFU and no memory figures: to exercise the code
where there is no GPU, not to measure anything.

bench/gpu_check.sh runs this after the GPU's identity and a CUDA correctness test.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import torch

from trainer.batching import Batch, BatchSampler, collate, draw_global_batch, target_count
from trainer.data import IGNORE_INDEX
from trainer.finetune import TrainConfig, build_optimizer, build_parser, checkpointed_layers, optimizer_step
from trainer.lora import LoRAConfig, apply_lora, count_trainable
from trainer.memory import plan
from trainer.model import Config, LLaMA

LENGTHS_MISSING = None
try:
    from bench.lengths import instinwild_like_lengths
except ImportError:
    try:  # run as a script without the repository on sys.path: this file's folder is on it
        from lengths import instinwild_like_lengths
    except ImportError as err:  # not written yet, or not importable: the output says which
        instinwild_like_lengths = None
        LENGTHS_MISSING = f"{type(err).__name__}: {err}"

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "llama7b-lora-zh.yaml"
PRECISION = "bf16-true"
# The seed job: 3 epochs of the 51,000 instruction records, at the job's GPU price per hour.
SEED_RECORDS, SEED_EPOCHS, DEFAULT_CNY_PER_HOUR = 51_000, 3, 2.15
LOGNORMAL_MEDIAN, LOGNORMAL_SIGMA, SHORTEST = 180, 0.6, 16
SAMPLE_POOL = 4096  # samples the drawn-length run samples batches from (4 packing windows)
REFERENCE_CARD = "RTX 4090"
# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, by a piece of torch.cuda.get_device_name;
# the first match wins, so each name comes before any name that is a piece of it.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H800 PCIe", 756.0),
    ("H800", 989.0),  # SXM
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("H20", 148.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L20", 119.5),
    ("RTX 4090 D", 147.0),
    ("RTX 4090", 165.2),
    ("RTX 5090", 209.5),
    ("L4", 121.0),
)
# --cpu-dry-run: the same code on a model small enough for a laptop CPU.
DRY_SHAPE = Config(
    vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=128, max_seq_len=256
)


def peak_tflops(name: str) -> tuple[str, float] | None:
    return next(((key, peak) for key, peak in PEAK_TFLOPS if key in name), None)


class Setup(NamedTuple):
    name: str
    micro_batch: int
    seq: int
    packed: bool
    checkpointed: int | str  # the first N blocks recompute in backward, or "auto"
    compile: bool


class Recipe(NamedTuple):
    cfg: TrainConfig  # as trainer.finetune would build it from the job's flags
    max_seq_length: int
    cny_per_hour: float
    job: str


class Env(NamedTuple):
    device: torch.device
    name: str  # the GPU's name, or "cpu (dry run)"
    model: Config
    peak: tuple[str, float] | None  # (where it came from, TFLOP/s)
    dry_run: bool


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --- the recipe, from the job file -------------------------------------------------------------


def command_args(run: str, module: str) -> list[str] | None:
    """The arguments of `python -m MODULE ...` in a shell command line, up to its end or the
    next &&, ||, ; or |; None if the line does not run MODULE."""
    lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = list(lexer)
    starts = [i + 2 for i in range(len(tokens) - 1) if tokens[i : i + 2] == ["-m", module]]
    if not starts:
        return None
    args = []
    for token in tokens[starts[0] :]:
        if token in ("&&", "||", ";", "|", "&"):
            break
        args.append(token)
    return args


def flag_value(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def read_recipe(job: Path) -> Recipe:
    """The finetune flags of the job's `train.run`, parsed by trainer.finetune's own parser into
    the TrainConfig a run of that command would use."""
    import yaml  # only here: --help and the no-GPU error need no YAML

    spec = yaml.safe_load(job.read_text())
    args = command_args(spec["train"]["run"], "trainer.finetune")
    if args is None:
        sys.exit(f"error: {job}: train.run does not run python -m trainer.finetune")
    try:
        parsed = build_parser().parse_args(args)
    except SystemExit:
        sys.exit(f"error: {job}: train.run's flags are not ones trainer.finetune takes (above)")
    # As trainer.finetune.main builds its TrainConfig: a flag not given leaves the field's default.
    given = {k: v for k, v in vars(parsed).items() if k not in ("json", "resume") and v is not None}
    cfg = TrainConfig(**given)
    max_len = cfg.max_seq_length or prepared_length(spec)
    if max_len is None:
        sys.exit(f"error: {job}: no --max-seq-length in train.run nor in a trainer.prepare set-up step")
    price = float((spec.get("pricing") or {}).get("gpu_per_hour", DEFAULT_CNY_PER_HOUR))
    shown = job.resolve().relative_to(REPO) if job.resolve().is_relative_to(REPO) else job
    return Recipe(cfg, max_len, price, str(shown))


def prepared_length(spec: dict[str, Any]) -> int | None:
    """--max-seq-length of the job's `trainer.prepare` step: the length the data is prepared for,
    which finetune takes when its own flag is absent."""
    for step in spec.get("setup") or []:
        args = command_args(step.get("run", ""), "trainer.prepare")
        value = args and flag_value(args, "--max-seq-length")
        if value:
            return int(value)
    return None


def default_setups(recipe: Recipe, n_layer: int) -> list[Setup]:
    cfg = recipe.cfg
    asked = {"off": 0, "all": n_layer, "auto": "auto"}[cfg.activation_checkpointing]
    return [
        Setup("recipe", cfg.micro_batch_size, recipe.max_seq_length, cfg.pack, asked, cfg.compile),
        Setup("ckpt-all-4x512", 4, 512, False, n_layer, False),
        Setup("ckpt-none-4x512", 4, 512, False, 0, False),
    ]


# --- one configuration -------------------------------------------------------------------------


def build(config: Config, device: torch.device, lora: LoRAConfig) -> LLaMA:
    """The model as the trainer prepares it for bf16-true, built in bf16 directly on the device."""
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            model = LLaMA(config)
    finally:
        torch.set_default_dtype(torch.float32)
    model.init_rope()  # float32 tables, as in training
    apply_lora(model, lora)  # float32 adapters: the default dtype is float32 again
    return model.train()


def train_config(recipe: Recipe, setup: Setup) -> TrainConfig:
    checkpointing = "auto" if setup.checkpointed == "auto" else "all" if setup.checkpointed else "off"
    return replace(
        recipe.cfg,
        micro_batch_size=setup.micro_batch,
        pack=setup.packed,
        length_grouped=recipe.cfg.length_grouped and not setup.packed,
        activation_checkpointing=checkpointing,
        compile=setup.compile,
        precision=PRECISION,
    )


def flop_counts(model: LLaMA) -> tuple[int, int]:
    """Per token, without attention: 6 x trainable + 4 x frozen parameters, the embedding left out;
    and attention's FLOPs per token per position of the row (4 x n_layer x n_embd)."""
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    frozen -= model.tok_embeddings.weight.numel()
    return 6 * count_trainable(model) + 4 * frozen, 4 * model.config.n_layer * model.config.n_embd


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float | None]:
    if device.type != "cuda":
        return {"peak_allocated_gib": None, "peak_reserved_gib": None}
    return {
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 2),
    }


def mfu(flops_per_s: float, env: Env) -> float | None:
    return round(flops_per_s / (env.peak[1] * 1e12), 4) if env.peak else None


def fixed_batch(setup: Setup, vocab_size: int, device: torch.device) -> Batch:
    """Full rows of random tokens: one sample each, or (packed) two, so that attention is masked
    per sample as in packed training."""
    B, T = setup.micro_batch, setup.seq
    ids = torch.randint(3, vocab_size, (B, T + 2))
    if setup.packed:
        half = T // 2
        rows = [
            [
                {"input_ids": r[: half + 1], "labels": r[: half + 1]},
                {"input_ids": r[half + 1 :], "labels": r[half + 1 :]},
            ]
            for r in ids
        ]
    else:
        rows = [{"input_ids": r[: T + 1], "labels": r[: T + 1]} for r in ids]
    batch = collate(rows, length=T)
    return batch.pinned() if device.type == "cuda" else batch


def timed_steps(step: Callable[[], float], n: int, device: torch.device) -> tuple[float, list[float]]:
    sync(device)
    start = time.perf_counter()
    losses = [step() for _ in range(n)]
    sync(device)
    return time.perf_counter() - start, losses


def fixed_run(model: LLaMA, optimizer, cfg: TrainConfig, setup: Setup, env: Env, args) -> dict[str, Any]:
    batch = fixed_batch(setup, model.config.vocab_size, env.device)
    weight = 1 / int((batch.targets != IGNORE_INDEX).sum())

    def step() -> float:
        loss = optimizer_step(model, optimizer, [batch], weight, cfg, env.device, PRECISION)
        return loss.item() * weight  # read back every step, as training does

    reset_memory(env.device)
    warm_s, _ = timed_steps(step, args.warmup, env.device)
    seconds, losses = timed_steps(step, args.fixed_steps, env.device)
    step_s = seconds / args.fixed_steps
    dense, attention = flop_counts(model)
    flops_per_token = dense + attention * setup.seq
    tokens_per_s = batch.tokens / step_s
    return {
        "tokens_per_s": round(tokens_per_s, 1),
        "step_s": round(step_s, 4),
        "mfu": mfu(tokens_per_s * flops_per_token, env),
        **peak_memory(env.device),
        "gflop_per_token": float(f"{flops_per_token / 1e9:.4g}"),
        "tokens_per_step": batch.tokens,
        "steps": args.fixed_steps,
        "warmup_s": round(warm_s, 2),
        "loss": round(losses[-1], 4),
    }


def draw_lengths(n: int, seed: int, max_len: int) -> tuple[list[int], str]:
    """Sample lengths in tokens (EOS included), as prepared data holds them, and where from."""
    if instinwild_like_lengths is not None:
        drawn = [min(max(int(x), 2), max_len) for x in instinwild_like_lengths(n, seed, max_len)]
        return drawn, "bench.lengths.instinwild_like_lengths"
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=generator, dtype=torch.float64)
    lengths = torch.exp(math.log(LOGNORMAL_MEDIAN) + LOGNORMAL_SIGMA * z).round().clamp(SHORTEST, max_len)
    source = (
        f"lognormal: median {LOGNORMAL_MEDIAN}, sigma {LOGNORMAL_SIGMA}, clipped to [{SHORTEST}, {max_len}]"
    )
    if LENGTHS_MISSING and (REPO / "bench" / "lengths.py").exists():
        source += f" (bench/lengths.py did not import: {LENGTHS_MISSING})"
    return [int(x) for x in lengths.tolist()], source


def drawn_run(
    model: LLaMA, optimizer, cfg: TrainConfig, recipe: Recipe, env: Env, args, lengths: list[int]
) -> dict[str, Any]:
    """--steps optimizer steps as trainer.finetune.train_step takes them: rows drawn by the
    trainer's BatchSampler and collated by draw_global_batch, pinned, copied non-blocking."""
    pool = lengths[:SAMPLE_POOL]
    generator = torch.Generator().manual_seed(cfg.seed)
    rows = [
        {"input_ids": ids, "labels": ids}
        for ids in (torch.randint(3, env.model.vocab_size, (n,), generator=generator) for n in pool)
    ]
    targets = [target_count(row) for row in rows]
    capacity = recipe.max_seq_length if cfg.pack else None
    sampler = BatchSampler(pool, cfg.micro_batch_size, cfg.seed, cfg.length_grouped, capacity)
    dense, attention = flop_counts(model)
    totals = dict(tokens=0, seconds=0.0, flops=0.0, padding=0.0, micro_batches=0)
    reset_memory(env.device)
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        drawn = draw_global_batch(sampler, rows, targets, args.grad_accum, 0, 1)
        own = [batch.pinned() for batch in drawn.own] if env.device.type == "cuda" else drawn.own
        loss = optimizer_step(model, optimizer, own, 1 / drawn.targets, cfg, env.device, PRECISION).item()
        seconds = time.perf_counter() - start
        if i < args.warmup:
            continue
        totals["tokens"] += drawn.tokens
        totals["seconds"] += seconds
        totals["flops"] += sum(b.tokens * (dense + attention * b.inputs.size(1)) for b in own)
        totals["padding"] += drawn.padding
        totals["micro_batches"] += len(own)
    tokens_per_s = totals["tokens"] / totals["seconds"]
    return {
        "tokens_per_s": round(tokens_per_s, 1),
        "step_s": round(totals["seconds"] / args.steps, 4),
        "mfu": mfu(totals["flops"] / totals["seconds"], env),
        **peak_memory(env.device),
        "gflop_per_token": float(f"{totals['flops'] / totals['tokens'] / 1e9:.4g}"),
        "steps": args.steps,
        "grad_accum": args.grad_accum,
        "recipe_grad_accum": cfg.grad_accum,
        "padding": round(totals["padding"] / args.steps, 4),
        "tokens_per_step": round(totals["tokens"] / args.steps, 1),
        "micro_batch_s": round(totals["seconds"] / totals["micro_batches"], 4),
        "loss": round(loss / drawn.targets, 4),
    }


def projection(drawn: dict[str, Any], lengths: list[int], recipe: Recipe, env: Env) -> dict[str, Any]:
    """The seed job's hours and CNY at the drawn-length run's tokens/s, on this card and, scaled
    by peak TFLOP/s alone (the same MFU assumed), on the reference card."""
    per_sample = sum(lengths) / len(lengths) - 1  # positions after the shift, as tokens/s counts them
    tokens = per_sample * SEED_RECORDS * SEED_EPOCHS
    hours = tokens / drawn["tokens_per_s"] / 3600
    cfg = recipe.cfg
    steps_hours = cfg.max_steps * cfg.grad_accum * drawn["micro_batch_s"] / 3600
    out = {
        "seed_job": f"{SEED_EPOCHS} epochs of {SEED_RECORDS:,} records",
        "tokens_per_sample": round(per_sample, 1),
        "seed_job_tokens": round(tokens),
        "cny_per_hour": recipe.cny_per_hour,
        "projected_on": env.name,
        "hours": round(hours, 2),
        "cny": round(hours * recipe.cny_per_hour, 2),
        # What the job's own --max-steps x --grad-accum micro-batches would take (with --pack,
        # more than 3 epochs of rows hold more than 3 epochs of samples).
        "recipe_steps_hours": round(steps_hours, 2),
        "recipe_steps_cny": round(steps_hours * recipe.cny_per_hour, 2),
    }
    reference = peak_tflops(REFERENCE_CARD)
    if env.peak and reference:
        scaled = hours * env.peak[1] / reference[1]
        out |= {
            f"{REFERENCE_CARD} (scaled by peak TFLOP/s, not measured)": {
                "peak_tflops": reference[1],
                "hours": round(scaled, 2),
                "cny": round(scaled * recipe.cny_per_hour, 2),
            }
        }
    return out


def resolve_checkpointing(model: LLaMA, cfg: TrainConfig, setup: Setup, env: Env) -> int:
    if setup.checkpointed != "auto":
        return int(setup.checkpointed)
    return checkpointed_layers(model, cfg, setup.seq, env.device, log)


def measure(setup: Setup, recipe: Recipe, env: Env, args) -> Iterator[dict[str, Any]]:
    """The configuration's records, as each is measured."""
    cfg = train_config(recipe, setup)
    torch.manual_seed(cfg.seed)
    model = build(env.model, env.device, cfg.lora)
    # In trainer.finetune.setup's order: blocks to checkpoint (the plan measures one block,
    # uncompiled), then compiling, then the optimizer.
    k = resolve_checkpointing(model, cfg, setup, env)
    model.checkpointed_layers = k
    estimate = plan(model, setup.micro_batch, setup.seq, setup.packed).peak(k)
    if setup.compile:
        for layer in model.layers:
            layer.compile()
    optimizer = build_optimizer(model, cfg, env.device)
    shape = {
        "micro_batch": setup.micro_batch,
        "seq": setup.seq,
        "packed": setup.packed,
        "checkpointed": k,
        "checkpointing_asked": setup.checkpointed,
        "compile": setup.compile,
        "lora": f"r {cfg.lora_r}, alpha {cfg.lora_alpha:g}, {','.join(cfg.lora_targets)}",
        "plan_peak_gib": round(estimate / 2**30, 2),
    }
    yield {"kind": "fixed", **shape, **fixed_run(model, optimizer, cfg, setup, env, args)}
    if setup.name != "recipe":
        return
    lengths, source = draw_lengths(SEED_RECORDS, cfg.seed, recipe.max_seq_length)
    drawn = drawn_run(model, optimizer, cfg, recipe, env, args, lengths)
    mean = round(sum(lengths) / len(lengths), 1)
    yield {"kind": "drawn", **shape, "lengths": source, "mean_length": mean, **drawn}
    yield {"kind": "projection", **projection(drawn, lengths, recipe, env)}


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err)
    )


def run_setup(setup: Setup, recipe: Recipe, env: Env, args, common: dict[str, Any]) -> list[dict[str, Any]]:
    """Emit the configuration's records; one that fails, out of memory or otherwise, ends in a
    record saying so, and the memory it held is freed for the next configuration."""
    records: list[dict[str, Any]] = []
    try:
        for record in measure(setup, recipe, env, args):
            records.append({**common, "config": setup.name, **record})
            emit(records[-1])
    except Exception as err:  # the GPU is lent for minutes: report it and go on to the next
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        kind = "drawn" if records else "fixed"
        failure = {"oom": True} if is_oom(err) else {"failed": True, "error_type": type(err).__name__}
        records.append({**common, "config": setup.name, "kind": kind, **failure, "error": first})
        emit(records[-1])
    if setup.compile:
        torch._dynamo.reset()
    reset_memory(env.device)
    return records


# --- the whole bench ---------------------------------------------------------------------------


def summary(records: list[dict[str, Any]], env: Env) -> str:
    parts = []
    for r in records:
        what = f"{r['config']} {r['kind']}"
        if r.get("oom") or r.get("failed"):
            parts.append(f"{what}: {'out of memory' if r.get('oom') else 'failed'} ({r['error'][:80]})")
        elif r["kind"] == "projection":
            line = f"seed job projected on {r['projected_on']}: {r['hours']:.1f} h, {r['cny']:.0f} CNY"
            scaled = next((v for k, v in r.items() if k.startswith(REFERENCE_CARD)), None)
            if scaled:
                line += f"; {REFERENCE_CARD} scaled, not measured: {scaled['hours']:.1f} h, "
                line += f"{scaled['cny']:.0f} CNY"
            parts.append(line)
        else:
            mfu_text = f"MFU {r['mfu']:.1%}" if r["mfu"] is not None else "MFU ?"
            peak = r["peak_reserved_gib"]
            memory = f"peak {r['peak_allocated_gib']:.1f}/{peak:.1f} GiB alloc/reserved" if peak else "peak ?"
            parts.append(
                f"{what} {r['micro_batch']}x{r['seq']}{' packed' if r['packed'] else ''} "
                f"ckpt {r['checkpointed']}: "
                f"{r['tokens_per_s']:.0f} tok/s, {mfu_text}, {memory}, plan {r['plan_peak_gib']:.1f} GiB"
            )
    peak = f"{env.peak[1]:g} TFLOP/s bf16 peak" if env.peak else "bf16 peak unknown (pass --peak-tflops)"
    shape = "the tiny dry-run shape" if env.dry_run else "LLaMA-7B shape"
    head = f"summary: {shape}, {env.model.n_layer} layers, {PRECISION}, on {env.name} ({peak})"
    return f"{head}: {'; '.join(parts)}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", help="comma-separated names from the default set (default all)")
    parser.add_argument("--job", type=Path, default=JOB, help="the job whose train.run is the recipe")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps on drawn-length batches")
    parser.add_argument("--fixed-steps", type=int, default=10, help="timed steps on the fixed batch")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each timing")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per drawn-length step")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if not in the table")
    parser.add_argument(
        "--cny-per-hour", type=float, help="GPU price (default the job's pricing.gpu_per_hour)"
    )
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny model on the CPU, 2 steps, no MFU")
    args = parser.parse_args(argv)
    if min(args.steps, args.fixed_steps, args.grad_accum) < 1 or args.warmup < 0:
        parser.error("--steps, --fixed-steps and --grad-accum must be at least 1, --warmup at least 0")
    if args.cpu_dry_run:
        args.steps, args.fixed_steps, args.warmup = 2, 2, 1
    return args


def environment(args: argparse.Namespace) -> Env:
    if args.cpu_dry_run:
        peak = ("--peak-tflops", args.peak_tflops) if args.peak_tflops else None
        return Env(torch.device("cpu"), "cpu (dry run)", DRY_SHAPE, peak, True)
    if not torch.cuda.is_available():
        sys.exit(
            "error: bench/trainer_gpu.py needs a CUDA GPU, and torch sees none "
            "(--cpu-dry-run runs it on the CPU)"
        )
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    if torch.cuda.get_device_capability(device) < (8, 0):
        sys.exit(f"error: bench/trainer_gpu.py needs a CUDA GPU with native bf16; {name} has none")
    torch.set_float32_matmul_precision("high")  # as trainer.finetune.setup does on a GPU
    peak = ("--peak-tflops", args.peak_tflops) if args.peak_tflops else peak_tflops(name)
    return Env(device, name, Config.from_name("7B"), peak, False)


def select(setups: list[Setup], names: str | None, env: Env) -> list[Setup]:
    if env.dry_run:  # the tiny model's rows are shorter, and no C++ compiler is waited for
        setups = [s._replace(seq=min(s.seq, env.model.max_seq_len), compile=False) for s in setups]
    if not names:
        return setups
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = set(wanted) - {s.name for s in setups}
    if unknown:
        sys.exit(
            f"error: unknown --configs {', '.join(sorted(unknown))}; "
            f"choose from {', '.join(s.name for s in setups)}"
        )
    by_name = {s.name: s for s in setups}
    return [by_name[name] for name in dict.fromkeys(wanted)]  # in the order asked, each once


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = environment(args)
    recipe = read_recipe(args.job)
    if args.cny_per_hour is not None:
        recipe = recipe._replace(cny_per_hour=args.cny_per_hour)
    # As trainer.finetune.load_data caps it: rows no longer than the model's context.
    recipe = recipe._replace(max_seq_length=min(recipe.max_seq_length, env.model.max_seq_len))
    setups = select(default_setups(recipe, env.model.n_layer), args.configs, env)
    common = {
        "device": env.name,
        "torch": torch.__version__,
        "peak_tflops": env.peak and env.peak[1],
        "peak_from": env.peak and env.peak[0],  # the table's name that matched, or --peak-tflops
        "gpu_mem_gib": round(torch.cuda.get_device_properties(env.device).total_memory / 2**30, 1)
        if env.device.type == "cuda"
        else None,
        "layers": env.model.n_layer,
        "precision": PRECISION,
        "job": recipe.job,
    }
    if env.dry_run:
        common["dry_run"] = True
    records = [r for setup in setups for r in run_setup(setup, recipe, env, args, common)]
    print(summary(records, env), flush=True)
    return 1 if any(r.get("failed") for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
