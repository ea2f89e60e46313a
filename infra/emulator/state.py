"""The emulator's books: instances, the power log, prices and the balance, kept on disk.

Everything that must survive a restart of the emulator lives here, in one JSON file
written atomically (0600) after every change: which instances exist and in what state,
and every interval an instance was powered on, in which mode. Billing is derived from the
power log (seconds x the mode's hourly price, per second), so the balance, the log and
the costs can never disagree; the product's tests rely on the log to prove that nothing
ran with a GPU while it was only being set up.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from runner.home import private_dir


@dataclass
class Config:
    """Knobs given to `runner emulator up`; stored so a restart keeps the same prices."""

    boot_delay: float = 3.0
    cpu_mode_cpus: float = 0.5
    cpu_mode_memory: str | None = None  # a Docker size ("2g"); None: no cap
    balance: float = 100.0  # CNY at the start; the current balance is this minus every cost
    gpu_price: float = 2.15  # CNY per hour, GPU mode
    cpu_price: float = 0.10  # CNY per hour, no-GPU mode

    def price(self, mode: str) -> float:
        return self.gpu_price if mode == "gpu" else self.cpu_price


@dataclass
class InstanceRecord:
    """One emulated instance: the container behind it and what its snapshot shows."""

    uuid: str
    name: str
    container: str
    root_password: str
    kind: str = "console"  # "console" (ordinary) or "pro" (developer API)
    status: str = "shutdown"
    start_mode: str = "gpu"
    ssh_port: int = 0
    stopped_at: float | None = None
    created_at: float = field(default_factory=time.time)


@dataclass
class Interval:
    """One power-on, from the accepted boot to the recorded power-off (None while on)."""

    instance_uuid: str
    mode: str
    started_at: float
    ended_at: float | None = None

    def seconds(self, now: float) -> float:
        return max(0.0, (self.ended_at if self.ended_at is not None else now) - self.started_at)


class Books:
    """Thread-safe instances and power log, persisted to `<home>/state.json` on each change."""

    def __init__(self, home: Path, config: Config) -> None:
        self.home = private_dir(home)
        self.path = home / "state.json"
        self.config = config
        self.lock = threading.RLock()
        self.instances: dict[str, InstanceRecord] = {}
        self.power_log: list[Interval] = []
        if self.path.exists():
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            self.instances = {i["uuid"]: InstanceRecord(**i) for i in raw.get("instances", [])}
            self.power_log = [Interval(**i) for i in raw.get("power_log", [])]

    def save(self) -> None:
        with self.lock:
            payload = {
                "config": asdict(self.config),
                "instances": [asdict(i) for i in self.instances.values()],
                "power_log": [asdict(i) for i in self.power_log],
            }
            temporary = self.path.with_suffix(".tmp")
            fd = os.open(temporary, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(payload, handle, indent=1)
            os.replace(temporary, self.path)

    # -- power log and money --------------------------------------------------------------

    def open_interval(self, uuid: str, mode: str) -> None:
        with self.lock:
            self.power_log.append(Interval(uuid, mode, time.time()))
            self.save()

    def close_interval(self, uuid: str, when: float | None = None) -> None:
        """Record the power-off of `uuid`, if it has an open interval (idempotent)."""
        with self.lock:
            for interval in self.power_log:
                if interval.instance_uuid == uuid and interval.ended_at is None:
                    interval.ended_at = when or time.time()
            self.save()

    def cost(self, interval: Interval, now: float) -> float:
        return interval.seconds(now) * self.config.price(interval.mode) / 3600.0

    def spent(self) -> float:
        now = time.time()
        with self.lock:
            return sum(self.cost(i, now) for i in self.power_log)

    def balance(self) -> float:
        return self.config.balance - self.spent()

    def log_entries(self) -> list[dict]:
        """The power log as the admin API shows it (epoch seconds, CNY)."""
        now = time.time()
        with self.lock:
            return [
                {
                    "instance_uuid": i.instance_uuid,
                    "mode": i.mode,
                    "started_at": i.started_at,
                    "ended_at": i.ended_at,
                    "seconds": i.seconds(now),
                    "cost": self.cost(i, now),
                    "price_per_hour": self.config.price(i.mode),
                }
                for i in self.power_log
            ]
