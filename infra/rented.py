"""Providers of rented instances: AutoDL, the local emulator (which speaks AutoDL's API) and AWS.

They differ only in their instance API (infra.autodl_api, infra.aws); the rest is shared: the
instance is the spec's or a new one, and once it runs it is reached over SSH like any host
(infra.ssh: layer sync, rootfs or docker runtime, detached steps). Host, port and password are
read from the API after every boot, never stored; the host key is pinned under the instance's
ID, since its port (even its address) changes with every boot. AutoDL instances are containers
with a persistent data disk at /root/autodl-tmp and no Docker inside; ordinary ones can boot
without the GPU (console API), Pro ones only with it (developer API).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from infra.autodl_api import CONSOLE_URL, DEVELOPER_URL, AutodlClient, ConsoleInstances, ProInstances
from infra.base import Capabilities, Instance, InstanceApi
from infra.instances import BootPolicy
from infra.ssh import Login, SshHost, open_ssh_host
from runner.errors import BadInput, ProviderFailure
from runner.remote import Endpoint

if TYPE_CHECKING:
    from runner.spec import AutodlProvider as AutodlSettings
    from runner.spec import AwsProvider as AwsSpec
    from runner.spec import EmulatorProvider as EmulatorSettings

    RentedSettings = AutodlSettings | EmulatorSettings | AwsSpec

EMULATOR_IMAGE = "runner-emulator"  # what the emulator's create call is given as the image
# Run on the instance to power it off from inside (the watchdog's way to end GPU billing):
# AutoDL (and the emulator) power an instance off when `shutdown` runs in it; an EC2 instance
# stops on an OS shutdown (its default shutdown behaviour), which needs root there.
POWER_OFF = {
    "autodl": ("shutdown",),
    "emulator": ("shutdown",),
    "aws": ("sudo", "-n", "shutdown", "-h", "now"),
}


class RentedProvider:
    """Instances on AutoDL, the emulator or AWS: acquired, booted per mode, reached over SSH."""

    def __init__(self, settings: RentedSettings, accept_new_host_key: bool = False) -> None:
        self.settings = settings
        self.type = settings.type
        self.accept_new_host_key = accept_new_host_key
        no_gpu_boots = settings.type in ("emulator", "aws") or settings.api == "console"  # aws: a CPU type
        self.capabilities = Capabilities(instances=True, power_modes=no_gpu_boots)
        self.boot_policy = BootPolicy(boot_timeout_s=settings.boot_timeout_s, gpu_wait_s=settings.gpu_wait_s)
        self._api: InstanceApi | None = None

    @property
    def api(self) -> InstanceApi:
        """The instance API, its token read (from the environment or the emulator) on first use."""
        if self._api is None:
            self._api = _instance_api(self.settings)
        return self._api

    def instance_for(self, run_id: str) -> tuple[str, bool]:
        """The instance the run uses and whether it was created for it (the spec's, or a new one)."""
        if self.settings.instance:
            self.api.describe(self.settings.instance)  # exists, and the token works, before anything else
            return self.settings.instance, False
        return self.api.create(f"runner-{run_id}"[:60]).id, True

    def open_host(self, run_id: str, instance: Instance | None = None) -> SshHost:
        if instance is None or instance.ssh is None:
            raise ProviderFailure(f"{self.type} instance is not running: no SSH access to open")
        ssh, settings = instance.ssh, self.settings
        key_file = settings.key_path
        if key_file is None and not ssh.password:
            raise ProviderFailure(f"{self.type} gave no password for {instance.id}; set provider.key_file")
        login = Login(ssh.host, ssh.port, ssh.user, key_file, None)
        password = None if key_file is not None else ssh.password
        pin_as = f"{self.type}:{instance.id}"
        endpoint = Endpoint(ssh.host, ssh.port, ssh.user, key_file, password, pin_as=pin_as)
        return open_ssh_host(
            run_id,
            login,
            endpoint,
            settings.data_dir,
            settings.runtime,
            settings.limits,
            accept_new_host_key=self.accept_new_host_key,
            power_off=POWER_OFF[self.type],
        )


def _instance_api(settings: RentedSettings) -> InstanceApi:
    if settings.type == "aws":
        from infra.aws import AwsInstances

        return AwsInstances(settings.aws_settings())
    if settings.type == "emulator":
        from infra.emulator import connection

        url, token = connection()
        return ConsoleInstances(
            AutodlClient(url, token, timeout=settings.api_timeout_s),
            image=EMULATOR_IMAGE,
            can_release=True,
            wallet=True,
        )
    from runner.config import autodl_token_env

    variable = autodl_token_env(settings)
    token = os.environ.get(variable)
    if not token:
        raise BadInput(f"the AutoDL token variable {variable} is not set")
    if settings.api == "pro":
        client = AutodlClient(settings.url or DEVELOPER_URL, token, timeout=settings.api_timeout_s)
        return ProInstances(client, create_body=settings.create.pro_body() if settings.create else None)
    client = AutodlClient(settings.url or CONSOLE_URL, token, timeout=settings.api_timeout_s)
    return ConsoleInstances(client, image=settings.create.image if settings.create else "")
