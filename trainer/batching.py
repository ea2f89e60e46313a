"""Prepared samples to model inputs: the order they are drawn in, packing, padding, shifting, and
the loss.

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
    position_ids: torch.Tensor | None = None  # (B, T) packed rows: each token's place in its sample
    document_ids: torch.Tensor | None = None  # (B, T) packed rows: which sample of its row; -1 padding

    def pinned(self) -> Batch:
        """The batch in page-locked memory, so its copy to a GPU can run without stopping the host."""
        return Batch(*(t.pin_memory() if isinstance(t, torch.Tensor) else t for t in self))

    def to(self, device: torch.device) -> Batch:
        move = (t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t for t in self)
        return Batch(*move)


def collate(rows: list[Row] | list[list[Row]], length: int | None = None) -> Batch:
    """Micro-batch rows, each one sample or several packed end to end, shifted by one (position t
    predicts token t + 1 of the same sample) and right-padded to the longest row, or to `length`.

    Padding sits after each row's samples, so causal attention never lets a real token see it.
    A packed row also gets each token's position within its sample and the sample it belongs to,
    from which the model confines attention to each sample and restarts RoPE positions; a sample
    never predicts the first token of the next."""
    rows = [row if isinstance(row, list) else [row] for row in rows]
    sizes = [sum(len(sample["input_ids"]) - 1 for sample in row) for row in rows]
    T = max(sizes) if length is None else length
    inputs = torch.zeros(len(rows), T, dtype=torch.long)  # (B, T)
    targets = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    packed = any(len(row) > 1 for row in rows)
    positions = torch.zeros(len(rows), T, dtype=torch.long) if packed else None
    documents = torch.full((len(rows), T), -1, dtype=torch.long) if packed else None
    for i, row in enumerate(rows):
        at = 0
        for j, sample in enumerate(row):
            n = len(sample["input_ids"]) - 1
            inputs[i, at : at + n] = sample["input_ids"][:-1]
            targets[i, at : at + n] = sample["labels"][1:]
            if packed:
                positions[i, at : at + n] = torch.arange(n)
                documents[i, at : at + n] = j
            at += n
    return Batch(inputs, targets, sum(sizes), positions, documents)


def loss_on(model: nn.Module, batch: Batch, device: torch.device, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over the batch's targets: their mean, or with reduction="sum" their sum, which
    lets a caller weight every target token equally across micro-batches of different sizes."""
    batch = batch.to(device)
    logits = model(batch.inputs, position_ids=batch.position_ids, document_ids=batch.document_ids)
    return F.cross_entropy(
        logits.flatten(0, 1).float(), batch.targets.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction
    )  # logits (B, T, vocab_size)


def target_count(row: Row) -> int:
    """Tokens of a sample that the loss is taken on, once shifted as `collate` shifts it."""
    return int((row["labels"][1:] != IGNORE_INDEX).sum())


def pack(indices: list[int], sizes: list[int], capacity: int) -> list[list[int]]:
    """Samples into rows of at most `capacity` positions, longest first, each into the fullest
    row it still fits (best-fit decreasing: rows end nearly full). `sizes[i]` is the positions
    sample i takes once shifted."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(indices, key=lambda i: sizes[i], reverse=True):
        fits = [r for r, room in enumerate(free) if room >= sizes[i]]
        if fits:
            r = min(fits, key=lambda r: free[r])
            rows[r].append(i)
            free[r] -= sizes[i]
        else:
            rows.append([i])
            free.append(capacity - sizes[i])
    return rows


class BatchSampler:
    """Micro-batches of rows, each row a list of sample indices, epoch after epoch, every sample
    once per epoch.

    Each epoch is a fresh permutation drawn from the sampler's own generator, so the order
    depends on the seed alone. A row is one sample, or, with `pack_capacity`, several packed into
    `pack_capacity` positions (windows of the permutation packed best-fit, the rows then
    shuffled), so almost no position is padding. With `length_grouped` (unpacked rows), the
    permutation is cut into windows of MEGA_BATCH micro-batches, each window sorted by length and
    cut into micro-batches, and the micro-batches shuffled: samples of similar length share a
    batch and little is padded, while the steps still see long and short batches in random
    order. A last, short micro-batch stays at the end of its epoch.

    `state_dict` holds tensors and ints only, so a checkpoint restores the exact position.
    """

    def __init__(
        self,
        lengths: list[int],
        micro_batch_size: int,
        seed: int,
        length_grouped: bool,
        pack_capacity: int | None = None,
    ) -> None:
        if not lengths:
            raise ValueError("no samples to draw batches from")
        if pack_capacity is not None and max(lengths) - 1 > pack_capacity:
            raise ValueError(f"a sample of {max(lengths)} tokens does not fit packed rows of {pack_capacity}")
        self.lengths = lengths
        self.micro_batch_size = micro_batch_size
        self.length_grouped = length_grouped
        self.pack_capacity = pack_capacity
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self.rows = self._draw_rows()
        self.index = 0  # rows of this epoch already drawn

    def next(self) -> list[list[int]]:
        if self.index >= len(self.rows):
            self.epoch += 1
            self.rows = self._draw_rows()
            self.index = 0
        batch = self.rows[self.index : self.index + self.micro_batch_size]
        self.index += len(batch)
        return batch

    def _draw_rows(self) -> list[list[int]]:
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        if self.pack_capacity is not None:
            return self._packed_rows(order)
        if not self.length_grouped:
            return [[i] for i in order]
        mb, window = self.micro_batch_size, self.micro_batch_size * MEGA_BATCH
        batches: list[list[int]] = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: self.lengths[i], reverse=True)
            batches += [chunk[i : i + mb] for i in range(0, len(chunk), mb)]
        full = [b for b in batches if len(b) == mb]
        short = [b for b in batches if len(b) < mb]  # at most one, from the last window
        shuffled = [full[i] for i in torch.randperm(len(full), generator=self.generator).tolist()]
        return [[i] for batch in shuffled + short for i in batch]

    def _packed_rows(self, order: list[int]) -> list[list[int]]:
        sizes = [n - 1 for n in self.lengths]
        window = self.micro_batch_size * MEGA_BATCH * 4  # samples: several per row
        rows = [
            row
            for start in range(0, len(order), window)
            for row in pack(order[start : start + window], sizes, self.pack_capacity)
        ]
        return [rows[i] for i in torch.randperm(len(rows), generator=self.generator).tolist()]

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "index": self.index,
            "order": torch.tensor([i for row in self.rows for i in row], dtype=torch.long),
            "row_sizes": torch.tensor([len(row) for row in self.rows], dtype=torch.long),
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
        flat = iter(state["order"].tolist())
        self.rows = [[next(flat) for _ in range(n)] for n in state["row_sizes"].tolist()]
        self.generator.set_state(state["generator"])


def padding_fraction(batches: list[list[list[int]]], lengths: list[int], length: int | None = None) -> float:
    """Share of the input positions of these micro-batches that are padding; `lengths` are the
    samples' lengths before the shift, `length` the fixed row length of packed micro-batches."""
    sizes = [[sum(lengths[i] - 1 for i in row) for row in batch] for batch in batches]
    real = sum(map(sum, sizes))
    total = sum(len(batch) * (length or max(batch)) for batch in sizes)
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
    lengths, length = sampler.lengths, sampler.pack_capacity
    samples = [i for batch in plan for row in batch for i in row]
    return GlobalBatch(
        own=[collate([[rows[i] for i in row] for row in batch], length) for batch in plan[rank::world_size]],
        tokens=sum(lengths[i] - 1 for i in samples),
        targets=sum(targets[i] for i in samples),
        padding=padding_fraction(plan, lengths, length),
    )
