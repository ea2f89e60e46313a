"""Prepared samples to model inputs: the order they are drawn in, padding, shifting, and the loss.

Shared by fine-tuning and evaluation so both see exactly the same targets.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.data import IGNORE_INDEX

Row = dict[str, torch.Tensor]

# Length grouping sorts within windows of this many micro-batches: wide enough that a sample
# finds others of about its length, while in data sets many windows long, which samples share
# a window, and so a batch, still changes from epoch to epoch.
MEGA_BATCH = 64


class Batch(NamedTuple):
    inputs: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T), IGNORE_INDEX where no loss is taken
    tokens: int  # real (not padding) input tokens


def collate(rows: list[Row]) -> Batch:
    """Right-pad to the longest sample and shift by one: position t predicts token t + 1.
    Padding sits after each sample, so causal attention never lets a real token see it."""
    T = max(len(row["input_ids"]) for row in rows) - 1
    inputs = torch.zeros(len(rows), T, dtype=torch.long)  # (B, T)
    targets = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for i, row in enumerate(rows):
        n = len(row["input_ids"]) - 1
        inputs[i, :n] = row["input_ids"][:-1]
        targets[i, :n] = row["labels"][1:]
    return Batch(inputs, targets, sum(len(row["input_ids"]) - 1 for row in rows))


def loss_on(model: nn.Module, batch: Batch, device: torch.device, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over the batch's targets: their mean, or with reduction="sum" their sum, which
    lets a caller weight every target token equally across micro-batches of different sizes."""
    logits = model(batch.inputs.to(device))  # (B, T, vocab_size)
    targets = batch.targets.to(device)
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction
    )


def target_count(row: Row) -> int:
    """Tokens of a sample that the loss is taken on, once shifted as `collate` shifts it."""
    return int((row["labels"][1:] != IGNORE_INDEX).sum())


class BatchSampler:
    """Micro-batches of row indices, epoch after epoch, every sample once per epoch.

    Each epoch is a fresh permutation drawn from the sampler's own generator, so the order
    depends on the seed alone. With `length_grouped`, the permutation is cut into windows of
    MEGA_BATCH micro-batches, each window sorted by length and cut into micro-batches, and the
    micro-batches shuffled: samples of similar length share a batch and little is padded, while
    the steps still see long and short batches in random order. A last, short micro-batch
    stays at the end of its epoch.

    `state_dict` holds tensors and ints only, so a checkpoint restores the exact position.
    """

    def __init__(self, lengths: list[int], micro_batch_size: int, seed: int, length_grouped: bool) -> None:
        if not lengths:
            raise ValueError("no samples to draw batches from")
        self.lengths = lengths
        self.micro_batch_size = micro_batch_size
        self.length_grouped = length_grouped
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self.order = self._draw_order()
        self.index = 0

    def next(self) -> list[int]:
        if self.index >= len(self.order):
            self.epoch += 1
            self.order = self._draw_order()
            self.index = 0
        batch = self.order[self.index : self.index + self.micro_batch_size]
        self.index += len(batch)
        return batch

    def _draw_order(self) -> list[int]:
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        if not self.length_grouped:
            return order
        mb, window = self.micro_batch_size, self.micro_batch_size * MEGA_BATCH
        batches: list[list[int]] = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: self.lengths[i], reverse=True)
            batches += [chunk[i : i + mb] for i in range(0, len(chunk), mb)]
        full = [b for b in batches if len(b) == mb]
        short = [b for b in batches if len(b) < mb]  # at most one, from the last window
        shuffled = [full[i] for i in torch.randperm(len(full), generator=self.generator).tolist()]
        return [i for batch in shuffled + short for i in batch]

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "index": self.index,
            "order": torch.tensor(self.order, dtype=torch.long),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["order"]) != len(self.lengths):
            raise ValueError(
                f"the saved batch order covers {len(state['order'])} samples, the data has "
                f"{len(self.lengths)}"
            )
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])
        self.order = state["order"].tolist()
        self.generator.set_state(state["generator"])


def padding_fraction(batches: list[list[int]], lengths: list[int]) -> float:
    """Share of the input positions of these micro-batches that are padding; `lengths` are the
    samples' lengths before the shift."""
    real = sum(lengths[i] - 1 for batch in batches for i in batch)
    total = sum(len(batch) * (max(lengths[i] for i in batch) - 1) for batch in batches)
    return 1 - real / total if total else 0.0


class GlobalBatch(NamedTuple):
    own: list[Batch]  # this process's micro-batches
    tokens: int  # real input tokens of the whole global batch
    targets: int  # tokens the loss is taken on, in the whole global batch
    padding: float  # share of the global batch's input positions that are padding


def draw_global_batch(
    sampler: BatchSampler, rows: list[Row], targets: list[int], grad_accum: int, rank: int, world_size: int
) -> GlobalBatch:
    """Draw the micro-batches of one optimizer step for all processes, and take this process's
    share. Every process draws the same ones from an identical sampler, so none needs to be told
    its own, and each knows the counts of the whole global batch without asking the others."""
    plan = [sampler.next() for _ in range(grad_accum * world_size)]
    lengths = sampler.lengths
    return GlobalBatch(
        own=[collate([rows[i] for i in batch]) for batch in plan[rank::world_size]],
        tokens=sum(lengths[i] - 1 for batch in plan for i in batch),
        targets=sum(targets[i] for batch in plan for i in batch),
        padding=padding_fraction(plan, lengths),
    )
