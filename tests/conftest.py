"""Shared fixtures: every test gets its own RUNNER_HOME, so no test touches real state."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def runner_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("runner-home")
    monkeypatch.setenv("RUNNER_HOME", str(home))
    return home
