"""AutoDL's HTTP APIs: the envelope, the errors, and the two instance surfaces runner uses.

Both the undocumented console API (ordinary pay-as-you-go instances; the only one that boots
without the GPU) and the official developer API (Pro instances, GPU boots only) answer with an
envelope `{code, msg, data, request_id}` that is a success only when `code == "Success"`, errors
arriving as HTTP 200. This module turns every answer into data or a typed error the pipeline
can act on (runner.errors), retrying only what is worth retrying. The token goes in the
`Authorization` header and nowhere else: no message, log line or exception carries it.
docs/providers.md lists the calls and the error table.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from infra.base import Instance, InstanceState, PowerMode, SshAccess
from runner.errors import (
    AuthFailed,
    BadInput,
    InstanceNotFound,
    InsufficientBalance,
    NoCapacity,
    ProviderFailure,
    Transient,
)

log = logging.getLogger(__name__)

CONSOLE_URL = "https://www.autodl.com"
DEVELOPER_URL = "https://api.autodl.com"
NO_GPU_PRICE_CNY = 0.10  # the console's no-GPU dialog: 0.5 CPU, 2 GB, ¥0.10/h
_STATES = {
    "creating": InstanceState.CREATING,
    "starting": InstanceState.STARTING,
    "re_initializing": InstanceState.STARTING,
    "running": InstanceState.RUNNING,
    "shutting_down": InstanceState.STOPPING,
    "shutdown": InstanceState.STOPPED,
    "releasing": InstanceState.RELEASED,
    "released": InstanceState.RELEASED,
    "failed": InstanceState.FAILED,
}


@dataclass(frozen=True)
class Retry:
    attempts: int = 5
    first_delay: float = 1.0
    max_delay: float = 20.0


class AutodlClient:
    """One API surface (a base URL and a token); call() returns `data` or raises a typed error."""

    def __init__(
        self, base_url: str, token: str, *, timeout: float = 30.0, retry: Retry | None = None
    ) -> None:
        if not token:
            raise BadInput("no AutoDL token given")
        self.base_url = base_url.rstrip("/")
        self._token = token
        self.timeout = timeout
        self.retry = retry or Retry()

    def __repr__(self) -> str:  # the token stays out of any repr
        return f"AutodlClient({self.base_url!r})"

    def call(
        self,
        method: str,
        path: str,
        body: dict | None = None,
        query: dict | None = None,
        *,
        done_already: Callable[[], object | None] | None = None,
    ) -> object:
        """The call's `data`, retrying Transient failures with capped exponential backoff.

        A Transient failure (a timeout, HTTP 500, a proxy's page) says nothing of whether the
        call took effect. A call that must not take effect twice (a create) passes
        `done_already`: it is asked before each retry, and what it finds is the answer."""
        delay = self.retry.first_delay
        for attempt in range(1, self.retry.attempts + 1):
            try:
                return self._once(method, path, body, query)
            except Transient as exc:
                if attempt == self.retry.attempts:
                    raise Transient(f"{exc.message} (after {attempt} attempts)") from exc
                log.warning("AutoDL %s: %s; retrying in %.1fs", path, exc.message, delay)
                time.sleep(delay)
                delay = min(self.retry.max_delay, delay * 2)
            found = done_already() if done_already else None
            if found is not None:
                return found
        raise AssertionError("unreachable")

    def _once(self, method: str, path: str, body: dict | None, query: dict | None) -> object:
        url = self.base_url + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": self._token, "Content-Type": "application/json"}
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        where = f"AutoDL {path}"
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise AuthFailed(f"{where}: the token was refused (HTTP {exc.code}); get a new one") from None
            if exc.code >= 500 or exc.code == 429:
                raise Transient(f"{where}: HTTP {exc.code}") from None
            raw = exc.read()
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            raise Transient(f"{where}: {reason}") from None
        return unwrap(raw, where)


def unwrap(raw: bytes, where: str) -> object:
    """The envelope's data, or the typed error its code and message mean."""
    try:
        envelope = json.loads(raw)
    except ValueError:
        raise Transient(f"{where}: the answer is not JSON: {raw[:120]!r}") from None
    if not isinstance(envelope, dict) or "code" not in envelope:
        raise Transient(f"{where}: the answer is not an AutoDL envelope: {raw[:120]!r}")
    code, message = str(envelope.get("code")), str(envelope.get("msg") or "")
    if code == "Success":
        return envelope.get("data")
    text = f"{where}: {code}: {message}" if message else f"{where}: {code}"
    if code == "AuthorizeFailed":
        raise AuthFailed(f"{text} (the token expired or is wrong; get a new one)")
    if "GPU不足" in message or "暂无库存" in message:
        raise NoCapacity(text)
    if "余额不足" in message:
        raise InsufficientBalance(f"{text} (the account's balance is too low; top it up, then resume)")
    if "不存在" in message:
        raise InstanceNotFound(text)
    raise ProviderFailure(text)


def to_instance(item: dict, cpu_price: float = NO_GPU_PRICE_CNY) -> Instance:
    """An instance as the console's list/snapshot describes it (the Pro snapshot has the same fields)."""
    status = str(item.get("status", ""))
    if status not in _STATES:
        raise ProviderFailure(f"AutoDL instance {item.get('uuid')}: unknown status {status!r}")
    state = _STATES[status]
    mode = PowerMode.CPU if item.get("start_mode") == "non_gpu" else PowerMode.GPU
    ssh = None
    if state is InstanceState.RUNNING and item.get("proxy_host") and item.get("ssh_port"):
        ssh = SshAccess(
            str(item["proxy_host"]), int(item["ssh_port"]), "root", item.get("root_password") or None
        )
    gpu_price = float(item.get("payg_price") or 0) / 1000
    return Instance(
        id=str(item["uuid"]),
        state=state,
        mode=mode if state in (InstanceState.RUNNING, InstanceState.STARTING) else None,
        ssh=ssh,
        price_per_hour={PowerMode.GPU: gpu_price, PowerMode.CPU: cpu_price},
        currency="CNY",
        name=str(item.get("instance_name") or ""),
        stopped_at=_stopped_at(item.get("stopped_at")) if state is InstanceState.STOPPED else None,
    )


def _stopped_at(value: object) -> float | None:
    """The console's `stopped_at` ({"Time": RFC 3339, "Valid": bool}) as epoch seconds; None when
    it is not valid or cannot be read (the ledger then uses the moment it saw the instance off)."""
    if not isinstance(value, dict) or not value.get("Valid"):
        return None
    try:
        return datetime.fromisoformat(str(value.get("Time")).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class ConsoleInstances:
    """Ordinary pay-as-you-go instances through the console API: boots with or without the GPU.

    `release` is not a confirmed console call on AutoDL, so it is refused there (release the
    instance in the console); the emulator serves it (can_release).
    """

    def __init__(
        self, client: AutodlClient, *, image: str = "", can_release: bool = False, wallet: bool = False
    ) -> None:
        self.client = client
        self.image = image
        self.can_release = can_release
        self.wallet = wallet  # the token also reads the developer API's wallet (the emulator's does)

    def create(self, name: str) -> Instance:
        if not self.image:
            raise BadInput("creating an AutoDL instance needs provider.create.image")
        body = {
            "instance_info": {
                "charge_type": "payg",
                "req_gpu_amount": 1,
                "image": self.image,
                "instance_name": name,
            },
            "price_info": {},
        }
        return self.describe(
            create_once(self.client, "/api/v1/order/instance/create/payg", body, "/api/v1/instance", name)
        )

    def describe(self, instance_id: str) -> Instance:
        data = self.client.call("GET", "/api/v1/instance/snapshot", query={"instance_uuid": instance_id})
        if not isinstance(data, dict):
            raise InstanceNotFound(f"AutoDL has no instance {instance_id}")
        return to_instance(data)

    def power_on(self, instance_id: str, mode: PowerMode) -> None:
        payload = "non_gpu" if mode is PowerMode.CPU else "gpu"
        self.client.call(
            "POST", "/api/v1/instance/power_on", {"instance_uuid": instance_id, "payload": payload}
        )

    def power_off(self, instance_id: str) -> None:
        self.client.call("POST", "/api/v1/instance/power_off", {"instance_uuid": instance_id})

    def release(self, instance_id: str) -> None:
        if not self.can_release:
            raise BadInput(
                f"runner cannot release AutoDL instance {instance_id} through the console API;"
                " release it in AutoDL's console (it was powered off)"
            )
        self.client.call("POST", "/api/v1/instance/release", {"instance_uuid": instance_id})

    def balance(self) -> float | None:
        return wallet_balance(self.client) if self.wallet else None  # no console balance call is known


class ProInstances:
    """Pro instances through the official developer API: GPU boots only."""

    def __init__(self, client: AutodlClient, *, create_body: dict | None = None) -> None:
        self.client = client
        self.create_body = create_body or {}

    def create(self, name: str) -> Instance:
        if not self.create_body:
            raise BadInput("creating a Pro instance needs provider.create (gpu_spec_uuid, image_uuid, ...)")
        body = {
            "req_gpu_amount": 1,
            "cuda_v_from": 113,
            "start_command": "",
            **self.create_body,
            "instance_name": name,
        }
        return self.describe(
            create_once(
                self.client, "/api/v1/dev/instance/pro/create", body, "/api/v1/dev/instance/pro/list", name
            )
        )

    def describe(self, instance_id: str) -> Instance:
        data = self.client.call(
            "GET", "/api/v1/dev/instance/pro/snapshot", query={"instance_uuid": instance_id}
        )
        if not isinstance(data, dict):
            raise InstanceNotFound(f"AutoDL has no Pro instance {instance_id}")
        return to_instance(data)

    def power_on(self, instance_id: str, mode: PowerMode) -> None:
        if mode is PowerMode.CPU:
            raise BadInput(
                "AutoDL's developer API boots Pro instances with their GPU only (暂不支持API以无卡模式开机);"
                " use an ordinary instance (provider.api: console) for a no-GPU set-up boot"
            )
        body = {"instance_uuid": instance_id, "payload": "gpu", "start_command": ""}
        self.client.call("POST", "/api/v1/dev/instance/pro/power_on", body)

    def power_off(self, instance_id: str) -> None:
        self.client.call("POST", "/api/v1/dev/instance/pro/power_off", {"instance_uuid": instance_id})

    def release(self, instance_id: str) -> None:
        self.client.call("POST", "/api/v1/dev/instance/pro/release", {"instance_uuid": instance_id})

    def balance(self) -> float | None:
        return wallet_balance(self.client)


def create_once(client: AutodlClient, path: str, body: dict, list_path: str, name: str) -> str:
    """The new instance's ID. A create whose answer was lost (timeout, HTTP 500) may have taken
    effect: before it is sent again, the instance is looked for by its name in list_path (run
    names make instance names unique), so a retry never makes a second, unseen, billed one."""
    made = client.call("POST", path, body, done_already=lambda: named(client, list_path, name))
    return str(made)


def named(client: AutodlClient, list_path: str, name: str) -> str | None:
    """The ID of the instance called name, if the account has one."""
    page, pages = 1, 1
    while page <= pages:
        data = client.call("POST", list_path, {"page_index": page, "page_size": 100})
        if not isinstance(data, dict) or not isinstance(data.get("list"), list):
            raise ProviderFailure(f"AutoDL {list_path}: unexpected answer {str(data)[:120]}")
        for item in data["list"]:
            if isinstance(item, dict) and item.get("instance_name") == name and item.get("uuid"):
                return str(item["uuid"])
        page, pages = page + 1, int(data.get("max_page") or 1)
    return None


def wallet_balance(client: AutodlClient) -> float:
    """The account's balance in CNY (the developer API gives thousandths)."""
    data = client.call("POST", "/api/v1/dev/wallet/balance")
    if not isinstance(data, dict) or "assets" not in data:
        raise ProviderFailure(f"AutoDL balance: unexpected answer {str(data)[:120]}")
    return float(data["assets"]) / 1000
