"""Progress output: bars on a terminal, throttled plain lines elsewhere, nothing when quiet."""

from __future__ import annotations

import io

import pytest

from runner.console import Reporter
from runner.progress import Progress

pytestmark = pytest.mark.unit

STEP = "step 10/60 loss 3.2100 lr 3.00e-03 1234 tok/s padding 12.0% mem 0.40 GiB"


def test_without_a_terminal_a_transfer_prints_a_few_plain_lines(monkeypatch):
    clock = iter([0.0, 0.5, 1.0, 2.5, 3.0])
    monkeypatch.setattr("runner.progress.time.monotonic", lambda: next(clock))
    out = io.StringIO()
    progress = Progress(out, bars=False)
    for done in (0, 10_000_000, 20_000_000, 30_000_000):  # at 0 s, 0.5 s, 1 s, 2.5 s
        progress("sha256:" + "ab" * 32, done, 50_000_000)
    progress("sha256:" + "ab" * 32, 50_000_000, 50_000_000)  # done: always shown
    assert out.getvalue().splitlines() == [
        "  layer abababababab: 0.0/50.0 MB (0%)",
        "  layer abababababab: 30.0/50.0 MB (60%)",
        "  layer abababababab: 50.0/50.0 MB (100%)",
    ]
    assert "\x1b[" not in out.getvalue()


def test_on_a_terminal_transfers_and_training_are_bars(monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")  # a wide terminal: one row per bar
    out = io.StringIO()
    progress = Progress(out, bars=True)
    progress.cost_so_far = lambda: "0.0123 CNY so far"
    progress.sink("input in/data.json")(5_000_000, 10_000_000)
    progress.print("a line above the bars")
    progress.training_line(STEP)
    progress.close()
    text = out.getvalue()
    assert "input in/data.json" in text and "5.0/10.0 MB" in text and "━" in text
    assert "10/60 steps" in text and "loss 3.2100  1234 tok/s  0.0123 CNY so far" in text
    assert "a line above the bars" in text


def test_lines_that_are_not_step_lines_leave_the_training_bar_alone():
    out = io.StringIO()
    progress = Progress(out, bars=True)
    progress.training_line("step 20 val_loss 2.9000")  # an evaluation: no total, no bar
    progress.close()
    assert out.getvalue() == ""


def test_quiet_shows_no_progress_at_all():
    out = io.StringIO()
    reporter = Reporter(quiet=True, stream=out, bars=True)
    reporter.progress("sha256:" + "cd" * 32, 1, 2)
    reporter.output("train", STEP)
    reporter.info("hello")
    reporter.close()
    assert out.getvalue() == ""
