"""Prepared samples to model inputs: padding, shifting, and the loss over a batch.

Shared by fine-tuning and evaluation so both see exactly the same targets.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from trainer.data import IGNORE_INDEX
from trainer.model import LLaMA

Row = dict[str, torch.Tensor]


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


def loss_on(model: LLaMA, batch: Batch, device: torch.device) -> torch.Tensor:
    logits = model(batch.inputs.to(device))  # (B, T, vocab_size)
    targets = batch.targets.to(device)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
