"""Rates and budgets: where an hour's price comes from, and the caps checked before paying."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from infra.autodl_api import to_instance
from infra.base import Instance, InstanceState, PowerMode
from runner import billing, budget, pricing
from runner.cost import Interval
from runner.errors import BadInput, BudgetExceeded
from runner.spec import load_spec
from runner.store import Store
from tests.unit.test_store import make_run

pytestmark = pytest.mark.unit

DIGEST = "a" * 64
AWS = """\
  type: aws
  region: us-east-1
  instance: i-0123456789abcdef0
  key_file: key.pem
  cpu_type: t3.large
  gpu_type: g4dn.xlarge
"""


def spec_of(tmp_path: Path, provider: str = "  type: emulator\n", extra: str = ""):
    text = f"name: demo\nprovider:\n{provider}image: {{ref: 'sha256:{DIGEST}'}}\ntrain: {{run: 'true'}}\n"
    text += "outputs: [/out]\n" + extra
    (tmp_path / "job.yaml").write_text(text, encoding="utf-8")
    (tmp_path / "key.pem").write_text("not a real key\n", encoding="utf-8")
    return load_spec(tmp_path / "job.yaml").spec


def user_config(text: str) -> None:
    Path(os.environ["RUNNER_CONFIG"]).write_text(text, encoding="utf-8")


def test_an_estimate_over_a_cap_is_refused_with_the_estimate(tmp_path):
    rates = "pricing: {gpu_per_hour: 2.15, cpu_per_hour: 0.1}\n"
    spec = spec_of(
        tmp_path, extra=rates + "budget: {max_cost: 10, expected_gpu_hours: 5, expected_cpu_hours: 2}\n"
    )
    with pytest.raises(BudgetExceeded) as refused:
        budget.check_estimate(spec, pricing.for_job(spec))
    assert refused.value.exit_code == 4
    assert refused.value.message == (
        "estimated 10.95 CNY: 5 GPU h at 2.15/h + 2 no-GPU h at 0.1/h, over budget.max_cost 10"
    )
    spec = spec_of(tmp_path, extra=rates + "budget: {max_cost: 11, expected_gpu_hours: 5}\n")
    assert budget.check_estimate(spec, pricing.for_job(spec)).startswith("estimated 10.75 CNY")


def test_the_user_config_fills_in_what_the_spec_does_not_give(tmp_path):
    user_config('[pricing.emulator]\ncurrency = "USD"\ncpu_per_hour = 0.2\ngpu_per_hour = 3.5\n')
    rates = pricing.for_job(spec_of(tmp_path))
    assert (rates.currency, rates.cpu_per_hour, rates.gpu_per_hour) == ("USD", 0.2, 3.5)
    rates = pricing.for_job(spec_of(tmp_path, extra="pricing: {gpu_per_hour: 1.25}\n"))
    assert (rates.currency, rates.cpu_per_hour, rates.gpu_per_hour) == ("USD", 0.2, 1.25)


def test_instance_types_in_the_config_price_each_mode_of_an_aws_job(tmp_path):
    user_config(
        '[pricing.aws]\ncurrency = "USD"\ngpu_per_hour = 9.0\n'
        '[pricing.aws.types]\n"g4dn.xlarge" = 0.526\n"t3.large" = 0.0832\n'
    )
    rates = pricing.for_job(spec_of(tmp_path, AWS))
    assert (rates.currency, rates.cpu_per_hour, rates.gpu_per_hour) == ("USD", 0.0832, 0.526)


def test_a_price_the_provider_reports_wins_over_spec_and_config(tmp_path):
    user_config("[pricing.emulator]\ngpu_per_hour = 3.5\ncpu_per_hour = 0.2\n")
    spec = spec_of(tmp_path, extra="pricing: {gpu_per_hour: 1.0}\n")
    reported = Instance("i-1", InstanceState.STOPPED, price_per_hour={PowerMode.GPU: 2.15}, currency="CNY")
    assert pricing.rate(spec, reported, PowerMode.GPU) == (2.15, "CNY")
    assert pricing.rate(spec, reported, PowerMode.CPU) == (0.2, "CNY")  # not reported: the config's


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[pricing.aws\n", "not valid TOML"),
        (
            "[pricing.aws]\ngpu_per_hour = -1\n",
            "pricing.aws.gpu_per_hour: Input should be greater than or equal to 0",
        ),
        ("[pricing.aws]\ngpu_per_huor = 1\n", "pricing.aws.gpu_per_huor: Extra inputs are not permitted"),
    ],
)
def test_a_bad_user_config_is_an_error_naming_the_file_and_field(tmp_path, text, expected):
    user_config(text)
    with pytest.raises(BadInput) as refused:
        pricing.for_job(spec_of(tmp_path))
    assert refused.value.message.startswith(os.environ["RUNNER_CONFIG"] + ": ")
    assert expected in refused.value.message


def test_max_hourly_price_is_held_against_the_configured_and_the_reported_price(tmp_path):
    user_config("[pricing.emulator]\ngpu_per_hour = 3.5\n")
    spec = spec_of(tmp_path, extra="budget: {max_hourly_price: 2.5}\n")
    with pytest.raises(BudgetExceeded, match=r"the job's pricing puts the GPU at 3.5 CNY/h, over budget"):
        budget.check_estimate(spec, pricing.for_job(spec))
    with pytest.raises(
        BudgetExceeded, match="gives the GPU's price in USD; budget.max_hourly_price is in CNY"
    ):
        budget.check_hourly_price(spec, "CNY", 1.0, "USD", "aws instance i-1")
    budget.check_hourly_price(spec, "CNY", 2.5, "CNY", "emulator instance i-1")  # at the cap: allowed


def test_autodl_stop_times_are_read_from_the_instance_list():
    item = {"uuid": "u-1", "status": "shutdown", "payg_price": 2150}
    stopped = to_instance({**item, "stopped_at": {"Time": "2026-11-28T10:00:00+08:00", "Valid": True}})
    assert stopped.stopped_at == 1795831200.0
    assert (
        to_instance({**item, "stopped_at": {"Time": "0001-01-01T00:00:00Z", "Valid": False}}).stopped_at
        is None
    )
    assert to_instance({**item, "stopped_at": {"Time": "yesterday", "Valid": True}}).stopped_at is None
    running = {
        **item,
        "status": "running",
        "stopped_at": {"Time": "2026-11-28T10:00:00+08:00", "Valid": True},
    }
    assert to_instance(running).stopped_at is None  # an old stop of an instance running again


@pytest.mark.parametrize(
    ("stopped_at", "expected_end", "source"),
    [
        (1150.0, 1150.0, "provider"),  # inside the interval: the provider's own time
        (None, 1200.0, "controller"),  # not reported: when the controller saw it off
        (900.0, 1200.0, "controller"),  # before the boot (an earlier stop, or a skewed clock)
        (1300.0, 1200.0, "controller"),  # after the controller saw it off: a skewed clock
    ],
)
def test_an_interval_ends_at_the_providers_stop_time_only_where_it_can_be(
    tmp_path, stopped_at, expected_end, source
):
    with Store(tmp_path) as store:
        store.open_interval(Interval("i-1", "gpu", 1000.0, None, 2.15, "CNY", "controller"))
        off = Instance("i-1", InstanceState.STOPPED, stopped_at=stopped_at)
        billing.close_at_stop(store, off, 1200.0)
        (closed,) = store.ledger()
    assert (closed.ended_at, closed.source) == (expected_end, source)


@pytest.mark.parametrize("laptop_clock_step", [-3600.0, 0.0, 3600.0])
def test_an_interval_this_process_opened_is_timed_on_the_steady_clock(tmp_path, laptop_clock_step):
    """A wall clock stepped between boot and stop moves neither the interval's length nor which
    witness ends it: 200 steady seconds after the boot, the provider's stop at +150 is taken."""
    steady_at_boot = billing.steady_now() - 200.0  # the boot was asked for 200 s ago
    with Store(tmp_path) as store:
        store.open_interval(Interval("i-1", "gpu", 1000.0, None, 2.15, "CNY", "controller"))
        billing.close_at_stop(
            store,
            Instance("i-1", InstanceState.STOPPED),
            1200.0 + laptop_clock_step,
            (1000.0, steady_at_boot),
        )
        (closed,) = store.ledger()
        assert closed.source == "controller" and 1199.0 < closed.ended_at < 1202.0
        store.open_interval(Interval("i-2", "gpu", 1000.0, None, 2.15, "CNY", "controller"))
        off = Instance("i-2", InstanceState.STOPPED, stopped_at=1150.0)
        billing.close_at_stop(store, off, 1200.0 + laptop_clock_step, (1000.0, steady_at_boot))
        closed = store.ledger()[-1]
    assert (closed.ended_at, closed.source) == (1150.0, "provider")


def test_an_interval_opened_by_another_process_is_not_timed_by_this_ones_clock(tmp_path):
    with Store(tmp_path) as store:
        store.open_interval(Interval("i-1", "gpu", 1000.0, None, 2.15, "CNY", "controller"))
        billing.close_at_stop(
            store, Instance("i-1", InstanceState.STOPPED), 1200.0, (1100.0, billing.steady_now())
        )
        (closed,) = store.ledger()
    assert closed.ended_at == 1200.0  # the steady reading belonged to another interval's boot


def test_a_boot_after_the_laptop_clock_went_back_starts_where_the_last_interval_ended(tmp_path):
    spec = spec_of(tmp_path)
    with Store(tmp_path) as store:
        store.create_run(make_run("run-1"))
        store.open_interval(Interval("i-1", "gpu", 1000.0, 1500.0, 2.15, "CNY", "provider", "run-1"))
        instance = Instance("i-1", InstanceState.RUNNING)
        opened = billing.open_for_boot(
            store, spec, "run-1", "collect", instance, PowerMode.CPU, 1500.0 - 3600
        )
        intervals = store.ledger("run-1")
    assert opened == 1500.0
    assert [(i.mode, i.started_at, i.ended_at) for i in intervals] == [
        ("gpu", 1000.0, 1500.0),
        ("cpu", 1500.0, None),
    ]
