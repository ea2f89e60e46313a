"""Fine-tuning: schedule, batch order, optimizer, loss normalisation, precision, and the whole
pipeline run as the smoke job runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import trainer
from tests.trainer.test_resume import tiny_config, write_tiny_inputs
from trainer.batching import BatchSampler, collate, draw_global_batch, padding_fraction
from trainer.data import IGNORE_INDEX
from trainer.devices import Dist
from trainer.finetune import TrainConfig, build_optimizer, lr_at, main, optimizer_step, setup, train
from trainer.lora import LoRAConfig, apply_lora
from trainer.model import Config, LLaMA

REPO = Path(trainer.__file__).resolve().parents[1]
CPU = Dist(0, 1, torch.device("cpu"))
unit = pytest.mark.unit


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train faster on one thread, and so do tests sharing a few cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(**overrides) -> TrainConfig:
    return TrainConfig(**{"checkpoint_dir": "c", "data_dir": "d", "out_dir": "o", **overrides})


@unit
def test_warm_up_then_cosine_to_a_tenth():
    cfg = config(lr=1e-3, warmup_steps=10, max_steps=110)
    assert lr_at(5, cfg) == pytest.approx(5e-4)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(5.5e-4)
    assert lr_at(110, cfg) == pytest.approx(1e-4)


@unit
def test_collate_pads_to_the_longest_sample_and_shifts():
    rows = [
        {"input_ids": torch.tensor([1, 5, 6, 2]), "labels": torch.tensor([-100, 5, 6, 2])},
        {"input_ids": torch.tensor([1, 7, 2]), "labels": torch.tensor([-100, 7, 2])},
    ]
    batch = collate(rows)
    assert batch.inputs.tolist() == [[1, 5, 6], [1, 7, 0]]
    assert batch.targets.tolist() == [[5, 6, 2], [7, 2, IGNORE_INDEX]]
    assert batch.tokens == 5


@unit
@pytest.mark.parametrize(
    "bad",
    [
        dict(warmup_steps=100, max_steps=100),
        dict(precision="fp16"),
        dict(precision="bf16"),
        dict(lora_r=0),
        dict(save_interval=-1),
        dict(keep_checkpoints=0),
        dict(weight_decay=-0.1),
    ],
)
def test_config_is_validated(bad):
    with pytest.raises(ValueError):
        config(**bad)


@unit
def test_bad_flags_exit_2_with_one_line(capsys):
    assert main(["--checkpoint-dir", "c", "--data-dir", "d", "--out", "o", "--precision", "fp16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: precision must be one of auto, fp32, bf16-true, bf16-mixed")
    assert err.count("\n") == 1


def epochs(sampler: BatchSampler, n: int) -> list[list[list[list[int]]]]:
    """The micro-batches (each a list of rows, each row a list of samples) of the sampler's next
    `n` epochs."""
    out: list[list[list[list[int]]]] = []
    for _ in range(n):
        out.append([])
        while sum(len(row) for batch in out[-1] for row in batch) < len(sampler.lengths):
            out[-1].append(sampler.next())
    return out


@unit
@pytest.mark.parametrize("grouped", [False, True])
def test_every_epoch_is_a_permutation_and_the_order_follows_the_seed(grouped):
    lengths = torch.randint(5, 200, (203,), generator=torch.Generator().manual_seed(0)).tolist()
    first, second = epochs(BatchSampler(lengths, 8, seed=1, length_grouped=grouped), 2)
    for epoch in (first, second):
        assert sorted(i for batch in epoch for row in batch for i in row) == list(range(203))
        assert [len(b) for b in epoch] == [8] * 25 + [3]  # the short batch last
        assert all(len(row) == 1 for batch in epoch for row in batch)  # unpacked: a sample a row
    assert first != second
    assert epochs(BatchSampler(lengths, 8, seed=1, length_grouped=grouped), 1)[0] == first
    assert epochs(BatchSampler(lengths, 8, seed=2, length_grouped=grouped), 1)[0] != first


@unit
def test_length_grouping_cuts_padding_and_still_mixes_lengths_across_steps():
    lengths = torch.randint(5, 200, (1024,), generator=torch.Generator().manual_seed(0)).tolist()
    random_order = epochs(BatchSampler(lengths, 8, seed=1, length_grouped=False), 1)[0]
    grouped = epochs(BatchSampler(lengths, 8, seed=1, length_grouped=True), 1)[0]
    assert padding_fraction(random_order, lengths) > 0.3
    assert padding_fraction(grouped, lengths) < 0.05
    longest = [max(lengths[row[0]] for row in batch) for batch in grouped]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)


@unit
def test_sampler_state_round_trips_mid_epoch():
    lengths = list(range(2, 52))
    sampler = BatchSampler(lengths, 4, seed=3, length_grouped=True)
    for _ in range(20):  # into the second epoch
        sampler.next()
    state = sampler.state_dict()
    assert all(isinstance(v, (int, torch.Tensor)) for v in state.values())
    expected = [sampler.next() for _ in range(30)]
    restored = BatchSampler(lengths, 4, seed=99, length_grouped=True)
    restored.load_state_dict(state)
    assert [restored.next() for _ in range(30)] == expected


@unit
def test_processes_split_each_global_batch_and_agree_on_its_counts():
    rows = [{"input_ids": torch.arange(n), "labels": torch.arange(n)} for n in range(3, 23)]
    lengths, targets = list(range(3, 23)), list(range(2, 22))

    def steps(rank: int, world_size: int, grad_accum: int) -> list:
        sampler = BatchSampler(lengths, 2, seed=0, length_grouped=True)
        return [draw_global_batch(sampler, rows, targets, grad_accum, rank, world_size) for _ in range(3)]

    single, first, second = steps(0, 1, 4), steps(0, 2, 2), steps(1, 2, 2)
    for one, a, b in zip(single, first, second, strict=True):
        assert one.targets == a.targets == b.targets and one.tokens == a.tokens == b.tokens
        assert len(a.own) == len(b.own) == 2
        shared = [batch.inputs.tolist() for batch in a.own + b.own]
        assert sorted(shared) == sorted(batch.inputs.tolist() for batch in one.own)


def small_lora_model(**lora) -> LLaMA:
    torch.manual_seed(0)
    model = LLaMA(Config(vocab_size=40, n_layer=1, n_head=2, n_kv_head=2, n_embd=16, intermediate_size=32))
    return apply_lora(model, LoRAConfig(**{"dropout": 0.0, **lora}))


@unit
def test_weight_decay_applies_to_matrices_only():
    model = small_lora_model()
    model.norm.weight.requires_grad_(True)  # a trainable vector, to show it is left alone
    optimizer = build_optimizer(model, config(weight_decay=0.1), torch.device("cpu"))
    decay = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    assert decay[id(model.norm.weight)] == 0.0
    lora_a = model.layers[0].attention.wq.lora_a
    assert decay[id(lora_a)] == 0.1
    assert len(decay) == sum(p.requires_grad for p in model.parameters())

    with torch.no_grad():
        model.layers[0].attention.wq.lora_b.fill_(1.0)
    before = model.layers[0].attention.wq.lora_b.clone()
    model.layers[0].attention.wq.lora_b.grad = torch.zeros_like(before)
    optimizer.step()  # a zero gradient: only the decay moves the weight, by lr * wd
    torch.testing.assert_close(model.layers[0].attention.wq.lora_b, before * (1 - 3e-4 * 0.1))


@unit
def test_accumulated_micro_batches_weigh_every_token_equally():
    """Two micro-batches of different lengths give the gradient of one batch holding both."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for length in (30, 30, 6, 5):
        ids = torch.randint(0, 40, (length,), generator=gen)
        rows.append({"input_ids": ids, "labels": ids})
    targets = sum(len(row["input_ids"]) - 1 for row in rows)
    cfg = config(grad_clip=0.0)

    def update(batches) -> torch.Tensor:
        model = small_lora_model()
        model.layers[0].attention.wq.lora_b.data.normal_(generator=torch.Generator().manual_seed(1))
        before = model.layers[0].attention.wq.lora_a.detach().clone()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        optimizer_step(model, optimizer, batches, 1 / targets, cfg, torch.device("cpu"), "fp32")
        return before - model.layers[0].attention.wq.lora_a.detach()

    together = update([collate(rows)])
    assert together.abs().min() > 0  # every entry moved: the comparison below is not vacuous
    torch.testing.assert_close(update([collate(rows[:2]), collate(rows[2:])]), together)


@unit
@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_bf16_precisions_keep_adapters_in_float32(precision, tmp_path):
    inputs = write_tiny_inputs(tmp_path)
    cfg = tiny_config(inputs, tmp_path / "out", precision=precision, max_steps=3, save_interval=0)
    run = setup(cfg, CPU, None, lambda _: None)
    weights = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert run.model.layers[0].attention.wq.base.weight.dtype == weights
    assert run.model.layers[0].attention.wq.lora_a.dtype == torch.float32
    summary = train(cfg, lambda _: None)
    assert summary["precision"] == precision and summary["final_loss"] < 10
    adapters = load_file(tmp_path / "out" / "lora.safetensors")
    assert {tensor.dtype for tensor in adapters.values()} == {torch.float32}


@unit
def test_activation_checkpointing_reaches_the_model_and_changes_no_numbers(tmp_path):
    inputs = write_tiny_inputs(tmp_path)
    plain = tiny_config(inputs, tmp_path / "plain", max_steps=3, save_interval=0)
    checkpointed = tiny_config(
        inputs, tmp_path / "ckpt", max_steps=3, save_interval=0, activation_checkpointing="all"
    )
    assert setup(checkpointed, CPU, None, lambda _: None).model.checkpointed_layers == 2
    assert setup(plain, CPU, None, lambda _: None).model.checkpointed_layers == 0
    assert train(checkpointed, lambda _: None)["final_loss"] == pytest.approx(
        train(plain, lambda _: None)["final_loss"], rel=1e-5
    )


def run(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", *args, "--json"], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def finetune(data: Path, out: Path) -> dict:
    return run(
        "trainer.finetune",
        "--checkpoint-dir",
        str(data / "checkpoint"),
        "--data-dir",
        str(data / "prepared"),
        "--out",
        str(out),
        "--max-steps",
        "40",
        "--micro-batch-size",
        "8",
        "--lr",
        "3e-3",
        "--eval-interval",
        "20",
        "--seed",
        "7",
    )


@pytest.mark.e2e
def test_pipeline_learns(tmp_path):
    """The smoke job's steps in subprocesses. (That the same seed gives the same bits is tested
    in test_resume.py, on a smaller model.)"""
    data = tmp_path / "data"
    records, tok = str(data / "instructions.json"), str(data / "tokenizer.model")
    run("trainer.synthetic", "--out", records, "--count", "300", "--seed", "7")
    run("trainer.tokenizer", "train", "--input", records, "--vocab-size", "600", "--out", tok)
    run(
        "trainer.init_model",
        "--config",
        "tiny",
        "--tokenizer",
        tok,
        "--out",
        str(data / "checkpoint"),
        "--seed",
        "7",
    )
    manifest = run(
        "trainer.prepare",
        "--input",
        records,
        "--tokenizer",
        str(data / "checkpoint" / "tokenizer.model"),
        "--out",
        str(data / "prepared"),
        "--max-seq-length",
        "128",
        "--test-size",
        "30",
        "--seed",
        "7",
    )
    assert (manifest["train"], manifest["test"], manifest["dropped"]) == (270, 30, 0)

    summary = finetune(data, tmp_path / "run1")
    lines = [json.loads(line) for line in (tmp_path / "run1" / "metrics.jsonl").open()]
    losses = [line["loss"] for line in lines if "loss" in line]
    assert len(losses) == summary["steps"] == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0
    assert [line["step"] for line in lines if "val_loss" in line] == [20, 40]
    fields = {"step", "loss", "lr", "tokens", "tokens_per_s", "padding", "peak_mem_gib", "elapsed_s"}
    assert fields <= set(lines[0])
    assert 0 < lines[0]["peak_mem_gib"] < 8 and 0 < summary["padding"] < 0.5

    with safe_open(tmp_path / "run1" / "lora.safetensors", framework="pt") as adapters:
        keys = set(adapters.keys())
        lora_config = json.loads(adapters.metadata()["lora_config"])
    assert keys and all(k.endswith((".lora_a", ".lora_b")) for k in keys)
    assert len(keys) == 2 * 2 * 2  # two layers, q and v, A and B
    assert lora_config["targets"] == ["q", "v"]
    environment = json.loads((tmp_path / "run1" / "environment.json").read_text())
    assert environment["torch"] == torch.__version__ and environment["device"] == "cpu"
    assert environment["python"].count(".") == 2 and "gpu" not in environment  # no GPU here
    with safe_open(tmp_path / "run1" / "lora.safetensors", framework="pt") as adapters:
        saved = sum(adapters.get_tensor(key).numel() for key in adapters.keys())  # noqa: SIM118 (safe_open is not iterable)
    assert environment["model"]["n_layer"] == 2 and environment["model"]["lora_params"] == saved
