"""How much memory a LoRA fine-tune needs, and how few blocks must recompute their activations
for it to fit a budget (`--activation-checkpointing auto --memory-budget-gib N`).

    peak = static (weights, buffers, adapter gradients, AdamW state)
         + (n_layer - k) x what a block keeps for backward + k x what a checkpointed block keeps
         + what the final norm, output layer and loss keep
         + the largest transient of backward (the logits' gradient, or one block's recomputation)

where k blocks are checkpointed. What a block keeps is measured, not guessed: one forward pass
of one adapted block, on the run's device and in its dtype, at the micro-batch's shape, counting
the bytes of every tensor autograd saves for backward (each storage once, weights left out: they
are in the static part). The attention kernel the device picks (flash on CUDA and CPU keeps
the output and a log-sum-exp per row, not a T x T matrix) is the one measured. A checkpointed
block keeps only its input, B x T x n_embd elements.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.devices import DeviceError
from trainer.model import LLaMA, document_mask

CHECKPOINTING = ("off", "all", "auto")
# The caching allocator rounds blocks up and cannot always reuse freed ones: the estimate is
# raised by this share, plus CUDA's own context, before it is held against a budget.
FRAGMENTATION = 0.05
CONTEXT_BYTES = 512 << 20


class MemoryBudgetError(DeviceError):
    """A budget that even checkpointing every block does not meet."""


@dataclass(frozen=True)
class MemoryPlan:
    static: int
    per_layer: int  # what one block keeps for backward
    per_checkpointed_layer: int  # what a checkpointed block keeps: its input
    head: int
    logits_grad: int
    n_layer: int

    def peak(self, checkpointed: int) -> int:
        """Estimated peak bytes with the first `checkpointed` blocks checkpointed."""
        kept = (self.n_layer - checkpointed) * self.per_layer + checkpointed * self.per_checkpointed_layer
        transient = max(self.logits_grad, self.per_layer if checkpointed else 0)
        return round((self.static + kept + self.head + transient) * (1 + FRAGMENTATION)) + CONTEXT_BYTES

    def fewest_checkpointed(self, budget: int) -> int:
        """The fewest blocks to checkpoint for the peak to fit `budget` bytes."""
        for k in range(self.n_layer + 1):
            if self.peak(k) <= budget:
                return k
        raise MemoryBudgetError(
            f"even with every block checkpointed the run needs about {gib(self.peak(self.n_layer)):.1f} GiB, "
            f"more than the budget of {gib(budget):.1f} GiB: lower --micro-batch-size or --max-seq-length"
        )


def gib(n: int) -> float:
    return n / 2**30


def saved_bytes(fn, *inputs: torch.Tensor, exclude: set[int] = frozenset()) -> int:
    """Bytes of the tensors autograd saves while `fn(*inputs)` runs, each storage once, leaving
    out storages whose address is in `exclude`."""
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn(*inputs)
    return sum(seen.values())


def plan(model: LLaMA, micro_batch_size: int, seq_len: int, packed: bool) -> MemoryPlan:
    """Measure the model as set up for training (adapters applied, on its device, in its dtype)
    for micro-batches of `micro_batch_size` rows of `seq_len` tokens. The random streams are
    left as they were: the measurement draws inputs and dropout masks the run must not miss."""
    weight = model.tok_embeddings.weight
    with torch.random.fork_rng(devices=[weight.device] if weight.device.type == "cuda" else []):
        return _measure(model, micro_batch_size, seq_len, packed)


def _measure(model: LLaMA, micro_batch_size: int, seq_len: int, packed: bool) -> MemoryPlan:
    weight = model.tok_embeddings.weight
    device, dtype, C = weight.device, weight.dtype, model.config.n_embd
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weights |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    B, T = micro_batch_size, seq_len
    x = torch.randn(B, T, C, device=device, dtype=dtype, requires_grad=True)
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    mask = None
    if packed:  # two samples a row: the mask's shape, whatever the split
        mask = document_mask(torch.arange(T, device=device).ge(T // 2).long().expand(B, T))
    block = model.layers[0]
    per_layer = saved_bytes(lambda h: block(h, cos, sin, mask, None), x, exclude=weights)
    targets = torch.zeros(B * T, dtype=torch.long, device=device)

    def head(h: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model.output(model.norm(h)).flatten(0, 1).float(), targets, reduction="sum")

    head_bytes = saved_bytes(head, x, exclude=weights)
    del x
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Each adapter weight: its gradient and AdamW's two moments, all float32.
    optimizer = sum(3 * p.numel() * 4 for p in trainable)
    static = sum(_nbytes(t) for t in (*model.parameters(), *model.buffers())) + optimizer
    vocab = model.config.vocab_size
    return MemoryPlan(
        static=static,
        per_layer=per_layer,
        per_checkpointed_layer=B * T * C * weight.element_size(),
        head=head_bytes,
        logits_grad=B * T * vocab * (4 + weight.element_size()),  # float32 for the loss, then the model's
        n_layer=model.config.n_layer,
    )


def _nbytes(t: torch.Tensor | nn.Parameter) -> int:
    return t.numel() * t.element_size()
