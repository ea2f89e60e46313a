"""AWS EC2 as an InstanceApi: one instance, one EBS root volume; set-up on a CPU type, training on a GPU type.

EC2 has no GPU-less boot; the same effect comes from changing the instance type of the one
instance between boots: stop, wait until stopped, modify the type, start (EC2 refuses to change
the type of a running instance, so this module never asks). The root volume outlives the stops.

Credentials come from boto3's usual chain (environment, profile, instance role); this module
never reads, logs or stores them. boto3 and botocore are imported on first use, so importing this
module costs nothing at start-up. Every botocore failure leaves as one of runner.errors' types,
with AWS's own code and message and the instance named.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from infra.base import Instance, InstanceState, PowerMode, SshAccess
from runner.errors import (
    AuthFailed,
    BadInput,
    InstanceNotFound,
    NoCapacity,
    ProviderFailure,
    RunnerError,
    Transient,
)

log = logging.getLogger(__name__)

CURRENCY = "USD"
RUNNER_TAG = ("runner", "1")

_STATES = {
    "pending": InstanceState.STARTING,
    "running": InstanceState.RUNNING,
    "stopping": InstanceState.STOPPING,
    "shutting-down": InstanceState.STOPPING,
    "stopped": InstanceState.STOPPED,
    "terminated": InstanceState.RELEASED,
}
_GONE = ("shutting-down", "terminated")

NO_CAPACITY_CODES = frozenset(
    {
        "InsufficientInstanceCapacity",
        "Server.InsufficientInstanceCapacity",
        "InsufficientHostCapacity",
        "InsufficientReservedInstanceCapacity",
        "InsufficientCapacity",
    }
)
# A quota, not a shortage: waiting does not help, raising the quota does (so not NoCapacity).
QUOTA_CODES = frozenset({"InstanceLimitExceeded", "VcpuLimitExceeded", "MaxSpotInstanceCountExceeded"})
AUTH_CODES = frozenset(
    {
        "AuthFailure",
        "UnauthorizedOperation",
        "InvalidClientTokenId",
        "ExpiredToken",
        "RequestExpired",
        "SignatureDoesNotMatch",
        "OptInRequired",
        "Blocked",
    }
)
NOT_FOUND_CODES = frozenset(
    {"InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed", "InvalidInstanceID"}
)
TRANSIENT_CODES = frozenset(
    {
        "RequestLimitExceeded",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "RequestThrottledException",
        "InternalError",
        "InternalFailure",
        "ServiceUnavailable",
        "Unavailable",
    }
)


@dataclass(frozen=True)
class AwsSettings:
    """Where and how to run: the spec's `provider` section for `type: aws` maps onto this."""

    region: str
    ami: str
    key_name: str
    security_group_ids: tuple[str, ...]
    cpu_type: str = "t3.large"
    gpu_type: str = "g5.xlarge"
    root_volume_gb: int = 100
    subnet_id: str | None = None
    ssh_user: str = "ubuntu"
    endpoint_url: str | None = None
    """Another EC2 endpoint (moto, a rehearsal); None for AWS's own."""
    api_timeout_s: float = 30.0
    """How long one API answer may take before botocore retries the call."""
    cpu_price_per_hour: float | None = None
    gpu_price_per_hour: float | None = None
    """Prices per hour in USD, for budgets; None where unknown."""
    tags: tuple[tuple[str, str], ...] = ()
    """Extra tags for the instance and its volume (a mapping is accepted and kept as pairs)."""

    def __post_init__(self) -> None:
        # accept lists and mappings from a parsed spec, keep the dataclass truly immutable
        object.__setattr__(self, "security_group_ids", tuple(self.security_group_ids))
        tags = self.tags.items() if isinstance(self.tags, Mapping) else self.tags
        object.__setattr__(self, "tags", tuple((str(k), str(v)) for k, v in tags))
        if self.root_volume_gb <= 0:
            raise ValueError(f"aws: root_volume_gb must be positive, not {self.root_volume_gb}")
        if self.cpu_type == self.gpu_type:
            raise ValueError(f"aws: cpu_type and gpu_type are both {self.cpu_type!r}; they must differ")

    def type_for(self, mode: PowerMode) -> str:
        return self.gpu_type if mode is PowerMode.GPU else self.cpu_type

    def prices(self) -> dict[PowerMode, float]:
        pairs = ((PowerMode.CPU, self.cpu_price_per_hour), (PowerMode.GPU, self.gpu_price_per_hour))
        return {mode: price for mode, price in pairs if price is not None}


def make_client(settings: AwsSettings) -> Any:
    """An EC2 client for the settings' region and endpoint, credentials from boto3's chain."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"mode": "standard", "max_attempts": 5},  # throttling and 5xx, with backoff
        connect_timeout=10,
        read_timeout=settings.api_timeout_s,
        user_agent_extra="gpu-runner",
    )
    return boto3.client("ec2", region_name=settings.region, endpoint_url=settings.endpoint_url, config=config)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def error_for(error: Mapping[str, Any], status: int | None, doing: str) -> RunnerError:
    """The runner error for an EC2 error answer ({"Code", "Message"}) and its HTTP status."""
    code = str(error.get("Code", "Unknown"))
    message = _one_line(error.get("Message", "") or "")
    text = f"AWS could not {doing}: {code}: {message}" if message else f"AWS could not {doing}: {code}"
    if code in NO_CAPACITY_CODES:
        return NoCapacity(f"{text} (no capacity for this type right now; try later or another zone)")
    if code in QUOTA_CODES:
        return ProviderFailure(f"{text} (an account quota; ask AWS to raise it)")
    if code in AUTH_CODES:
        return AuthFailed(f"{text} (check the AWS credentials and their permissions)")
    if code in NOT_FOUND_CODES:
        return InstanceNotFound(text)
    if code in TRANSIENT_CODES or int(status or 0) >= 500:
        return Transient(text)
    return ProviderFailure(text)


def map_aws_error(exc: Exception, doing: str) -> RunnerError:
    """The runner error a botocore failure means; `doing` names the action and the instance,
    e.g. "start instance i-0abc". Messages are one line and carry AWS's code and message verbatim."""
    from botocore.exceptions import (
        ClientError,
        ConnectionError,
        HTTPClientError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return error_for(exc.response.get("Error", {}), status, doing)
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return AuthFailed(
            f"AWS could not {doing}: no usable credentials "
            "(set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
        )
    if isinstance(exc, (ConnectionError, HTTPClientError)):
        return Transient(f"AWS could not {doing}: {_one_line(str(exc))}")
    return ProviderFailure(f"AWS could not {doing}: {type(exc).__name__}: {_one_line(str(exc))}")


def boot_failure(raw: dict, doing: str) -> RunnerError | None:
    """The error a failed boot left in the instance's StateReason (EC2 accepts a start, then
    stops the instance again when it has no capacity), or None when nothing failed."""
    reason = raw.get("StateReason") or {}
    code = str(reason.get("Code", ""))
    message = _one_line(reason.get("Message", "") or code)
    if code in NO_CAPACITY_CODES:
        return NoCapacity(f"AWS could not {doing}: {code}: {message} (no capacity for this type right now)")
    if code.startswith("Server."):
        return ProviderFailure(f"AWS could not {doing}: {code}: {message}")
    return None


class AwsInstances:
    """The InstanceApi for EC2. `client` is an EC2 client (boto3.client("ec2")); None builds one
    from the settings on first use. Waits poll every `wait_delay_s`, at most `wait_max_attempts`
    times (EC2's own waiters: 15 s, 40 times)."""

    def __init__(
        self,
        settings: AwsSettings,
        client: Any = None,
        *,
        wait_delay_s: float = 15.0,
        wait_max_attempts: int = 40,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self._client = client
        self.wait_delay_s = wait_delay_s
        self.wait_max_attempts = wait_max_attempts
        self._sleep = sleep

    def __repr__(self) -> str:
        return f"AwsInstances(region={self.settings.region!r})"

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = make_client(self.settings)
        return self._client

    # -- InstanceApi -------------------------------------------------------------------

    def create(self, name: str) -> Instance:
        """A new instance of the CPU type from the AMI, with one EBS root volume of
        root_volume_gb (deleted with the instance); EC2 boots it straight away."""
        s = self.settings
        if not (s.ami and s.key_name and s.security_group_ids):
            raise BadInput("creating an EC2 instance needs an AMI, a key pair name and a security group")
        root_device = self._root_device_name()
        tags = [{"Key": k, "Value": v} for k, v in s.tags if k not in ("Name", RUNNER_TAG[0])]
        tags += [{"Key": "Name", "Value": name}, {"Key": RUNNER_TAG[0], "Value": RUNNER_TAG[1]}]
        request: dict[str, Any] = {
            "ImageId": s.ami,
            "InstanceType": s.cpu_type,
            "KeyName": s.key_name,
            "SecurityGroupIds": list(s.security_group_ids),
            "MinCount": 1,
            "MaxCount": 1,
            "BlockDeviceMappings": [
                {
                    "DeviceName": root_device,
                    "Ebs": {"VolumeSize": s.root_volume_gb, "VolumeType": "gp3", "DeleteOnTermination": True},
                }
            ],
            "TagSpecifications": [
                {"ResourceType": "instance", "Tags": tags},
                {"ResourceType": "volume", "Tags": tags},
            ],
            # the same token on botocore's own retries: a timed-out request never makes two
            "ClientToken": uuid.uuid4().hex,
        }
        if s.subnet_id:
            request["SubnetId"] = s.subnet_id
        answer = self._call(f"create instance {name!r} ({s.cpu_type}, {s.ami})", "run_instances", **request)
        instances = answer.get("Instances") or []
        if len(instances) != 1:
            raise ProviderFailure(f"AWS created {len(instances)} instances for {name!r}, expected one")
        created = self._to_instance(instances[0])
        log.info("AWS created instance %s (%s) for %s", created.id, s.cpu_type, name)
        return created

    def describe(self, instance_id: str) -> Instance:
        return self._to_instance(self._raw(instance_id))

    def power_on(self, instance_id: str, mode: PowerMode) -> None:
        """Boot in mode and return once it runs. When the instance type has to change: stop if
        needed, wait until stopped, modify the type, start; a running instance is never modified,
        and one already running in the right type is left alone."""
        target = self.settings.type_for(mode)
        raw = self._raw(instance_id)
        state = raw["State"]["Name"]
        if state in _GONE:
            raise InstanceNotFound(f"AWS instance {instance_id} is {state}; it cannot boot")
        if raw.get("InstanceType") == target:
            if state == "running":
                return
            if state == "pending":
                self._wait_running(instance_id)
                return
            if state == "stopping":
                self._wait("instance_stopped", instance_id, "stopped")
        else:
            self._ensure_stopped(instance_id, state)
            self._call(
                f"change instance {instance_id} to {target}",
                "modify_instance_attribute",
                InstanceId=instance_id,
                InstanceType={"Value": target},
            )
            log.info("AWS instance %s is now %s", instance_id, target)
        self._call(f"start instance {instance_id} ({target})", "start_instances", InstanceIds=[instance_id])
        self._wait_running(instance_id)

    def power_off(self, instance_id: str) -> None:
        """Stop and return once stopped (the EBS volume stays, and is still billed)."""
        raw = self._raw(instance_id)
        state = raw["State"]["Name"]
        if state in _GONE:
            raise InstanceNotFound(f"AWS instance {instance_id} is {state}; there is nothing to stop")
        self._ensure_stopped(instance_id, state)

    def release(self, instance_id: str) -> None:
        """Terminate and return once terminated; the root volume goes with it."""
        self._call(f"terminate instance {instance_id}", "terminate_instances", InstanceIds=[instance_id])
        self._wait("instance_terminated", instance_id, "terminated")

    def balance(self) -> float | None:
        return None  # AWS bills afterwards; there is no balance to read

    def wait_running(self, instance_id: str) -> Instance:
        """Wait until the instance runs (a boot EC2 gave up on raises its reason) and describe it."""
        return self._to_instance(self._wait_running(instance_id))

    # -- the calls -------------------------------------------------------------------------

    def _call(self, doing: str, operation: str, **params: Any) -> dict:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, operation)(**params)
        except (ClientError, BotoCoreError) as exc:
            raise map_aws_error(exc, doing) from None

    def _raw(self, instance_id: str) -> dict:
        answer = self._call(
            f"describe instance {instance_id}", "describe_instances", InstanceIds=[instance_id]
        )
        for reservation in answer.get("Reservations") or []:
            for raw in reservation.get("Instances") or []:
                if raw.get("InstanceId") == instance_id:
                    return raw
        raise InstanceNotFound(f"AWS could not describe instance {instance_id}: it does not exist")

    def _root_device_name(self) -> str:
        ami = self.settings.ami
        images = self._call(f"describe image {ami}", "describe_images", ImageIds=[ami]).get("Images") or []
        if not images:
            raise ProviderFailure(f"AWS has no image {ami} in {self.settings.region}")
        return images[0].get("RootDeviceName") or "/dev/xvda"

    def _ensure_stopped(self, instance_id: str, state: str) -> None:
        if state == "stopped":
            return
        if state == "pending":  # EC2 cannot stop a pending instance; let it come up first
            self._wait_running(instance_id)
            state = "running"
        if state == "running":
            self._call(f"stop instance {instance_id}", "stop_instances", InstanceIds=[instance_id])
        self._wait("instance_stopped", instance_id, "stopped")

    def _wait(self, waiter_name: str, instance_id: str, target: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError, WaiterError

        config = {"Delay": self.wait_delay_s, "MaxAttempts": self.wait_max_attempts}
        try:
            self.client.get_waiter(waiter_name).wait(InstanceIds=[instance_id], WaiterConfig=config)
        except WaiterError as exc:
            last = exc.last_response or {}
            if "Error" in last:  # the describe itself failed: map its error
                status = last.get("ResponseMetadata", {}).get("HTTPStatusCode")
                raise error_for(
                    last["Error"], status, f"wait for instance {instance_id} to be {target}"
                ) from None
            seen = _state_in(last, instance_id)
            if "Max attempts exceeded" in str(exc.kwargs.get("reason", "")):
                raise Transient(
                    f"AWS instance {instance_id} was not {target} after {self._waited()} (last seen {seen})"
                ) from None
            raise ProviderFailure(
                f"AWS instance {instance_id} became {seen} while waiting for {target}"
            ) from None
        except (ClientError, BotoCoreError) as exc:
            raise map_aws_error(exc, f"wait for instance {instance_id} to be {target}") from None

    def _wait_running(self, instance_id: str) -> dict:
        doing = f"boot instance {instance_id}"
        stopped_seen = 0
        for attempt in range(self.wait_max_attempts):
            if attempt:
                self._sleep(self.wait_delay_s)
            raw = self._raw(instance_id)
            state = raw["State"]["Name"]
            if state == "running":
                return raw
            if state == "pending":
                continue
            failure = boot_failure(raw, doing)
            if failure is not None:
                raise failure
            # right after a start, describe may still say stopped for a moment; not for long
            stopped_seen += state == "stopped"
            if state != "stopped" or stopped_seen > 3:
                reason = _one_line((raw.get("StateReason") or {}).get("Message", "")) or "no reason given"
                raise ProviderFailure(f"AWS could not {doing}: it is {state} ({reason})")
        raise Transient(f"AWS instance {instance_id} was not running after {self._waited()}")

    def _waited(self) -> str:
        return f"{self.wait_max_attempts} checks {self.wait_delay_s:g}s apart"

    def _to_instance(self, raw: dict) -> Instance:
        s = self.settings
        instance_id = raw.get("InstanceId", "?")
        name_state = (raw.get("State") or {}).get("Name", "")
        if name_state not in _STATES:
            raise ProviderFailure(f"AWS instance {instance_id}: unknown state {name_state!r}")
        state = _STATES[name_state]
        kind = raw.get("InstanceType")
        mode = None
        if state in (InstanceState.STARTING, InstanceState.RUNNING):
            mode = {s.cpu_type: PowerMode.CPU, s.gpu_type: PowerMode.GPU}.get(kind)
        ssh = None
        address = raw.get("PublicIpAddress") or raw.get("PrivateIpAddress")
        if state is InstanceState.RUNNING and address:
            ssh = SshAccess(host=address, port=22, user=s.ssh_user)
        name = next((t.get("Value", "") for t in raw.get("Tags") or [] if t.get("Key") == "Name"), "")
        return Instance(
            id=instance_id,
            state=state,
            mode=mode,
            ssh=ssh,
            price_per_hour=s.prices(),
            currency=CURRENCY,
            name=name,
        )


def _state_in(response: dict, instance_id: str) -> str:
    for reservation in response.get("Reservations") or []:
        for raw in reservation.get("Instances") or []:
            if raw.get("InstanceId") == instance_id:
                return str((raw.get("State") or {}).get("Name", "unknown"))
    return "unknown"
