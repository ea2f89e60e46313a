"""The cost ledger's arithmetic: reports in any order, overlapping, from several sources and
clocks, settle into a timeline that bills every second once; currencies never mix."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runner.cost import SOURCES, Interval, run_report, settled, totals

pytestmark = pytest.mark.unit
NOW = 10_000.0


def interval(start, end, mode="gpu", rate=3600.0, currency="CNY", source="controller", instance="i1"):
    return Interval(instance, mode, start, end, rate, currency, source)


reports = st.lists(
    st.builds(
        lambda start, length, open_, source, instance, mode: interval(
            start, None if open_ else start + length, mode=mode, source=source, instance=instance
        ),
        st.floats(0, 5000),
        st.floats(0, 3000),
        st.booleans(),
        st.sampled_from(SOURCES),
        st.sampled_from(["i1", "i2"]),
        st.sampled_from(["cpu", "gpu"]),
    ),
    max_size=12,
)


def covered(intervals, instance: str) -> float:
    """Seconds of the union of an instance's intervals: what a correct settlement bills."""
    spans = sorted((i.started_at, i.end(NOW)) for i in intervals if i.instance_id == instance)
    total, reach = 0.0, float("-inf")
    for start, end in spans:
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


@given(reports, st.randoms())
def test_every_second_is_billed_once_whatever_the_order_of_reports(items, random):
    shuffled = list(items)
    random.shuffle(shuffled)
    timeline = settled(shuffled, NOW)
    assert timeline == settled(items, NOW)  # the order of reports does not matter
    for instance in ("i1", "i2"):
        mine = [i for i in timeline if i.instance_id == instance]
        assert sum(i.seconds(NOW) for i in mine) == pytest.approx(covered(items, instance), abs=1e-6)
        for before, after in zip(mine, mine[1:], strict=False):
            assert before.end(NOW) <= after.started_at + 1e-9  # never overlapping


def test_where_reports_overlap_the_more_direct_witness_keeps_the_seconds():
    controller = interval(100, 220)  # closed when the controller next looked
    watchdog = interval(100, 150, source="watchdog")  # up to the moment it powered the instance off
    timeline = settled([controller, watchdog], NOW)
    assert [(i.source, i.started_at, i.ended_at) for i in timeline] == [
        ("watchdog", 100, 150),
        ("controller", 150, 220),  # seconds only the controller saw are still billed
    ]


def test_a_skewed_instance_clock_cannot_bill_seconds_twice():
    """The watchdog's clock runs 30 s ahead of the laptop's: its report overlaps the controller's
    next interval; the overlap is billed once (by the more direct witness)."""
    gpu = interval(1000, 1100)
    watchdog = interval(1000, 1130, source="watchdog")
    cpu = interval(1110, 1200, mode="cpu", rate=360.0)
    timeline = settled([gpu, watchdog, cpu], NOW)
    assert sum(i.seconds(NOW) for i in timeline) == pytest.approx(200)
    assert [(i.mode, i.started_at, i.end(NOW)) for i in timeline] == [
        ("gpu", 1000, 1130),
        ("cpu", 1130, 1200),
    ]


def test_totals_keep_currencies_apart_and_open_intervals_count_until_now():
    items = [
        interval(0, 3600, rate=2.15),
        interval(3600, None, mode="cpu", rate=0.1, instance="i1"),
        interval(0, 1800, rate=1.0, currency="USD", instance="i2"),
    ]
    (cny, usd) = totals(items, NOW)
    assert cny.currency == "CNY" and usd.currency == "USD"
    assert cny.cost == pytest.approx({"gpu": 2.15, "cpu": 0.1 * (NOW - 3600) / 3600})
    assert usd.seconds == {"gpu": 1800} and usd.total == pytest.approx(0.5)
    report = run_report("r1", items, NOW)
    assert [t["currency"] for t in report["totals"]] == ["CNY", "USD"]
    assert len(report["timeline"]) == 3
