"""Shared fixtures: every test gets its own RUNNER_HOME and user config file (none unless the
test writes one), so no test touches real state or reads the user's settings."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def runner_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("runner-home")
    monkeypatch.setenv("RUNNER_HOME", str(home))
    monkeypatch.setenv("RUNNER_CONFIG", str(home / "config.toml"))
    return home
