"""The fault suite: the whole system attacked while it works, each scenario checked for a correct
end state, intact artifacts, no GPU time past the watchdog's bound and a consistent store.

By default a fast subset of each scenario family runs (the one `.ci/run` uses); RUNNER_FAULTS=full
runs every scenario (`RUNNER_FAULTS=full .venv/bin/pytest tests/faults`, or bench/reliability.py
--full). Traffic goes to 127.0.0.1 and the tests' own containers only.
"""

from __future__ import annotations

import os

import pytest

from tests.emulator.conftest import cloud, instance_image, tiny_image  # noqa: F401 (fixtures used here)
from tests.remote.conftest import images, root_key, sshd_image, start_host  # noqa: F401

FULL = os.environ.get("RUNNER_FAULTS") == "full"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/faults/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.faults)


def chosen(cases: dict, fast: set[str]) -> list:
    """All cases with RUNNER_FAULTS=full; otherwise those in fast."""
    return [name for name in cases if FULL or name in fast]
