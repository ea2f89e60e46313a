"""Instances that bill with nobody watching them: found on every command, powered off on request.

An instance is a suspect when the ledger still has an interval open for it (it was booted and
not seen off) and no runner process drives its run (the run's lock is free: the process was
killed, or the laptop slept). Its provider is asked how it is; one seen off closes its interval
in the ledger (at the provider's stop time where it reports one: runner.billing), one still
running is an orphan, reported with what it costs per hour. The check
costs one SQL query when nothing is suspect, and asks the providers at most once a minute about
the same suspects (a new suspect is asked about at once).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass

from infra.base import InstanceState
from runner import billing, runlock
from runner.errors import RunnerError
from runner.home import private_file, runner_home
from runner.store import Store

CHECK_EVERY_S = 60.0


@dataclass(frozen=True)
class Orphan:
    instance_id: str
    run_id: str
    mode: str
    rate_per_hour: float
    currency: str

    def warning(self) -> str:
        return (
            f"instance {self.instance_id} (run {self.run_id}) is running in {self.mode} mode with no runner"
            f" process driving it, billed {self.rate_per_hour:g} {self.currency}/h:"
            f" `runner resume {self.run_id}` continues the run, `runner down --orphans` powers it off"
        )


def suspects(store: Store) -> list:
    """Open ledger intervals whose run no process drives."""
    return [i for i in store.open_intervals() if i.run_id and runlock.holder(i.run_id) is None]


def find(store: Store, *, cached: bool = True) -> list[Orphan]:
    """The orphans now (with cached, the answer of the last minute's check, if any)."""
    candidates = suspects(store)
    if not candidates:
        return []
    stamp = runner_home() / "orphans.json"
    asked = sorted([i.instance_id, i.started_at] for i in candidates)  # the answer holds for these only
    if cached:
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            saved = json.loads(stamp.read_text(encoding="utf-8"))
            if saved["asked"] == asked and time.time() - saved["checked_at"] < CHECK_EVERY_S:
                return [Orphan(**item) for item in saved["orphans"]]
    found = [orphan for interval in candidates if (orphan := _ask_provider(store, interval))]
    answer = {"checked_at": time.time(), "asked": asked, "orphans": [asdict(o) for o in found]}
    private_file(stamp).write_text(json.dumps(answer), encoding="utf-8")
    return found


def _ask_provider(store: Store, interval) -> Orphan | None:
    """The orphan this interval's instance is, or None (an instance seen off closes its interval)."""
    api = _api_of(store, interval.run_id)
    if api is None:
        return None
    try:
        now = api.describe(interval.instance_id)
    except RunnerError:
        return None  # cannot tell now: asked again on a later command
    if now.state in (InstanceState.RUNNING, InstanceState.STARTING):
        return Orphan(
            interval.instance_id, interval.run_id, interval.mode, interval.rate_per_hour, interval.currency
        )
    billing.close_at_stop(store, now, time.time())
    return None


def _api_of(store: Store, run_id: str):
    """The instance API of the run's provider, from its spec (None if the spec cannot be read)."""
    from infra.registry import provider_for
    from runner.spec import load_spec

    try:
        loaded = load_spec(store.get_run(run_id).spec_path)
        return provider_for(loaded.spec.provider).api
    except (RunnerError, AttributeError):
        return None


def power_off(store: Store, orphans: list[Orphan]) -> list[str]:
    """Power each orphan off (waiting until its provider says stopped); the IDs done."""
    from infra import instances

    done = []
    for orphan in orphans:
        api = _api_of(store, orphan.run_id)
        if api is None:
            continue
        _shut(store, api, instances.BootPolicy(), orphan.instance_id, orphan.run_id)
        done.append(orphan.instance_id)
    return done


def down_run(store: Store, run_id: str, grace_s: float) -> str | None:
    """Stop a run nobody drives: its trainer gets SIGTERM (SIGKILL after grace_s) if its instance
    runs, then the instance is powered off; the run is recorded as interrupted. The instance ID,
    or None when the run has none."""
    from infra.registry import provider_for
    from runner.spec import load_spec

    run = store.get_run(run_id)
    acquired = [e.data["id"] for e in store.events(run.id) if e.kind == "instance.acquired"]
    if not acquired:
        return None
    provider = provider_for(load_spec(run.spec_path).spec.provider)
    instance = provider.api.describe(acquired[-1])
    if instance.state is InstanceState.RUNNING:
        with contextlib.suppress(RunnerError):  # unreachable or no trainer: powering off is what matters
            host = provider.open_host(run.id, instance)
            try:
                host.stop_step("train", grace_s)
            finally:
                host.close(keep_workspace=True)
    _shut(store, provider.api, provider.boot_policy, instance.id, run.id)
    if run.status == "running":
        store.finish_run(run.id, "interrupted", 130, "stopped with runner down")
    return instance.id


def _shut(store: Store, api, policy, instance_id: str, run_id: str) -> None:
    """Power off, wait until stopped, and end the interval the ledger has open."""
    from infra import instances

    billing.close_at_stop(store, instances.shut(api, instance_id, policy), time.time())
    store.add_event(run_id, "instance.powered_off", id=instance_id, by="runner down")
