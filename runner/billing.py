"""The ledger's side of an instance's power changes: an interval opened at every boot, closed
at every stop, and the report a run leaves in runs/<id>/cost.json.

Three witnesses say when an instance stopped billing, and the most direct one wins: the
provider's own stop time (AutoDL's `stopped_at`), the watchdog's power-off time (its log comes
home with the run), and last the moment the controller saw it off. A witness's time is taken
only where it lies inside the interval it ends, so a skewed clock can shorten or lengthen an
interval by no more than the controller's own observation allows.

The controller's own observation is made jump-proof where it can be: a boot and its stop seen
by one process are timed on a steady clock (steady_now: it counts suspend but no wall-clock
step, so an NTP correction or a hand-set clock on the laptop moves no interval's length), and
a boot never starts before the instance's previous interval ended.
"""

from __future__ import annotations

import time

from infra.base import Instance, PowerMode
from runner import budget, cost, pricing
from runner.spec import JobSpec
from runner.store import Store


def open_for_boot(
    store: Store,
    spec: JobSpec,
    run_id: str,
    phase: str | None,
    instance: Instance,
    mode: PowerMode,
    since: float,
) -> float | None:
    """Open the interval of a boot in mode that began at since, unless the open one already
    bills this mode (a resumed run finding the instance as it left it); the start of the
    interval opened, None if none was."""
    current = store.open_interval_of(instance.id)
    if current is not None and current.mode == mode.value:
        return None
    if current is not None:  # booted in the other mode since: that interval ended when asked
        store.close_interval(instance.id, since, "controller")
    ended = [i.ended_at for i in store.ledger(run_id) if i.instance_id == instance.id and i.ended_at]
    since = max([since, *ended])  # a laptop clock set back never makes two intervals overlap
    rate, currency = pricing.rate(spec, instance, mode)
    store.open_interval(
        cost.Interval(instance.id, mode.value, since, None, rate, currency, "controller", run_id, phase)
    )
    return since


def steady_now() -> float:
    """Seconds on a clock that counts suspend but no wall-clock step (Linux's CLOCK_BOOTTIME;
    elsewhere the monotonic clock)."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(boottime) if boottime is not None else time.monotonic()


def close_at_stop(
    store: Store, instance: Instance, seen_at: float, opened: tuple[float, float] | None = None
) -> None:
    """End the instance's open interval: at the provider's stop time when it reports one inside
    the interval, else at seen_at, when the controller saw it off. opened, (the interval's
    start, steady_now() then) when this process opened it, times the interval on the steady
    clock instead of the wall clock that seen_at is read from."""
    current = store.open_interval_of(instance.id)
    if current is None:
        return
    if opened is not None and opened[0] == current.started_at:
        seen_at = current.started_at + steady_now() - opened[1]
    stopped = instance.stopped_at
    if stopped is not None and current.started_at <= stopped <= seen_at:
        store.close_interval(instance.id, stopped, "provider")
    else:
        store.close_interval(instance.id, seen_at, "controller")


def settle_with_watchdog(store: Store, run_id: str, instance_id: str, watchdog_log: str) -> None:
    """The watchdog's power-off time ends the interval it falls in, where that is earlier than
    what the controller recorded (it could only close the interval when it next looked); an
    end the provider reported stays."""
    now = time.time()
    for entry in budget.watchdog_decisions(watchdog_log):
        if entry.get("action") != "power_off" or not isinstance(entry.get("ts"), (int, float)):
            continue
        for interval in store.ledger(run_id):
            mine = interval.instance_id == instance_id and interval.source != "provider"
            if mine and interval.started_at <= entry["ts"] < interval.end(now):
                store.correct_end(instance_id, interval.started_at, entry["ts"], "watchdog")


def run_report(store: Store, run_id: str) -> dict:
    """A run's billed intervals and totals, and the account's balance difference where the
    provider has a balance (recorded as balance.before/balance.after events)."""
    report = cost.run_report(run_id, store.ledger(run_id), time.time())
    balances = {e.kind: e.data["value"] for e in store.events(run_id) if e.kind.startswith("balance.")}
    if "balance.before" in balances and "balance.after" in balances:
        spent = balances["balance.before"] - balances["balance.after"]
        report["balance"] = {
            "before": balances["balance.before"],
            "after": balances["balance.after"],
            "spent": round(spent, 6),
        }
    return report


def so_far(store: Store, run_id: str) -> str:
    """What the run has cost until now, per currency (empty when nothing was billed)."""
    spent = cost.totals(store.ledger(run_id), time.time())
    return ", ".join(f"{total.total:.4f} {total.currency} so far" for total in spent)


def summary_lines(report: dict) -> list[str]:
    """One line per currency: the total and each mode's seconds and cost."""
    lines = []
    for total in report["totals"]:
        parts = ", ".join(
            f"{mode} {total['seconds'][mode]:.0f}s {total['cost'][mode]:.4f}"
            for mode in sorted(total["cost"])
        )
        lines.append(f"cost: {total['total']:.4f} {total['currency']} ({parts})")
    if "balance" in report:
        lines.append(f"balance: {report['balance']['spent']:.4f} spent according to the provider")
    return lines
