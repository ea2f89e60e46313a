"""Checks of the SSH layer that need no host: remote path validation and the host key table."""

from __future__ import annotations

import pytest

from runner.errors import BadInput
from runner.remote import check_remote_path
from runner.store import Store

pytestmark = pytest.mark.unit


@pytest.fixture
def store(runner_home) -> Store:
    with Store(runner_home) as opened:
        yield opened


@pytest.mark.parametrize(
    "path",
    ["relative/file", "/srv/../etc/passwd", "/srv/a\nb", "/srv/tab\there", "/srv/folder/", "/srv/\x7f"],
)
def test_unsafe_remote_paths_are_refused(path):
    with pytest.raises(BadInput, match="remote path"):
        check_remote_path(path)


def test_remote_paths_are_normalised():
    assert check_remote_path("/srv//data/./file.bin") == "/srv/data/file.bin"


def test_host_keys_round_trip_through_the_store(store):
    assert store.host_key("example", 22) is None
    store.pin_host_key("example", 22, "ssh-ed25519", "SHA256:one")
    store.pin_host_key("example", 2222, "ssh-rsa", "SHA256:other")
    store.pin_host_key("example", 22, "ssh-ed25519", "SHA256:two")
    assert store.host_key("example", 22).fingerprint == "SHA256:two"
    assert store.host_key("example", 2222).key_type == "ssh-rsa"
