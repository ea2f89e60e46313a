"""infra.aws against a real moto_server (a local EC2 API), and its error mapping at the unit level.

moto lets a running instance change type (real EC2 answers IncorrectInstanceState), so the GPU
switch is checked by the order of the EC2 calls, recorded with botocore's own event hooks, and by
the state the instance was in when ModifyInstanceAttribute went out.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from infra.aws import AwsInstances, AwsSettings, boot_failure, error_for, map_aws_error
from infra.base import InstanceState, PowerMode
from runner.errors import AuthFailed, BadInput, InstanceNotFound, NoCapacity, ProviderFailure, Transient

from .conftest import REGION

pytest.importorskip("botocore", reason="the aws extra (boto3) is not installed")

CPU, GPU = "t3.large", "g5.xlarge"


def client_error(code: str, message: str = "", status: int = 400, operation: str = "StartInstances"):
    from botocore.exceptions import ClientError

    answer = {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(answer, operation)


# -- moto ------------------------------------------------------------------------------


@pytest.fixture
def settings(moto_endpoint, aws_account):
    return AwsSettings(
        region=REGION,
        ami=aws_account["ami"],
        key_name=aws_account["key"],
        security_group_ids=[aws_account["sg"]],
        cpu_type=CPU,
        gpu_type=GPU,
        root_volume_gb=30,
        endpoint_url=moto_endpoint,
        cpu_price_per_hour=0.0832,
        gpu_price_per_hour=1.006,
        tags={"project": "runner-tests", "runner": "overridden"},
    )


class Recorded:
    """An AwsInstances on its own boto3 client, with every EC2 call it makes recorded in order."""

    def __init__(self, settings, observer):
        import boto3

        self.client = boto3.client("ec2", region_name=REGION, endpoint_url=settings.endpoint_url)
        self.api = AwsInstances(settings, self.client, wait_delay_s=0.05, wait_max_attempts=5)
        self.calls: list[str] = []
        self.state_at_modify: list[str] = []
        self._observer = observer
        self.client.meta.events.register("before-call.ec2.*", self._record)
        self.client.meta.events.register("before-parameter-build.ec2.ModifyInstanceAttribute", self._look)

    def _record(self, event_name, **kwargs):
        self.calls.append(event_name.rsplit(".", 1)[-1])

    def _look(self, params, **kwargs):
        # the separate (unrecorded) client sees the instance as EC2 would when the modify arrives
        answer = self._observer.describe_instances(InstanceIds=[params["InstanceId"]])
        self.state_at_modify.append(answer["Reservations"][0]["Instances"][0]["State"]["Name"])

    def changes(self) -> list[str]:
        """The calls that change something (the describes of waits and reads left out)."""
        return [c for c in self.calls if not c.startswith("Describe")]

    def reset(self) -> None:
        self.calls.clear()
        self.state_at_modify.clear()


@pytest.fixture
def rec(settings, ec2):
    return Recorded(settings, ec2)


def raw(ec2, instance_id):
    return ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]


@pytest.mark.integration
def test_create_makes_one_cpu_instance_from_the_ami_with_one_root_volume(rec, ec2, settings, aws_account):
    created = rec.api.create("run-create")
    assert created.id.startswith("i-")
    assert created.state in (InstanceState.STARTING, InstanceState.RUNNING)
    assert created.name == "run-create"
    assert rec.changes() == ["RunInstances"]

    got = raw(ec2, created.id)
    assert got["InstanceType"] == CPU
    assert got["ImageId"] == aws_account["ami"]
    assert got["KeyName"] == aws_account["key"]
    assert [g["GroupId"] for g in got["SecurityGroups"]] == [aws_account["sg"]]
    tags = {t["Key"]: t["Value"] for t in got["Tags"]}
    assert tags == {"Name": "run-create", "runner": "1", "project": "runner-tests"}
    [mapping] = got["BlockDeviceMappings"]
    assert mapping["DeviceName"] == aws_account["root_device"]
    assert mapping["Ebs"]["DeleteOnTermination"] is True
    [volume] = ec2.describe_volumes(VolumeIds=[mapping["Ebs"]["VolumeId"]])["Volumes"]
    assert volume["Size"] == 30

    described = rec.api.describe(created.id)
    assert described.state is InstanceState.RUNNING
    assert described.mode is PowerMode.CPU
    assert described.ssh is not None
    assert described.ssh.host == got["PublicIpAddress"]
    assert (described.ssh.port, described.ssh.user) == (22, "ubuntu")
    assert described.price_per_hour == {PowerMode.CPU: 0.0832, PowerMode.GPU: 1.006}
    assert described.currency == "USD"
    rec.api.release(created.id)


@pytest.mark.integration
def test_gpu_boot_stops_then_changes_type_then_starts(rec, ec2):
    instance_id = rec.api.create("run-switch").id
    volume = raw(ec2, instance_id)["BlockDeviceMappings"][0]["Ebs"]["VolumeId"]
    assert rec.api.describe(instance_id).state is InstanceState.RUNNING
    rec.reset()

    rec.api.power_on(instance_id, PowerMode.GPU)

    assert rec.changes() == ["StopInstances", "ModifyInstanceAttribute", "StartInstances"]
    stop, modify, start = (rec.calls.index(c) for c in rec.changes())
    assert "DescribeInstances" in rec.calls[stop + 1 : modify], "no wait for stopped between stop and modify"
    assert rec.state_at_modify == ["stopped"], "the type was changed on an instance that was not stopped"
    assert rec.calls[start + 1 :] and set(rec.calls[start + 1 :]) == {"DescribeInstances"}

    got = raw(ec2, instance_id)
    assert got["InstanceType"] == GPU
    assert got["State"]["Name"] == "running"
    assert got["BlockDeviceMappings"][0]["Ebs"]["VolumeId"] == volume  # the same disk
    described = rec.api.describe(instance_id)
    assert (described.state, described.mode) == (InstanceState.RUNNING, PowerMode.GPU)

    rec.reset()
    rec.api.power_on(instance_id, PowerMode.GPU)  # already running as a GPU type: nothing to do
    assert rec.changes() == []
    assert rec.calls == ["DescribeInstances"]
    rec.api.release(instance_id)


@pytest.mark.integration
def test_power_off_then_boots_from_stopped_without_a_stop(rec, ec2):
    instance_id = rec.api.create("run-cycle").id
    rec.api.power_on(instance_id, PowerMode.GPU)
    rec.reset()

    rec.api.power_off(instance_id)
    assert rec.changes() == ["StopInstances"]
    stopped = rec.api.describe(instance_id)
    assert (stopped.state, stopped.mode, stopped.ssh) == (InstanceState.STOPPED, None, None)
    assert raw(ec2, instance_id)["InstanceType"] == GPU

    rec.reset()
    rec.api.power_on(instance_id, PowerMode.CPU)  # stopped in the GPU type: modify, then start
    assert rec.changes() == ["ModifyInstanceAttribute", "StartInstances"]
    assert rec.state_at_modify == ["stopped"]
    assert raw(ec2, instance_id)["InstanceType"] == CPU
    assert rec.api.describe(instance_id).mode is PowerMode.CPU

    rec.api.power_off(instance_id)
    rec.reset()
    rec.api.power_on(instance_id, PowerMode.CPU)  # stopped in the right type: only a start
    assert rec.changes() == ["StartInstances"]
    assert rec.api.describe(instance_id).state is InstanceState.RUNNING
    rec.api.release(instance_id)


@pytest.mark.integration
def test_release_terminates_the_instance_and_its_volume(rec, ec2):
    instance_id = rec.api.create("run-release").id
    volume = raw(ec2, instance_id)["BlockDeviceMappings"][0]["Ebs"]["VolumeId"]
    rec.api.power_off(instance_id)
    rec.reset()

    rec.api.release(instance_id)

    assert rec.changes() == ["TerminateInstances"]
    assert rec.api.describe(instance_id).state is InstanceState.RELEASED
    assert volume not in {v["VolumeId"] for v in ec2.describe_volumes()["Volumes"]}
    with pytest.raises(InstanceNotFound, match=instance_id):
        rec.api.power_on(instance_id, PowerMode.GPU)
    with pytest.raises(InstanceNotFound, match=instance_id):
        rec.api.power_off(instance_id)


@pytest.mark.integration
@pytest.mark.parametrize("bogus", ["i-0123456789abcdef0", "not-an-id"])
def test_unknown_instance_is_instance_not_found(rec, bogus):
    with pytest.raises(InstanceNotFound, match=bogus) as caught:
        rec.api.describe(bogus)
    assert "InvalidInstanceID" in caught.value.message
    assert "\n" not in caught.value.message


@pytest.mark.integration
def test_no_capacity_on_start_leaves_the_instance_stopped(rec, ec2):
    """moto never runs out of capacity, so EC2's refusal of the start is put in place of moto's
    answer through botocore's before-call hook (the mechanism botocore's Stubber uses)."""
    from botocore.awsrequest import AWSResponse

    instance_id = rec.api.create("run-nocap").id

    def refuse(**kwargs):
        error = {
            "Code": "InsufficientInstanceCapacity",
            "Message": "We currently do not have sufficient g5.xlarge capacity in the AZ you requested.",
        }
        return AWSResponse("", 500, {}, None), {"Error": error, "ResponseMetadata": {"HTTPStatusCode": 500}}

    rec.client.meta.events.register_first("before-call.ec2.StartInstances", refuse)
    rec.reset()
    expected = rf"start instance {instance_id} \(g5.xlarge\): InsufficientInstanceCapacity: We currently"
    with pytest.raises(NoCapacity, match=expected):
        rec.api.power_on(instance_id, PowerMode.GPU)
    assert rec.changes() == ["StopInstances", "ModifyInstanceAttribute", "StartInstances"]
    got = raw(ec2, instance_id)
    assert (got["State"]["Name"], got["InstanceType"]) == ("stopped", GPU)
    rec.api.release(instance_id)


@pytest.mark.integration
def test_waits_that_run_out_are_transient_and_wrong_turns_are_failures(rec):
    instance_id = rec.api.create("run-wait").id
    rec.api.describe(instance_id)
    # never asked to stop: the wait runs out
    with pytest.raises(Transient, match=rf"{instance_id} was not stopped after 5 checks"):
        rec.api._wait("instance_stopped", instance_id, "stopped")
    rec.api.release(instance_id)
    with pytest.raises(ProviderFailure, match=rf"{instance_id} became terminated"):
        rec.api._wait("instance_stopped", instance_id, "stopped")


@pytest.mark.integration
def test_client_from_settings_uses_the_credential_chain(settings, ec2):
    api = AwsInstances(settings, wait_delay_s=0.05, wait_max_attempts=5)
    assert api.balance() is None
    instance = api.create("run-chain")
    assert api.describe(instance.id).mode is PowerMode.CPU
    assert "testing" not in repr(api)
    api.release(instance.id)


# -- unit ------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        ("InsufficientInstanceCapacity", 500, NoCapacity),
        ("Server.InsufficientInstanceCapacity", 400, NoCapacity),
        ("InsufficientHostCapacity", 400, NoCapacity),
        ("AuthFailure", 401, AuthFailed),
        ("UnauthorizedOperation", 403, AuthFailed),
        ("InvalidClientTokenId", 403, AuthFailed),
        ("ExpiredToken", 400, AuthFailed),
        ("SignatureDoesNotMatch", 403, AuthFailed),
        ("InvalidInstanceID.NotFound", 400, InstanceNotFound),
        ("InvalidInstanceID.Malformed", 400, InstanceNotFound),
        ("RequestLimitExceeded", 503, Transient),
        ("Throttling", 400, Transient),
        ("InternalError", 500, Transient),
        ("SomethingNew", 503, Transient),
        ("VcpuLimitExceeded", 400, ProviderFailure),
        ("InstanceLimitExceeded", 400, ProviderFailure),
        ("IncorrectInstanceState", 400, ProviderFailure),
    ],
)
def test_client_errors_map_to_runner_errors(code, status, kind):
    error = map_aws_error(client_error(code, "AWS says\nso", status), "start instance i-0abc")
    assert type(error) is kind
    assert error.message.startswith(f"AWS could not start instance i-0abc: {code}: AWS says so")
    assert "\n" not in error.message


@pytest.mark.unit
def test_unknown_codes_keep_aws_words_verbatim():
    error = map_aws_error(
        client_error("InvalidAMIID.NotFound", "The image id '[ami-1]' does not exist", 400, "RunInstances"),
        "create instance 'x'",
    )
    assert type(error) is ProviderFailure
    assert error.message == (
        "AWS could not create instance 'x': InvalidAMIID.NotFound: The image id '[ami-1]' does not exist"
    )
    odd = error_for({"Code": "Odd"}, None, "stop instance i-1")
    assert odd.message == "AWS could not stop instance i-1: Odd"


@pytest.mark.unit
def test_connection_and_credential_failures():
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError, ReadTimeoutError

    url = "https://ec2.eu-west-1.amazonaws.com"
    down = map_aws_error(EndpointConnectionError(endpoint_url=url), "stop instance i-1")
    assert type(down) is Transient and "i-1" in down.message
    slow = map_aws_error(ReadTimeoutError(endpoint_url=url), "stop instance i-1")
    assert type(slow) is Transient
    missing = map_aws_error(NoCredentialsError(), "describe instance i-1")
    assert type(missing) is AuthFailed and "AWS_PROFILE" in missing.message


@pytest.mark.unit
def test_a_start_ec2_gave_up_on_reads_its_state_reason():
    capacity = {
        "StateReason": {
            "Code": "Server.InsufficientInstanceCapacity",
            "Message": "Server.InsufficientInstanceCapacity: Insufficient capacity to satisfy the request",
        }
    }
    assert type(boot_failure(capacity, "boot instance i-1")) is NoCapacity
    internal = {"StateReason": {"Code": "Server.InternalError", "Message": "Server.InternalError: oops"}}
    assert type(boot_failure(internal, "boot instance i-1")) is ProviderFailure
    user = {"StateReason": {"Code": "Client.UserInitiatedShutdown", "Message": "User initiated shutdown"}}
    assert boot_failure(user, "boot instance i-1") is None
    assert boot_failure({}, "boot instance i-1") is None


@pytest.mark.unit
def test_settings_are_immutable_and_checked():
    s = AwsSettings(
        region="eu-west-1", ami="ami-1", key_name="k", security_group_ids=["sg-1", "sg-2"], tags={"a": "b"}
    )
    assert s.security_group_ids == ("sg-1", "sg-2")
    assert s.tags == (("a", "b"),)
    assert (s.cpu_type, s.gpu_type, s.ssh_user, s.root_volume_gb) == ("t3.large", "g5.xlarge", "ubuntu", 100)
    assert s.prices() == {}
    assert s.type_for(PowerMode.GPU) == "g5.xlarge" and s.type_for(PowerMode.CPU) == "t3.large"
    hash(s)
    with pytest.raises(ValueError, match="must differ"):
        AwsSettings(region="r", ami="a", key_name="k", security_group_ids=("sg",), cpu_type="x", gpu_type="x")
    with pytest.raises(BadInput, match="security group"):
        AwsInstances(AwsSettings(region="r", ami="a", key_name="k", security_group_ids=())).create("x")


@pytest.mark.unit
def test_importing_the_provider_does_not_import_boto3():
    probe = "import sys, infra.aws; print('boto3' in sys.modules or 'botocore' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "False"
