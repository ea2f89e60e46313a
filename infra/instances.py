"""Booting and stopping rented instances the same way on every cloud.

A boot is done only when the instance runs in the asked mode *and* its sshd answers: clouds
report `running` before sshd is up. A GPU boot that finds no free GPU leaves the instance
powered off (never staging or waiting at GPU prices) and tries again with backoff until the
job's deadline, then fails with a message that says so. Stopping waits until the cloud says
stopped, since that is when billing ends.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from infra.base import Instance, InstanceApi, InstanceState, PowerMode
from runner.errors import InstanceNotFound, NoCapacity, ProviderFailure

Notify = Callable[[str], None]


@dataclass(frozen=True)
class BootPolicy:
    boot_timeout_s: float = 600.0  # power_on accepted -> running with sshd answering
    gpu_wait_s: float = 1800.0  # how long to keep retrying a boot that finds no free GPU
    stop_timeout_s: float = 300.0
    poll_s: float = 1.0
    first_retry_s: float = 10.0
    max_retry_s: float = 120.0


def boot(api: InstanceApi, instance_id: str, mode: PowerMode, policy: BootPolicy, notify: Notify) -> Instance:
    """Power the instance on in mode (stopping it first if it runs in the other mode) and wait
    until sshd answers; NoCapacity is retried with the instance off until policy.gpu_wait_s."""
    current = api.describe(instance_id)
    if current.state in (InstanceState.RUNNING, InstanceState.STARTING) and current.mode is mode:
        return wait_running(api, instance_id, mode, policy)  # booted, or booting, by an earlier process
    if current.state in (InstanceState.RUNNING, InstanceState.STARTING, InstanceState.STOPPING):
        shut(api, instance_id, policy)
    deadline = time.monotonic() + policy.gpu_wait_s
    delay = policy.first_retry_s
    while True:
        try:
            api.power_on(instance_id, mode)
            break
        except NoCapacity as exc:
            if time.monotonic() + delay > deadline:
                raise NoCapacity(
                    f"{exc.message}; no capacity for a {mode.value} boot within {policy.gpu_wait_s:.0f}s,"
                    f" instance {instance_id} left powered off"
                ) from exc
            notify(f"no capacity for a {mode.value} boot of {instance_id}; trying again in {delay:.0f}s")
            time.sleep(delay)
            delay = min(policy.max_retry_s, delay * 2)
        except ProviderFailure:
            if not _booting(api, instance_id, mode):
                raise
            break  # refused because a boot in this mode is already under way (an earlier process's)
    return wait_running(api, instance_id, mode, policy)


def _booting(api: InstanceApi, instance_id: str, mode: PowerMode) -> bool:
    current = api.describe(instance_id)
    return current.state in (InstanceState.STARTING, InstanceState.RUNNING) and current.mode is mode


def wait_running(api: InstanceApi, instance_id: str, mode: PowerMode, policy: BootPolicy) -> Instance:
    """The instance once it runs in mode and its sshd sends a banner."""
    deadline = time.monotonic() + policy.boot_timeout_s
    while True:
        current = api.describe(instance_id)
        if current.state in (InstanceState.STOPPED, InstanceState.RELEASED, InstanceState.FAILED):
            raise ProviderFailure(f"instance {instance_id} went {current.state.value} while booting")
        ready = current.state is InstanceState.RUNNING and current.ssh is not None
        if ready and current.mode is not mode:
            raise ProviderFailure(
                f"instance {instance_id} booted in {current.mode.value} mode, not {mode.value}"
            )
        if ready and sshd_answers(current.ssh.host, current.ssh.port):
            return current
        if time.monotonic() > deadline:
            raise ProviderFailure(f"instance {instance_id} not up within {policy.boot_timeout_s:.0f}s")
        time.sleep(policy.poll_s)


def shut(api: InstanceApi, instance_id: str, policy: BootPolicy) -> Instance:
    """Power off (unless already off) and wait until the cloud reports it stopped; the
    instance as then described (with the provider's stop time, where it reports one)."""
    deadline = time.monotonic() + policy.stop_timeout_s
    asked = False
    while True:
        current = api.describe(instance_id)
        if current.state in (InstanceState.STOPPED, InstanceState.RELEASED):
            return current
        if not asked and current.state in (InstanceState.RUNNING, InstanceState.STARTING):
            try:
                api.power_off(instance_id)
            except ProviderFailure:
                if not _in_state(api, instance_id, InstanceState.STOPPING, InstanceState.STOPPED):
                    raise
                # refused as already off: a retried call whose first answer was lost took effect
            asked = True
        if time.monotonic() > deadline:
            raise ProviderFailure(f"instance {instance_id} did not stop within {policy.stop_timeout_s:.0f}s")
        time.sleep(policy.poll_s)


def release(api: InstanceApi, instance_id: str) -> None:
    """Release the (stopped) instance; a release refused because it is done already (a retried
    call whose first answer was lost) is done."""
    try:
        api.release(instance_id)
    except ProviderFailure:
        try:
            if _in_state(api, instance_id, InstanceState.RELEASED):
                return
        except InstanceNotFound:
            return  # gone from the account: released
        raise


def _in_state(api: InstanceApi, instance_id: str, *states: InstanceState) -> bool:
    return api.describe(instance_id).state in states


def sshd_answers(host: str, port: int, timeout: float = 3.0) -> bool:
    """Whether an SSH server sends its banner on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            return sock.recv(4).startswith(b"SSH-")
    except OSError:
        return False
