"""The emulator over HTTP, against real containers: lifecycle, modes, disks, ports, money, faults."""

from __future__ import annotations

import os

import pytest

from infra.emulator.service import ALREADY_OFF, ALREADY_ON, NO_GPU, PRO_GPU_ONLY, RELEASE_RUNNING
from tests.emulator.conftest import run, ssh

pytestmark = pytest.mark.integration

ENVELOPE = {"code", "msg", "data", "request_id"}


def cpu_quota(client) -> float:
    """The container's CPU limit in cores as its cgroup shows it (v1 or v2); -1: none."""
    v1 = "/sys/fs/cgroup/cpu/cpu.cfs_"
    text = run(
        client, f"cat /sys/fs/cgroup/cpu.max 2>/dev/null || echo $(cat {v1}quota_us) $(cat {v1}period_us)"
    )
    quota, period = text.split()
    return -1.0 if quota in ("max", "-1") else int(quota) / int(period)


def test_power_cycle_keeps_disks_changes_port_and_mode(emulator):
    service, api = emulator
    uuid = api.create("cycle")
    snap = api.snapshot(uuid)
    assert snap["status"] == "shutdown" and snap["instance_name"] == "cycle"
    listed = api.ok("POST", "/api/v1/instance", {"page_index": 1, "page_size": 100})["list"]
    assert uuid in [i["uuid"] for i in listed]

    first = api.boot(uuid, "non_gpu")
    assert first["start_mode"] == "non_gpu" and first["proxy_host"] == "127.0.0.1"
    assert first["ssh_command"] == f"ssh -p {first['ssh_port']} root@127.0.0.1"
    with ssh(first) as client:
        assert run(client, "cat /etc/autodl-mode").strip() == "non_gpu"
        assert cpu_quota(client) == pytest.approx(0.5)
        assert "docker" not in run(client, "ls /usr/bin /usr/sbin")
        run(client, "echo kept > /root/autodl-tmp/data.txt && echo sys > /root/system.txt")
        host_key = client.get_transport().get_remote_server_key().get_base64()
    status, again = api.power_on(uuid, "gpu")
    assert (status, again["code"], again["msg"]) == (200, "InstanceError", ALREADY_ON)

    assert api.off(uuid)["stopped_at"]["Valid"] is True
    status, again = api.call("POST", "/api/v1/instance/power_off", {"instance_uuid": uuid})
    assert (again["code"], again["msg"]) == ("InstanceError", ALREADY_OFF)

    second = api.boot(uuid, "gpu")
    assert second["ssh_port"] != first["ssh_port"] and second["start_mode"] == "gpu"
    with ssh(second) as client:
        assert run(client, "cat /root/autodl-tmp/data.txt /root/system.txt").split() == ["kept", "sys"]
        assert run(client, "cat /etc/autodl-mode").strip() == "gpu"
        assert cpu_quota(client) in (-1.0, pytest.approx(float(os.cpu_count())))
        assert client.get_transport().get_remote_server_key().get_base64() == host_key
        client.exec_command("shutdown -h now")
    api.wait_status(uuid, "shutdown", timeout=10)

    log = [i for i in api.ok("GET", "/emulator/v1/power_log") if i["instance_uuid"] == uuid]
    assert [i["mode"] for i in log] == ["non_gpu", "gpu"]
    assert all(i["ended_at"] is not None for i in log)
    rates = {"gpu": 2.15, "non_gpu": 0.10}
    for interval in log:
        assert interval["seconds"] == pytest.approx(interval["ended_at"] - interval["started_at"])
        assert interval["cost"] == pytest.approx(interval["seconds"] * rates[interval["mode"]] / 3600)
    everything = api.ok("GET", "/emulator/v1/power_log")
    assert all(i["ended_at"] is not None for i in everything), "nothing may be left running"
    wallet = api.ok("POST", "/api/v1/dev/wallet/balance")
    spent = sum(i["cost"] for i in everything)
    assert wallet["assets"] == pytest.approx((100.0 - spent) * 1000, abs=1)
    assert wallet["accumulate"] == pytest.approx(spent * 1000, abs=1)
    assert api.snapshot(uuid)["payg_price"] == 2150


def test_no_gpu_stock_fails_exactly_the_next_n_gpu_boots(emulator):
    _, api = emulator
    uuid = api.create("stock")
    assert api.ok("POST", "/emulator/v1/faults", {"no_gpu_stock": 2})["no_gpu_stock"] == 2
    assert api.snapshot(uuid)["gpu_idle_num"] == 0
    for _ in range(2):
        status, answer = api.power_on(uuid, "gpu")
        assert status == 200 and set(answer) == ENVELOPE
        assert (answer["code"], answer["msg"], answer["data"]) == ("InstanceError", NO_GPU, None)
        assert api.snapshot(uuid)["status"] == "shutdown"
    api.boot(uuid, "gpu")
    api.off(uuid)


def test_auth_failures(emulator):
    _, api = emulator
    for token in ("wrong", ""):
        status, answer = api.call("POST", "/api/v1/instance", {}, token=token)
        assert status == 401 and set(answer) == ENVELOPE and answer["code"] == "AuthorizeFailed"
    api.ok("POST", "/emulator/v1/faults", {"expire_token": True})
    try:
        status, answer = api.call("POST", "/api/v1/dev/wallet/balance")
        assert status == 200
        assert (answer["code"], answer["msg"]) == ("AuthorizeFailed", "登陆超时，请重新登录")
    finally:
        api.ok("POST", "/emulator/v1/faults", {"expire_token": False})
    api.ok("POST", "/api/v1/dev/wallet/balance")


def test_low_balance_and_http_500_and_unknown_instance(emulator):
    _, api = emulator
    uuid = api.create("money")
    api.ok("POST", "/emulator/v1/faults", {"low_balance": True})
    try:
        _, answer = api.power_on(uuid, "non_gpu")
        assert "余额不足" in answer["msg"] and answer["code"] != "Success"
    finally:
        api.ok("POST", "/emulator/v1/faults", {"low_balance": False})

    api.ok("POST", "/emulator/v1/faults", {"http_500": 2})
    for _ in range(2):
        status, answer = api.call("GET", f"/api/v1/instance/snapshot?instance_uuid={uuid}")
        assert status == 500 and set(answer) == ENVELOPE
    assert api.snapshot(uuid)["uuid"] == uuid

    _, answer = api.call("GET", "/api/v1/instance/snapshot?instance_uuid=nope")
    assert "不存在" in answer["msg"] and set(answer) == ENVELOPE


def test_pro_api_boots_with_gpu_only_and_releases(emulator):
    _, api = emulator
    uuid = api.ok("POST", "/api/v1/dev/instance/pro/create", {"instance_name": "pro", "req_gpu_amount": 1})
    assert uuid.startswith("pro-")
    assert api.ok("GET", f"/api/v1/dev/instance/pro/status?instance_uuid={uuid}") == "shutdown"
    _, answer = api.power_on(uuid, "non_gpu", prefix="/api/v1/dev/instance/pro")
    assert answer["msg"] == PRO_GPU_ONLY
    body = {"instance_uuid": uuid, "payload": "gpu", "start_command": ""}
    api.ok("POST", "/api/v1/dev/instance/pro/power_on", body)
    api.wait_status(uuid, "running")
    assert api.ok("GET", f"/api/v1/dev/instance/pro/snapshot?instance_uuid={uuid}")["start_mode"] == "gpu"
    _, answer = api.call("POST", "/api/v1/dev/instance/pro/release", {"instance_uuid": uuid})
    assert answer["msg"] == RELEASE_RUNNING
    api.ok("POST", "/api/v1/dev/instance/pro/power_off", {"instance_uuid": uuid})
    api.wait_status(uuid, "shutdown")
    api.ok("POST", "/api/v1/dev/instance/pro/release", {"instance_uuid": uuid})
    assert api.snapshot(uuid)["status"] == "released"
    listed = api.ok("POST", "/api/v1/dev/instance/pro/list", {"page_index": 1, "page_size": 10})["list"]
    assert uuid not in [i["uuid"] for i in listed]


def test_calls_whose_answers_are_lost_take_effect_once(emulator):
    """Late answers (the call took effect, the client timed out): a create is found by name, not
    sent again; a power-off or release refused as done already is done."""
    from infra import instances
    from infra.autodl_api import AutodlClient, ConsoleInstances, Retry
    from infra.base import InstanceState, PowerMode

    service, api = emulator
    client = AutodlClient(api.url, api.token, timeout=1.0, retry=Retry(first_delay=0.2))
    console = ConsoleInstances(client, image="any", can_release=True)
    policy = instances.BootPolicy(poll_s=0.2)
    before = {item["uuid"] for item in api.ok("POST", "/api/v1/instance", {})["list"]}
    api.ok("POST", "/emulator/v1/faults", {"late": 1, "late_s": 2.0})
    try:
        made = console.create("late-create")
        after = api.ok("POST", "/api/v1/instance", {})["list"]
        assert [i["uuid"] for i in after if i["uuid"] not in before] == [made.id]

        instances.boot(console, made.id, PowerMode.CPU, policy, lambda _: None)
        api.ok("POST", "/emulator/v1/faults", {"late": 1})
        assert instances.shut(console, made.id, policy).state is InstanceState.STOPPED
        api.ok("POST", "/emulator/v1/faults", {"late": 1})
        instances.release(console, made.id)
    finally:
        api.ok("POST", "/emulator/v1/faults", {"late": 0, "late_s": 10.0})
    assert api.snapshot(made.id)["status"] == "released"
    assert [i["mode"] for i in api.ok("GET", "/emulator/v1/power_log") if i["instance_uuid"] == made.id] == [
        "non_gpu"
    ]
