"""Peak memory of checkpoint conversion, against a naive converter in the same run.

Writes a random LLaMA-shaped checkpoint (bf16, about --size-gb on disk) in Meta's layout (two
model-parallel shards) and in Hugging Face's (sharded safetensors), converts each with
`python -m trainer.convert` and with a naive converter (load everything, then one save_file),
and reports each converter's peak RSS as a multiple of the checkpoint's size. Every measurement
is its own process whose only child is the converter, so RUSAGE_CHILDREN sees that one alone.
Prints one JSON line per measurement and a one-line summary; the target is at most 1.2x.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from trainer.checkpoint import plan_shards
from trainer.convert import meta_intermediate_size
from trainer.data import validate_records
from trainer.hf_format import config_to_hf, from_hf_module, from_hf_rows, needs_row_permutation, to_hf_module
from trainer.model import Config, LLaMA
from trainer.synthetic import generate
from trainer.tokenizer import train

REPO = Path(__file__).resolve().parents[1]
TARGET = 1.2
COLUMN_PARALLEL = ("wq", "wk", "wv", "w1", "w3", "output")  # Meta splits these by rows, the rest by columns

# Run as `python -c PROBE argv...`: runs argv, then reports its peak RSS (ru_maxrss is in KiB).
PROBE = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"rc": done.returncode, "peak_rss_bytes": peak, "seconds": time.perf_counter() - start,
                  "stderr": done.stderr[-2000:]}))
"""


def bench_config(size_bytes: int, dim: int, vocab: int) -> Config:
    """A LLaMA of width `dim` (head size 128) with as many layers as fit in `size_bytes` of bf16."""
    hidden = meta_intermediate_size(dim, 256, None)
    per_layer = 2 * (4 * dim * dim + 3 * dim * hidden + 2 * dim)
    n_layer = max(1, round((size_bytes - 2 * 2 * vocab * dim) / per_layer))
    n_head = dim // 128
    return Config(vocab, n_layer, n_head, n_head, dim, hidden, norm_eps=1e-5)


def random_bf16(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.bfloat16).normal_(std=0.02)


def write_meta(folder: Path, config: Config, specs: dict[str, tuple[int, ...]]) -> None:
    """Two model-parallel shards; each rank's slices are drawn on their own (any values will do)."""
    folder.mkdir(parents=True)
    for rank in range(2):
        shard = {}
        for name, shape in specs.items():
            if len(shape) == 1:  # norms: the same copy in every shard
                shard[name] = torch.ones(shape, dtype=torch.bfloat16)
                continue
            piece = list(shape)
            piece[0 if name.removesuffix(".weight").rsplit(".", 1)[-1] in COLUMN_PARALLEL else 1] //= 2
            shard[name] = random_bf16(tuple(piece))
        torch.save(shard, folder / f"consolidated.{rank:02d}.pth")
        del shard
    params = {
        "dim": config.n_embd,
        "n_layers": config.n_layer,
        "n_heads": config.n_head,
        "vocab_size": config.vocab_size,
    }
    (folder / "params.json").write_text(
        json.dumps({**params, "multiple_of": 256, "norm_eps": config.norm_eps})
    )


def write_hf(folder: Path, config: Config, specs: dict[str, tuple[int, ...]], shard_bytes: int) -> None:
    """Sharded safetensors and their index, as transformers saves a large model."""
    folder.mkdir(parents=True)
    shards = plan_shards({name: (shape, torch.bfloat16) for name, shape in specs.items()}, shard_bytes)
    weight_map = {}
    for k, names in enumerate(shards):
        file_name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        state = {
            to_hf_module(name.removesuffix(".weight")) + ".weight": random_bf16(specs[name]) for name in names
        }
        save_file(state, folder / file_name)
        weight_map.update(dict.fromkeys(state, file_name))
    total = 2 * sum(math.prod(shape) for shape in specs.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(config_to_hf(config)))


def naive_convert(source: str, input_dir: Path, output: Path) -> None:
    """What a straightforward script does: every tensor in memory at once, then one save_file."""
    state: dict[str, torch.Tensor] = {}
    if source == "meta":
        shards = [
            torch.load(f, map_location="cpu", weights_only=True) for f in sorted(input_dir.glob("*.pth"))
        ]
        for name in shards[0]:
            parts = [shard[name] for shard in shards]
            split = 0 if name.removesuffix(".weight").rsplit(".", 1)[-1] in COLUMN_PARALLEL else 1
            state[name] = parts[0] if parts[0].dim() == 1 else torch.cat(parts, dim=split)
        del shards
    else:
        config = json.loads((input_dir / "config.json").read_text())
        heads = {"wq": config["num_attention_heads"], "wk": config["num_key_value_heads"]}
        for f in sorted(input_dir.glob("*.safetensors")):
            for key, tensor in load_file(f).items():
                module = from_hf_module(key.removesuffix(".weight"))
                if needs_row_permutation(module):
                    tensor = from_hf_rows(tensor, heads[module.rsplit(".", 1)[-1]])
                state[module + ".weight"] = tensor
    output.mkdir(parents=True)
    save_file(state, output / "model.safetensors")


def measure(argv: list[str]) -> dict:
    probe = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], cwd=REPO, capture_output=True, text=True, check=True
    )
    result = json.loads(probe.stdout)
    if result["rc"] != 0:
        raise SystemExit(f"error: {' '.join(argv)} failed: {result['stderr'].strip()}")
    return result


def run(root: Path, config: Config, hf_shard_bytes: int) -> None:
    records, _ = validate_records(generate(300, seed=1))
    tokenizer = train(records, vocab_size=600)  # shipped with the checkpoints; only its size is checked
    with torch.device("meta"):
        specs = {name: tuple(t.shape) for name, t in LLaMA(config).state_dict().items()}
    write_meta(root / "meta" / "model", config, specs)
    (root / "meta" / "tokenizer.model").write_bytes(tokenizer)
    write_hf(root / "hf", config, specs, hf_shard_bytes)
    (root / "hf" / "tokenizer.model").write_bytes(tokenizer)
    size = 2 * sum(math.prod(shape) for shape in specs.values())
    print(f"checkpoint: {config}, {size / 1e9:.2f} GB of bf16 weights", file=sys.stderr)

    floor = measure([sys.executable, "-c", "import torch, safetensors, sentencepiece"])["peak_rss_bytes"]
    print(json.dumps({"measurement": "python + torch import", "peak_rss_bytes": floor}))
    ratios: dict[str, float] = {}
    for source, folder in (("meta", root / "meta" / "model"), ("hf", root / "hf")):
        for converter in ("ours", "naive"):
            out = root / f"out-{source}-{converter}"
            if converter == "ours":
                cmd = [
                    "-m",
                    "trainer.convert",
                    "--from",
                    source,
                    "--input",
                    str(folder),
                    "--output",
                    str(out),
                ]
            else:
                cmd = [str(Path(__file__).resolve()), "--naive", source, str(folder), str(out)]
            result = measure([sys.executable, *cmd])
            name = f"{source} {converter}"
            ratios[name] = result["peak_rss_bytes"] / size
            record = {
                "measurement": name,
                "checkpoint_bytes": size,
                "peak_rss_bytes": result["peak_rss_bytes"],
                "ratio": round(ratios[name], 3),
                "ratio_above_import": round((result["peak_rss_bytes"] - floor) / size, 3),
                "seconds": round(result["seconds"], 2),
            }
            print(json.dumps(record), flush=True)
            shutil.rmtree(out)
    parts = ", ".join(f"{name} {ratio:.2f}x" for name, ratio in ratios.items())
    print(
        f"summary: {size / 1e9:.2f} GB checkpoint; peak RSS / size: {parts}; "
        f"python + torch alone {floor / size:.2f}x; target for ours <= {TARGET}x"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-gb", type=float, default=1.0, help="checkpoint size (default 1.0)")
    parser.add_argument("--dim", type=int, default=3072, help="model width, a multiple of 128 (default 3072)")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size (default 32000)")
    parser.add_argument("--hf-shard-mb", type=int, default=400, help="Hugging Face shard size (default 400)")
    parser.add_argument("--tmp-dir", type=Path, help="where to write the checkpoints (default: system temp)")
    parser.add_argument(
        "--naive", nargs=3, metavar=("FROM", "INPUT", "OUTPUT"), help="run only the naive converter"
    )
    args = parser.parse_args(argv)
    if args.naive:
        naive_convert(args.naive[0], Path(args.naive[1]), Path(args.naive[2]))
        return 0
    if args.dim % 128 or args.size_gb <= 0:
        parser.error("--dim must be a multiple of 128 and --size-gb positive")
    with tempfile.TemporaryDirectory(prefix="convert-bench-", dir=args.tmp_dir) as tmp:
        run(Path(tmp), bench_config(int(args.size_gb * 1e9), args.dim, args.vocab), args.hf_shard_mb * 10**6)
    return 0


if __name__ == "__main__":
    sys.exit(main())
