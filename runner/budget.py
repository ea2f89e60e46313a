"""Budgets: the estimate checked before a run pays for anything, and what is left of the caps
while it trains (the watchdog on the host enforces that, see remote_scripts/watchdog.py)."""

from __future__ import annotations

from collections.abc import Iterable

from runner.cost import Interval, totals
from runner.errors import BudgetExceeded
from runner.files import json_objects
from runner.spec import JobSpec, Pricing


def check_estimate(spec: JobSpec, pricing: Pricing) -> str | None:
    """Refuse a run whose expected hours at the job's rates (runner.pricing.for_job) exceed a
    cap, or whose GPU rate is over budget.max_hourly_price; the estimate, if any."""
    budget = spec.budget
    check_hourly_price(spec, pricing.currency, pricing.gpu_per_hour, pricing.currency, "the job's pricing")
    gpu_h, cpu_h = budget.expected_gpu_hours, budget.expected_cpu_hours
    if gpu_h is None and cpu_h is None:
        return None
    gpu_h, cpu_h = gpu_h or 0.0, cpu_h or 0.0
    estimate = gpu_h * pricing.gpu_per_hour + cpu_h * pricing.cpu_per_hour
    text = (
        f"estimated {estimate:.2f} {pricing.currency}: {gpu_h:g} GPU h at {pricing.gpu_per_hour:g}/h"
        f" + {cpu_h:g} no-GPU h at {pricing.cpu_per_hour:g}/h"
    )
    if budget.max_cost is not None and estimate > budget.max_cost:
        raise BudgetExceeded(f"{text}, over budget.max_cost {budget.max_cost:g}")
    if budget.max_gpu_hours is not None and gpu_h > budget.max_gpu_hours:
        raise BudgetExceeded(
            f"{gpu_h:g} expected GPU hours are over budget.max_gpu_hours {budget.max_gpu_hours:g}"
        )
    return text


def check_hourly_price(spec: JobSpec, job_currency: str, price: float, currency: str, source: str) -> None:
    """Refuse a GPU dearer per hour than budget.max_hourly_price (in the job's currency)."""
    cap = spec.budget.max_hourly_price
    if cap is None:
        return
    if currency != job_currency:
        raise BudgetExceeded(
            f"{source} gives the GPU's price in {currency}; budget.max_hourly_price is in"
            f" {job_currency} (set pricing.currency to compare them)"
        )
    if price > cap:
        raise BudgetExceeded(
            f"{source} puts the GPU at {price:g} {currency}/h, over budget.max_hourly_price {cap:g}"
        )


def seconds_left(
    spec: JobSpec, billed: Iterable[Interval], gpu_rate: float, currency: str, now: float
) -> float | None:
    """Seconds of GPU time the caps still allow the run (None without caps), from what the
    ledger billed it so far, the GPU boot running now included."""
    budget = spec.budget
    spent = totals(billed, now)
    left: list[float] = []
    if budget.max_gpu_hours is not None:
        used = sum(t.seconds.get("gpu", 0.0) for t in spent)
        left.append(budget.max_gpu_hours * 3600 - used)
    if budget.max_cost is not None and gpu_rate > 0:
        cost = sum(t.total for t in spent if t.currency == currency)
        left.append((budget.max_cost - cost) / gpu_rate * 3600)
    return min(left) if left else None


def watchdog_decisions(text: str) -> list[dict]:
    """The decisions a watchdog.log holds (one JSON object per line; others are skipped)."""
    return json_objects(text)


def watchdog_stop(watchdog_log: str) -> dict | None:
    """The watchdog's decision to stop the trainer, if it made one: its `reason`, and `budget`
    true when a cap made it."""
    return next((e for e in watchdog_decisions(watchdog_log) if e.get("action") == "stop"), None)
