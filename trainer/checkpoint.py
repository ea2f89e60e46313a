"""Read and write the base-model checkpoint layout shared by every producer and consumer:

DIR/model.safetensors        weights, keyed like Meta's checkpoints; a large model instead has
DIR/model-00001-of-0000N.safetensors ... and DIR/model.safetensors.index.json (Hugging Face's layout)
DIR/config.json              `trainer.model.Config`
DIR/tokenizer.model          SentencePiece model
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file

from trainer.model import Config, LLaMA

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
TOKENIZER = "tokenizer.model"
SHARD_BYTES = 2 * 10**9

# The dtypes a checkpoint may hold, as the safetensors header names them.
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
}

TensorSpec = tuple[tuple[int, ...], torch.dtype]


def save_model(model: LLaMA, checkpoint_dir: str | Path, shard_bytes: int = SHARD_BYTES) -> None:
    out = Path(checkpoint_dir)
    out.mkdir(parents=True, exist_ok=True)
    # A model saved over an older one may change between one file and shards: leave only one layout.
    for stale in (out / WEIGHTS, out / INDEX, *out.glob("model-*-of-*.safetensors")):
        stale.unlink(missing_ok=True)
    state = model.state_dict()
    specs = {name: (tuple(t.shape), t.dtype) for name, t in state.items()}
    write_weights(out, specs, iter(state.items()), shard_bytes)
    save_config(model.config, out)


def save_config(config: Config, checkpoint_dir: Path) -> None:
    (checkpoint_dir / CONFIG).write_text(json.dumps(config.to_dict(), indent=2) + "\n")


def load_model(checkpoint_dir: str | Path) -> tuple[LLaMA, Config]:
    """The model on the CPU with its weights in their stored dtype; every key must match."""
    path = Path(checkpoint_dir)
    config = Config.from_dict(json.loads((path / CONFIG).read_text()))
    # Built on the meta device, the model costs no memory or init time until the weights arrive;
    # `assign` then adopts the memory-mapped tensors instead of copying them.
    with torch.device("meta"):
        model = LLaMA(config)
    model.load_state_dict(load_weights(path), strict=True, assign=True)
    model.init_rope()
    return model, config


def load_weights(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, from its one weights file or from the shards its index lists."""
    path = Path(checkpoint_dir)
    if not (path / INDEX).exists():
        return load_file(path / WEIGHTS, device="cpu")
    weight_map: dict[str, str] = json.loads((path / INDEX).read_text())["weight_map"]
    state: dict[str, torch.Tensor] = {}
    for shard in dict.fromkeys(weight_map.values()):  # each file once, in index order
        state.update(load_file(path / shard, device="cpu"))
    return state


def shard_file_names(n_shards: int) -> list[str]:
    if n_shards == 1:
        return [WEIGHTS]
    return [f"model-{i:05d}-of-{n_shards:05d}.safetensors" for i in range(1, n_shards + 1)]


def plan_shards(specs: dict[str, TensorSpec], shard_bytes: int) -> list[list[str]]:
    """Consecutive tensors packed, in order, into shards of at most `shard_bytes`; a tensor
    larger than that gets a shard of its own."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, spec in specs.items():
        nbytes = tensor_bytes(spec)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def tensor_bytes(spec: TensorSpec) -> int:
    shape, dtype = spec
    return math.prod(shape) * dtype.itemsize


def write_weights(
    out: Path,
    specs: dict[str, TensorSpec],
    tensors: Iterable[tuple[str, torch.Tensor]],
    shard_bytes: int = SHARD_BYTES,
) -> list[str]:
    """Write safetensors files, one file or shards plus an index, and return their names.

    `specs` declares every tensor up front, so each file's header is written first and the
    tensors, pulled one at a time from `tensors` in the same order, go straight to disk: no
    shard is ever assembled in memory. A tensor that does not match its spec is an error.
    """
    shards = plan_shards(specs, shard_bytes)
    names = shard_file_names(len(shards))
    stream = iter(tensors)
    weight_map: dict[str, str] = {}
    for file_name, shard in zip(names, shards, strict=True):
        _write_safetensors(out / file_name, {name: specs[name] for name in shard}, stream)
        weight_map.update(dict.fromkeys(shard, file_name))
    if len(shards) > 1:
        total = sum(tensor_bytes(spec) for spec in specs.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names


def _write_safetensors(
    path: Path, specs: dict[str, TensorSpec], tensors: Iterator[tuple[str, torch.Tensor]]
) -> None:
    # The format: an 8-byte little-endian header length, a JSON header of dtype, shape and byte
    # offsets per tensor (padded with spaces to 8 bytes), then the raw little-endian data.
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (shape, dtype) in specs.items():
        end = offset + tensor_bytes((shape, dtype))
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, (shape, dtype) in specs.items():
            got, tensor = next(tensors, ("nothing", None))
            if tensor is None or (got, tuple(tensor.shape), tensor.dtype) != (name, shape, dtype):
                found = got if tensor is None else f"{got} {tuple(tensor.shape)} {tensor.dtype}"
                raise ValueError(f"{path.name}: expected {name} {shape} {dtype}, got {found}")
            # Viewed as bytes, the tensor is written without another copy.
            f.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
            del tensor  # let it go before the next one is made
