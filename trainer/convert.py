"""Convert Meta or Hugging Face LLaMA weights into the checkpoint layout of `trainer.checkpoint`.

Meta: `params.json` and `consolidated.NN.pth`, NN model-parallel shards joined per key, with
`tokenizer.model` in the folder or beside it. Hugging Face: `config.json`, weights in safetensors
or `pytorch_model.bin`, one file or shards with an index, and `tokenizer.model`.

Every key and shape is checked against the config before anything is written, and the output is
built in a hidden folder renamed into place at the end, so bad input leaves nothing behind.
Inputs are memory-mapped and re-opened for each layer, and tensors are written one at a time:
a conversion holds about one layer in memory, never the whole model.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from itertools import groupby
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from trainer.checkpoint import (
    DTYPE_NAMES,
    SHARD_BYTES,
    TOKENIZER,
    TensorSpec,
    save_config,
    tensor_bytes,
    write_weights,
)
from trainer.hf_format import (
    config_from_hf,
    from_hf_module,
    from_hf_rows,
    needs_row_permutation,
    to_hf_module,
)
from trainer.model import Config, LLaMA
from trainer.tokenizer import Tokenizer

DTYPES: dict[str, torch.dtype | None] = {
    "keep": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}

# How Meta's model-parallel layers split a weight across shards: column-parallel ones by output
# rows (dim 0), row-parallel ones and the embedding by input columns (dim 1). Norms are copied
# to every shard.
_META_COLUMN_PARALLEL = ("output", "wq", "wk", "wv", "w1", "w3")
_META_ROW_PARALLEL = ("tok_embeddings", "wo", "w2")
_META_SHARD = re.compile(r"consolidated\.(\d+)\.pth")


class ConvertError(Exception):
    """Bad input; the message names the file and, where it applies, the key."""


@dataclass(frozen=True)
class Part:
    """How one of our tensors is made: its pieces in the input, joined and reordered."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # as stored in the input
    pieces: tuple[tuple[Path, str], ...]  # (file, key), one per model-parallel shard
    split_dim: int = 0  # where there are several pieces, they are concatenated along this dimension
    hf_heads: int | None = None  # undo HF's rotate-half row order over this many heads


def convert(
    source: str,
    input_dir: Path,
    output: Path,
    dtype: str = "keep",
    shard_bytes: int = SHARD_BYTES,
    max_seq_len: int | None = None,
) -> dict[str, Any]:
    """Check the input, then write the checkpoint; returns a summary of what was written."""
    start = time.perf_counter()
    if not input_dir.is_dir():
        raise ConvertError(f"{input_dir}: not a folder")
    if output.exists() and not (output.is_dir() and not any(output.iterdir())):
        raise ConvertError(f"{output}: already exists")
    config, parts, tokenizer = PLANNERS[source](input_dir, max_seq_len)
    out_dtype = DTYPES[dtype]
    specs = {part.name: (part.shape, out_dtype or part.dtype) for part in parts}

    partial = output.with_name(f".{output.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by a conversion that was killed
    partial.mkdir(parents=True)
    try:
        files = write_weights(partial, specs, assemble(parts, out_dtype), shard_bytes)
        save_config(config, partial)
        shutil.copyfile(tokenizer, partial / TOKENIZER)
        if output.exists():
            output.rmdir()
        partial.rename(output)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return {
        "from": source,
        "input": str(input_dir),
        "output": str(output),
        "dtype": dtype,
        "stored_dtypes": sorted({str(d).removeprefix("torch.") for _, d in specs.values()}),
        "config": config.to_dict(),
        "parameters": sum(math.prod(shape) for shape, _ in specs.values()),
        "bytes": sum(tensor_bytes(spec) for spec in specs.values()),
        "files": files,
        "seconds": round(time.perf_counter() - start, 3),
    }


# ---- Meta ----


def plan_meta(folder: Path, max_seq_len: int | None) -> tuple[Config, list[Part], Path]:
    """Check a Meta checkpoint folder and say where each of our tensors comes from."""
    params_path = folder / "params.json"
    params = read_json(params_path)
    tokenizer, tokenizer_vocab = find_tokenizer(folder / TOKENIZER, folder.parent / TOKENIZER)
    config = meta_config(params, params_path, tokenizer_vocab, max_seq_len)
    check_vocab(tokenizer, tokenizer_vocab, config)

    files = meta_shards(folder)
    specs = [tensor_specs(f) for f in files]
    expected = expected_shapes(config)
    for f, spec in zip(files, specs, strict=True):
        check_keys(f, set(spec) - {"rope.freqs"}, expected)  # rope.freqs: a derived buffer

    parts = [meta_part(name, shape, files, specs) for name, shape in expected.items()]
    check_replicated(files, [part.name for part in parts if len(part.pieces) == 1])
    return config, parts, tokenizer


def meta_part(
    name: str, shape: tuple[int, ...], files: list[Path], specs: list[dict[str, TensorSpec]]
) -> Part:
    """Where one tensor lies in Meta's shards: split along one dimension, or copied to each."""
    kind = name.removesuffix(".weight").rsplit(".", 1)[-1]
    split = 0 if kind in _META_COLUMN_PARALLEL else 1 if kind in _META_ROW_PARALLEL else None
    piece = list(shape)
    if split is not None:
        if shape[split] % len(files):
            raise ConvertError(f"{files[0].parent}: {len(files)} shards cannot split {name} {shape}")
        piece[split] //= len(files)
    dtype = specs[0][name][1]
    for f, spec in zip(files, specs, strict=True):
        if spec[name][0] != tuple(piece):
            raise ConvertError(
                f"{f}: {name} has shape {spec[name][0]}, expected {tuple(piece)} "
                f"(one of {len(files)} shard(s) of {shape}, from params.json)"
            )
        if spec[name][1] != dtype:
            raise ConvertError(f"{f}: {name} is {spec[name][1]}, but {files[0].name} holds it as {dtype}")
    pieces = tuple((f, name) for f in (files if split is not None else files[:1]))
    return Part(name, shape, dtype, pieces, split_dim=split or 0)


def meta_config(
    params: dict[str, Any], source: Path, tokenizer_vocab: int, max_seq_len: int | None
) -> Config:
    if params.get("use_scaled_rope"):
        raise ConvertError(f"{source}: use_scaled_rope: RoPE scaling is not supported")
    try:
        dim, n_head = params["dim"], params["n_heads"]
        return Config(
            vocab_size=tokenizer_vocab if params.get("vocab_size", -1) == -1 else params["vocab_size"],
            n_layer=params["n_layers"],
            n_head=n_head,
            n_kv_head=params.get("n_kv_heads") or n_head,
            n_embd=dim,
            intermediate_size=meta_intermediate_size(
                dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier")
            ),
            norm_eps=float(params["norm_eps"]),
            rope_base=float(params.get("rope_theta", 10000.0)),
            max_seq_len=max_seq_len or 2048,  # not in params.json; LLaMA 1 was trained on 2048
        )
    except KeyError as err:
        raise ConvertError(f"{source}: missing {err}") from None
    except (TypeError, ValueError) as err:
        raise ConvertError(f"{source}: {err}") from None


def meta_intermediate_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The SwiGLU width Meta's code derives: 2/3 of 4 * dim, optionally scaled, rounded up."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def meta_shards(folder: Path) -> list[Path]:
    files = sorted(folder.glob("consolidated.*.pth"))
    if not files:
        raise ConvertError(f"{folder}: no consolidated.NN.pth files")
    numbers = [m and int(m[1]) for m in (_META_SHARD.fullmatch(f.name) for f in files)]
    if numbers != list(range(len(files))):
        raise ConvertError(f"{folder}: shards {[f.name for f in files]} are not consolidated.00.pth onwards")
    return files


def check_replicated(files: list[Path], names: list[str]) -> None:
    """Norms are copied to every model-parallel shard; copies that differ mean a broken checkpoint."""
    if len(files) < 2:
        return
    with ExitStack() as stack:
        first = stack.enter_context(open_weights(files[0]))
        for f in files[1:]:
            other = stack.enter_context(open_weights(f))
            for name in names:
                if not torch.equal(first(name), other(name)):
                    raise ConvertError(
                        f"{f}: {name} differs from {files[0].name}; norms must be equal in every shard"
                    )


# ---- Hugging Face ----


def plan_hf(folder: Path, max_seq_len: int | None) -> tuple[Config, list[Part], Path]:
    """Check a Hugging Face checkpoint folder and say where each of our tensors comes from."""
    config_path = folder / "config.json"
    try:
        config = config_from_hf(read_json(config_path))
    except (TypeError, ValueError) as err:
        raise ConvertError(f"{config_path}: {err}") from None
    if max_seq_len:
        config = replace(config, max_seq_len=max_seq_len)
    tokenizer, tokenizer_vocab = find_tokenizer(folder / TOKENIZER)
    check_vocab(tokenizer, tokenizer_vocab, config)

    files, listing, weight_map = hf_weight_files(folder)
    found = hf_tensors(files)
    parts = []
    for name, shape in expected_shapes(config).items():
        if name not in found:
            key = to_hf_module(name.removesuffix(".weight")) + ".weight"
            where = folder / weight_map[key] if key in weight_map else listing
            raise ConvertError(f"{where}: missing key {key!r}")
        f, key, (got, dtype) = found.pop(name)
        if got != shape:
            raise ConvertError(f"{f}: {key} has shape {got}, expected {shape} from {config_path.name}")
        module = name.removesuffix(".weight")
        heads = config.n_head if module.endswith("wq") else config.n_kv_head
        parts.append(
            Part(name, shape, dtype, ((f, key),), hf_heads=heads if needs_row_permutation(module) else None)
        )
    if found:
        f, key, _ = next(iter(found.values()))
        raise ConvertError(f"{f}: unexpected key {key!r} (the config has {config.n_layer} layers)")
    return config, parts, tokenizer


def hf_weight_files(folder: Path) -> tuple[list[Path], Path, dict[str, str]]:
    """The weight files in order, the file that lists them (an index, or the one weights file),
    and the index's key-to-file map (empty without an index)."""
    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (folder / index).is_file():
            weight_map = read_json(folder / index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConvertError(f"{folder / index}: no weight_map")
            files = [folder / name for name in dict.fromkeys(weight_map.values())]
            for f in files:
                if not f.is_file():
                    raise ConvertError(f"{f}: not found (listed in {index})")
            return files, folder / index, weight_map
        if (folder / single).is_file():
            return [folder / single], folder / single, {}
    raise ConvertError(f"{folder}: no model.safetensors, pytorch_model.bin or sharded index")


def hf_tensors(files: list[Path]) -> dict[str, tuple[Path, str, TensorSpec]]:
    """Each tensor in the files, by our name: the file, its Hugging Face key, shape and dtype."""
    found: dict[str, tuple[Path, str, TensorSpec]] = {}
    for f in files:
        for key, spec in tensor_specs(f).items():
            if key.endswith(".rotary_emb.inv_freq"):  # a derived buffer some exports saved
                continue
            name = _our_name(key)
            if name is None:
                raise ConvertError(f"{f}: unexpected key {key!r}")
            if name in found:
                raise ConvertError(f"{f}: key {key!r} is also in {found[name][0]}")
            found[name] = (f, key, spec)
    return found


def _our_name(hf_key: str) -> str | None:
    module, _, param = hf_key.rpartition(".")
    try:
        return from_hf_module(module) + ".weight" if param == "weight" else None
    except KeyError:
        return None


PLANNERS: dict[str, Callable[[Path, int | None], tuple[Config, list[Part], Path]]] = {
    "meta": plan_meta,
    "hf": plan_hf,
}


# ---- Both ----


def expected_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    """Every tensor our model stores, in model order, with its shape."""
    with torch.device("meta"):
        model = LLaMA(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_keys(path: Path, keys: set[str], expected: dict[str, tuple[int, ...]]) -> None:
    unexpected = sorted(keys - set(expected))
    if unexpected:
        raise ConvertError(f"{path}: unexpected key {unexpected[0]!r}")
    missing = [key for key in expected if key not in keys]
    if missing:
        raise ConvertError(f"{path}: missing key {missing[0]!r}")


def find_tokenizer(*candidates: Path) -> tuple[Path, int]:
    """The first candidate that exists, checked to be a SentencePiece model, and its vocab size."""
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise ConvertError(f"{' or '.join(map(str, candidates))}: not found")
    try:
        return path, Tokenizer(path).vocab_size
    except (RuntimeError, OSError) as err:
        raise ConvertError(f"{path}: not a SentencePiece model ({err})") from None


def check_vocab(tokenizer: Path, tokenizer_vocab: int, config: Config) -> None:
    if tokenizer_vocab > config.vocab_size:
        raise ConvertError(
            f"{tokenizer}: {tokenizer_vocab} pieces, more than the model's vocab_size {config.vocab_size}"
        )


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConvertError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConvertError(f"{path}: bad JSON ({err})") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: expected a JSON object")
    return data


def tensor_specs(path: Path) -> dict[str, TensorSpec]:
    """Shape and dtype of every tensor in a weights file, read without loading the data."""
    if path.suffix == ".safetensors":
        with _safetensors(path) as f:
            slices = {key: f.get_slice(key) for key in f.keys()}  # noqa: SIM118 (a safe_open, not a dict)
            raw = {key: (piece.get_shape(), piece.get_dtype()) for key, piece in slices.items()}
        names = {name: dtype for dtype, name in DTYPE_NAMES.items()}
        specs = {key: (tuple(shape), names.get(dtype)) for key, (shape, dtype) in raw.items()}
    else:
        specs = {key: (tuple(t.shape), t.dtype) for key, t in _load_pickle(path).items()}
    for key, (_, dtype) in specs.items():
        if dtype not in DTYPE_NAMES:
            raise ConvertError(f"{path}: {key} is not a floating-point tensor")
    return specs


@contextmanager
def open_weights(path: Path) -> Iterator[Callable[[str], torch.Tensor]]:
    """A getter for the tensors of one file. They are memory-mapped: data is read when used,
    and the pages go when the file is closed and the last tensor taken from it is dropped."""
    if path.suffix == ".safetensors":
        with _safetensors(path) as f:
            yield f.get_tensor
    else:
        yield _load_pickle(path).__getitem__


def assemble(parts: list[Part], dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    """Our tensors in order, each joined from its pieces, reordered and cast (None: keep).

    The input files are opened afresh for each layer, so the pages read for one layer are
    released before the next is read."""
    for _, layer in groupby(parts, key=lambda part: part.name.split(".")[:2]):  # layers.N or top-level
        yield from _assemble_layer(list(layer), dtype)


def _assemble_layer(parts: list[Part], dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    with ExitStack() as stack:
        files = dict.fromkeys(f for part in parts for f, _ in part.pieces)
        get = {f: stack.enter_context(open_weights(f)) for f in files}
        for part in parts:
            pieces = [get[f](key) for f, key in part.pieces]
            tensor = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=part.split_dim)
            del pieces
            if part.hf_heads:
                tensor = from_hf_rows(tensor.contiguous(), part.hf_heads)
            tensor = tensor.to(dtype or tensor.dtype)
            yield part.name, tensor
            del tensor  # written by now: free it before the next one is made


def _safetensors(path: Path) -> Any:
    try:
        return safe_open(path, framework="pt", device="cpu")
    except (SafetensorError, OSError) as err:
        raise ConvertError(f"{path}: cannot read as safetensors ({err})") from None


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        named = re.search(r"GLOBAL ([\w.]+)", str(err))
        raise ConvertError(
            f"{path}: refused: the pickle holds Python objects, not only tensors, and loading them "
            f"could run code{f' (it would call {named[1]})' if named else ''}"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        detail = str(err).strip().split(". ")[0] or type(err).__name__
        raise ConvertError(f"{path}: cannot read as a PyTorch checkpoint, truncated? ({detail})") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ConvertError(f"{path}: expected a dict of tensors")
    return state


def parse_size(text: str) -> int:
    """Bytes from `2GB`, `500MB`, `64KB` or a plain number (decimal units, as Hugging Face's)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]?)B?", text.strip().upper())
    if not match or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 2GB or 500MB)")
    return int(float(match[1]) * {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}[match[2]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--from", dest="source", required=True, choices=tuple(PLANNERS), help="input layout")
    parser.add_argument("--input", required=True, type=Path, help="folder of the checkpoint to convert")
    parser.add_argument("--output", required=True, type=Path, help="checkpoint folder to create")
    parser.add_argument(
        "--dtype", choices=tuple(DTYPES), default="keep", help="stored dtype (default keep: as in the input)"
    )
    parser.add_argument(
        "--shard-size", type=parse_size, default=SHARD_BYTES, help="largest weights file (default 2GB)"
    )
    parser.add_argument(
        "--max-seq-len",
        type=int,
        help="longest sequence to set the model up for (default: hf max_position_embeddings; meta 2048)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    args = parser.parse_args(argv)

    try:
        summary = convert(args.source, args.input, args.output, args.dtype, args.shard_size, args.max_seq_len)
    except ConvertError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary))
    gigabytes = summary["bytes"] / 1e9
    size = f"{gigabytes:.2f} GB" if gigabytes >= 1 else f"{summary['bytes'] / 1e6:.1f} MB"
    size += f" of {'/'.join(summary['stored_dtypes'])} in {len(summary['files'])} file(s)"
    print(
        f"converted {args.source} checkpoint {args.input} to {args.output}: "
        f"{summary['parameters']:,} parameters, {size}, {summary['seconds']} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
