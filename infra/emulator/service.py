"""The emulated cloud: instance lifecycle, power modes, faults and money, behind the HTTP API.

This is the part that behaves like AutoDL: a boot is accepted at once and the status goes
`starting` then `running` after the boot delay; a power-off goes `shutting_down` then
`shutdown`; `shutdown` run inside an instance stops its container, which a watcher thread
notices within a second and books as a power-off. Every state change is written through
`Books`, so the power log and the balance are right even if the emulator is restarted.
Errors are raised as `ApiError` with AutoDL's code and message; the HTTP layer only
wraps them in the envelope.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from infra.emulator import instances
from infra.emulator.forward import Forwarder
from infra.emulator.state import Books, Config, InstanceRecord

NO_GPU = "该主机空闲GPU不足，主机GPU空闲数量：0 卡"
LOW_BALANCE = "余额不足，请充值后再开机"
NOT_FOUND = "实例不存在"
ALREADY_ON = "实例已开机，请勿重复开机"
ALREADY_OFF = "实例已关机，请勿重复关机"
BUSY = "实例正在开机或关机中，请稍后再试"
RELEASED = "实例已释放"
RELEASE_RUNNING = "在释放实例前请先关机"
BAD_MODE = "不支持的启动模式"
PRO_GPU_ONLY = "暂不支持API以无卡模式开机"


class ApiError(Exception):
    """An answer other than Success: AutoDL's envelope code and message."""

    def __init__(self, code: str, msg: str) -> None:
        super().__init__(f"{code}: {msg}")
        self.code = code
        self.msg = msg


@dataclass
class Faults:
    """Failures injected through the admin API (never part of AutoDL's API)."""

    no_gpu_stock: int = 0  # the next N GPU boots fail with NO_GPU
    expire_token: bool = False  # every API call answers AuthorizeFailed (HTTP 200)
    low_balance: bool = False  # power_on answers LOW_BALANCE
    http_500: int = 0  # the next N API calls answer HTTP 500
    malformed: int = 0  # the next N API calls answer a body that is not JSON (a proxy's error page)
    slow_s: float = 0.0  # every API call waits this long before it answers (0: none)
    late: int = 0  # the next N API calls are carried out, but answered only after late_s
    late_s: float = 10.0  # (longer than the client waits: its request timed out, yet it took effect)


class Emulator:
    """Instances backed by Docker containers, with the books kept in `home`."""

    def __init__(self, home: Path, config: Config, image: str) -> None:
        self.home = home
        self.config = config
        self.image = image
        self.books = Books(home, config)
        self.faults = Faults()
        self._forwarders: dict[str, Forwarder] = {}
        self._stop = threading.Event()
        self._recover()
        self._watcher = threading.Thread(target=self._watch, name="emulator-watch", daemon=True)
        self._watcher.start()

    # -- queries ----------------------------------------------------------------------------

    def get(self, uuid: object) -> InstanceRecord:
        if not isinstance(uuid, str) or not uuid:
            raise ApiError("InvalidParameter", "请求参数错误: instance_uuid")
        record = self.books.instances.get(uuid)
        if record is None:
            raise ApiError("InstanceError", NOT_FOUND)
        return record

    def snapshot(self, record: InstanceRecord) -> dict:
        """The INSTANCE object of docs/providers.md."""
        stopped = record.stopped_at
        return {
            "uuid": record.uuid,
            "instance_name": record.name,
            "status": record.status,
            "sub_status": "",
            "charge_type": "payg",
            "start_mode": record.start_mode,
            "proxy_host": "127.0.0.1",
            "ssh_port": record.ssh_port,
            "ssh_command": f"ssh -p {record.ssh_port} root@127.0.0.1" if record.ssh_port else "",
            "root_password": record.root_password,
            "stopped_at": {
                "Time": datetime.fromtimestamp(stopped or 0, timezone.utc).isoformat().replace("+00:00", "Z"),
                "Valid": stopped is not None,
            },
            "gpu_idle_num": 0 if self.faults.no_gpu_stock else 1,
            "gpu_all_num": 1,
            "payg_price": round(self.config.gpu_price * 1000),
            "created_at": record.created_at,
        }

    def listed(self) -> list[dict]:
        with self.books.lock:
            return [self.snapshot(r) for r in self.books.instances.values() if r.status != "released"]

    # -- lifecycle --------------------------------------------------------------------------

    def create(self, name: str, kind: str) -> str:
        hexes = secrets.token_hex
        uuid = f"pro-{hexes(6)}" if kind == "pro" else f"{hexes(5)}-{hexes(4)}"
        record = InstanceRecord(
            uuid=uuid,
            name=name or uuid,
            container=f"runner-emulator-{uuid}",
            root_password=secrets.token_urlsafe(12),
            kind=kind,
        )
        instances.create(record.container, self.image, self.home, record.root_password)
        with self.books.lock:
            self.books.instances[uuid] = record
            self.books.save()
        return uuid

    def power_on(self, uuid: object, mode: object) -> None:
        if mode not in ("gpu", "non_gpu"):
            raise ApiError("ServerError", BAD_MODE)
        with self.books.lock:
            record = self.get(uuid)
            self._check_can_boot(record, mode)
            record.status, record.start_mode = "starting", mode
            self.books.open_interval(record.uuid, mode)
        threading.Thread(target=self._boot, args=(record, mode), daemon=True).start()

    def _check_can_boot(self, record: InstanceRecord, mode: object) -> None:
        if record.status == "released":
            raise ApiError("InstanceError", RELEASED)
        if record.status == "running":
            raise ApiError("InstanceError", ALREADY_ON)
        if record.status != "shutdown":
            raise ApiError("InstanceError", BUSY)
        if self.faults.low_balance or self.books.balance() <= 0:
            raise ApiError("InstanceError", LOW_BALANCE)
        if mode == "gpu" and self.faults.no_gpu_stock > 0:
            self.faults.no_gpu_stock -= 1
            raise ApiError("InstanceError", NO_GPU)

    def _boot(self, record: InstanceRecord, mode: str) -> None:
        began = time.monotonic()
        try:
            config = self.config
            target = instances.boot(record.container, mode, config.cpu_mode_cpus, config.cpu_mode_memory)
            forwarder = Forwarder(target, avoid=record.ssh_port or None)
        except Exception:  # the container did not start: the boot failed, nothing runs
            self._powered_off(record)
            raise
        self._forwarders[record.uuid] = forwarder
        time.sleep(max(0.0, self.config.boot_delay - (time.monotonic() - began)))
        with self.books.lock:
            if record.status == "starting":
                record.status, record.ssh_port = "running", forwarder.port
                self.books.save()

    def power_off(self, uuid: object) -> None:
        with self.books.lock:
            record = self.get(uuid)
            if record.status == "released":
                raise ApiError("InstanceError", RELEASED)
            if record.status in ("shutdown", "shutting_down"):
                raise ApiError("InstanceError", ALREADY_OFF)
            if record.status == "starting":
                raise ApiError("InstanceError", BUSY)
            record.status = "shutting_down"
            self.books.save()
        threading.Thread(target=self._shut_down, args=(record,), daemon=True).start()

    def _shut_down(self, record: InstanceRecord) -> None:
        try:
            instances.stop(record.container)
        finally:
            self._powered_off(record)

    def _powered_off(self, record: InstanceRecord) -> None:
        """Book a power-off: close the forwarder and the power log interval."""
        forwarder = self._forwarders.pop(record.uuid, None)
        if forwarder:
            forwarder.close()
        now = time.time()
        with self.books.lock:
            record.status, record.stopped_at = "shutdown", now
            self.books.close_interval(record.uuid, now)

    def release(self, uuid: object) -> None:
        with self.books.lock:
            record = self.get(uuid)
            if record.status == "released":
                raise ApiError("InstanceError", RELEASED)
            if record.status != "shutdown":
                raise ApiError("InstanceError", RELEASE_RUNNING)
            record.status = "released"
            self.books.save()
        instances.remove(record.container)

    # -- the watcher: power-offs from inside, and restarts of the emulator ------------------

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self._check_containers()
            except Exception:  # Docker hiccup: look again at the next tick
                continue

    def _check_containers(self) -> None:
        with self.books.lock:
            watched = [r for r in self.books.instances.values() if r.status in ("running",)]
        if not watched:
            return
        alive = instances.running(self.home)
        for record in watched:
            if record.container not in alive and record.status == "running":
                self._powered_off(record)

    def _recover(self) -> None:
        """After a restart nothing is forwarded: stop what still runs and book it off."""
        for record in list(self.books.instances.values()):
            if record.status in ("starting", "running", "shutting_down"):
                instances.stop(record.container)
                self._powered_off(record)

    def close(self, *, power_off: bool = True) -> None:
        """Stop the watcher; with power_off, stop every running instance and book it."""
        self._stop.set()
        if not power_off:
            return
        for record in list(self.books.instances.values()):
            if record.status in ("starting", "running", "shutting_down"):
                try:
                    instances.stop(record.container)
                finally:
                    self._powered_off(record)
