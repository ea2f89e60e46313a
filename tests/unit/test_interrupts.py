"""Interrupts end the controller at safe points only: a held one is raised once the work is done."""

import os
import signal

import pytest

from runner import interrupts


def test_a_sigterm_during_a_deferred_block_is_raised_after_it(capsys):
    done = []
    with (
        pytest.raises(KeyboardInterrupt, match="SIGTERM"),
        interrupts.raised_as_keyboard_interrupt(),
        interrupts.deferred("starting train"),
    ):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # a second one is held too, not raised mid-way
        done.append("started")
    assert done == ["started"]
    assert capsys.readouterr().err == "runner: interrupted; finishing starting train first\n"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_a_deferred_block_without_an_interrupt_ends_quietly(capsys):
    with interrupts.raised_as_keyboard_interrupt(), interrupts.deferred("starting train"):
        pass
    assert capsys.readouterr().err == ""


def test_ignored_signals_do_not_end_teardown():
    with interrupts.ignored():
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGHUP)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
