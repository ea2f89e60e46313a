"""The cost ledger: every billed interval of every instance, per power mode, and what it cost.

The controller opens an interval when it boots an instance and closes it when it sees the
instance off; the watchdog on the instance, which powers it off when training ends, reports the
moment it did so (its log comes home with the run), and that moment wins over the controller's
later observation. Intervals are kept as reported; `settled` turns them into a consistent
timeline per instance (sorted, never overlapping: where two reports cover the same seconds, the
more direct source keeps them), so the seconds are billed once whatever order the reports came
in. Totals never mix currencies.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace

SOURCES = ("provider", "watchdog", "controller")  # the most direct witness of a power state first


@dataclass(frozen=True)
class Interval:
    """One instance running in one mode, at one hourly rate, from started_at to ended_at
    (None while it still runs), as one source saw it."""

    instance_id: str
    mode: str  # "cpu" or "gpu"
    started_at: float
    ended_at: float | None
    rate_per_hour: float
    currency: str
    source: str
    run_id: str | None = None
    phase: str | None = None

    def end(self, now: float) -> float:
        return now if self.ended_at is None else self.ended_at

    def seconds(self, now: float) -> float:
        return max(0.0, self.end(now) - self.started_at)

    def cost(self, now: float) -> float:
        return self.seconds(now) * self.rate_per_hour / 3600.0

    def to_dict(self, now: float) -> dict:
        return {**asdict(self), "seconds": round(self.seconds(now), 3), "cost": round(self.cost(now), 6)}


def settled(intervals: Iterable[Interval], now: float) -> list[Interval]:
    """A timeline per instance in which no second is billed twice.

    Intervals are taken in order of source priority (SOURCES), then start; each keeps only the
    seconds no earlier-taken interval of the same instance covers (cut at the front, at the back,
    or split in two). Empty pieces are dropped; the result is sorted by instance and start.
    """
    kept: dict[str, list[Interval]] = {}
    for interval in sorted(intervals, key=lambda i: _precedence(i, now)):
        pieces = [interval]
        for taken in kept.get(interval.instance_id, []):
            pieces = [part for piece in pieces for part in _minus(piece, taken, now)]
        kept.setdefault(interval.instance_id, []).extend(p for p in pieces if p.seconds(now) > 0)
    return sorted((i for group in kept.values() for i in group), key=lambda i: (i.instance_id, i.started_at))


def _precedence(interval: Interval, now: float) -> tuple:
    """A total order, so the settlement never depends on the order reports arrived in: the
    more direct source first, then the earlier start, then the longer interval."""
    i = interval
    return (
        SOURCES.index(i.source),
        i.started_at,
        -i.end(now),
        i.mode,
        i.rate_per_hour,
        i.currency,
        i.run_id or "",
        i.phase or "",
    )


def _minus(piece: Interval, taken: Interval, now: float) -> list[Interval]:
    """The parts of piece outside taken."""
    start, end = piece.started_at, piece.end(now)
    t_start, t_end = taken.started_at, taken.end(now)
    if t_end <= start or end <= t_start:
        return [piece]
    parts = []
    if start < t_start:
        parts.append(replace(piece, ended_at=t_start))
    if t_end < end:
        parts.append(replace(piece, started_at=t_end))
    return parts


@dataclass(frozen=True)
class Total:
    currency: str
    seconds: dict[str, float]  # per mode
    cost: dict[str, float]  # per mode

    @property
    def total(self) -> float:
        return sum(self.cost.values())

    def to_dict(self) -> dict:
        return {
            "currency": self.currency,
            "seconds": {m: round(s, 3) for m, s in self.seconds.items()},
            "cost": {m: round(c, 6) for m, c in self.cost.items()},
            "total": round(self.total, 6),
        }


def totals(intervals: Iterable[Interval], now: float) -> list[Total]:
    """Seconds and cost per mode, one Total per currency (sorted by currency)."""
    by_currency: dict[str, Total] = {}
    for interval in settled(intervals, now):
        total = by_currency.setdefault(interval.currency, Total(interval.currency, {}, {}))
        total.seconds[interval.mode] = total.seconds.get(interval.mode, 0.0) + interval.seconds(now)
        total.cost[interval.mode] = total.cost.get(interval.mode, 0.0) + interval.cost(now)
    return [by_currency[c] for c in sorted(by_currency)]


def run_report(run_id: str, intervals: Iterable[Interval], now: float) -> dict:
    """A run's cost: its timeline (phase, mode, seconds, cost) and totals per currency;
    what runs/<id>/cost.json holds."""
    timeline = settled(intervals, now)
    return {
        "run_id": run_id,
        "timeline": [i.to_dict(now) for i in timeline],
        "totals": [t.to_dict() for t in totals(timeline, now)],
    }


def runs_report(runs: Iterable, ledger_of, now: float) -> dict:
    """The `runner cost` table: one row per run and currency (runs without billed intervals
    are left out), and totals per currency and per day, provider and currency."""
    rows = []
    for run in runs:
        for total in totals(ledger_of(run.id), now):
            rows.append(
                {
                    "run_id": run.id,
                    "job": run.job_name,
                    "provider": run.provider,
                    "status": run.status,
                    "day": time.strftime("%Y-%m-%d", time.localtime(run.created_at)),
                    "currency": total.currency,
                    "cpu_hours": round(total.seconds.get("cpu", 0.0) / 3600, 4),
                    "gpu_hours": round(total.seconds.get("gpu", 0.0) / 3600, 4),
                    "cpu_cost": round(total.cost.get("cpu", 0.0), 4),
                    "gpu_cost": round(total.cost.get("gpu", 0.0), 4),
                    "total": round(total.total, 4),
                }
            )
    return {
        "runs": rows,
        "totals": _sums(rows, ("currency",)),
        "by_day_provider": _sums(rows, ("day", "provider", "currency")),
    }


def _sums(rows: list[dict], keys: tuple[str, ...]) -> list[dict]:
    sums: dict[tuple, dict] = {}
    for row in rows:
        group = tuple(row[k] for k in keys)
        entry = sums.setdefault(
            group, {**dict(zip(keys, group, strict=True)), "gpu_hours": 0.0, "cpu_hours": 0.0, "total": 0.0}
        )
        for field in ("gpu_hours", "cpu_hours", "total"):
            entry[field] = round(entry[field] + row[field], 4)
    return [sums[group] for group in sorted(sums)]


def runs_csv(rows: list[dict]) -> str:
    """The `runner cost` table as CSV: one line per run and currency."""
    out = io.StringIO()
    fields = [
        "run_id",
        "job",
        "provider",
        "status",
        "day",
        "currency",
        "cpu_hours",
        "gpu_hours",
        "cpu_cost",
        "gpu_cost",
        "total",
    ]
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: row[key] for key in fields})
    return out.getvalue()
