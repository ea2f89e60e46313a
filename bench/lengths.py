"""Token lengths of Chinese instruction samples like instinwild_ch.json's, for the benchmarks.

The real file cannot be fetched here, so its lengths are modelled, from what is known of it and
of the LLaMA tokenizer, and every figure that depends on them says so:

- instinwild_ch holds about 51k self-instruct records written by ChatGPT: short instructions
  (median ~20 characters), an input in about a third of them (median ~40 characters), and
  answers of a paragraph or a list (median ~120 characters, long-tailed: lognormal, sigma 0.8).
- The LLaMA tokenizer has about 700 Chinese characters as single tokens; the rest fall back to
  3 byte tokens each. With the common characters making most of running text, that is ~1.8
  tokens per character on average.
- The Alpaca template around the prompt adds ~40 tokens, BOS and EOS 2.

That gives a median sample of ~300 tokens with a long tail (the 98th percentile ~1,000), which
is why 256 tokens cut the seed's answers. A user's own figures replace the model:
`prepare` writes the histogram of the real lengths into prepare.json, and the benchmarks take
it with --lengths-from.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

TOKENS_PER_CHAR = 1.8
TEMPLATE_TOKENS = 40
SPECIAL_TOKENS = 2  # BOS and EOS
SEED_RECORDS = 51_000


def _chars(rng: random.Random, median: float, sigma: float) -> float:
    return rng.lognormvariate(math.log(median), sigma)


def instinwild_like_lengths(n: int, seed: int = 0, max_len: int | None = None) -> list[int]:
    """`n` full sample lengths in tokens (prompt + answer + EOS), before any truncation, clipped
    to `max_len` where given."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        chars = _chars(rng, 20, 0.6) + _chars(rng, 120, 0.8)
        if rng.random() < 1 / 3:
            chars += _chars(rng, 40, 0.8)
        length = TEMPLATE_TOKENS + SPECIAL_TOKENS + round(TOKENS_PER_CHAR * chars)
        out.append(min(length, max_len) if max_len else length)
    return out


def lengths_from_histogram(path: Path, n: int, seed: int = 0, max_len: int | None = None) -> list[int]:
    """`n` lengths drawn from the histogram prepare wrote into `path` (prepare.json), uniform
    within each power-of-two bucket."""
    buckets = json.loads(path.read_text())["length_histogram"]
    ranges = [tuple(map(int, label.split("-"))) for label in buckets]
    weights = list(buckets.values())
    rng = random.Random(seed)
    out = []
    for low, high in rng.choices(ranges, weights=weights, k=n):
        length = rng.randint(low, high)
        out.append(min(length, max_len) if max_len else length)
    return out
