"""The registry client (runner/remote_scripts/registry_fetch.py) against a real registry.

Debian's docker-registry serves a pushed test image on 127.0.0.1; the fetcher runs as it does
on an instance (a subprocess fed a plan file and the credentials by environment), and a relay
in front of the registry cuts or corrupts a blob in flight.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from runner.layer_sources import resolve_source
from runner.remote_scripts import registry_fetch
from runner.spec import ImageSpec
from tests.remote import registry_server
from tests.remote.conftest import BASE_IMAGE
from tests.remote.flaky_proxy import FlakyProxy
from tests.remote.token_front import TokenFront

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not registry_server.available(), reason="needs docker-registry (scripts/ensure-test-hosts)"
    ),
]
SCRIPT = Path(registry_fetch.__file__)
REPOSITORY = "base/bookworm"


@pytest.fixture(scope="module")
def storage(registry_storage) -> Path:
    """Registry storage holding the test base image."""
    registry_storage.push(BASE_IMAGE, f"{REPOSITORY}:minbase")
    return registry_storage.path


@pytest.fixture(scope="module")
def registry(storage, tmp_path_factory):
    server = registry_server.start_local(tmp_path_factory.mktemp("plain"), storage)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def locked_registry(storage, tmp_path_factory):
    server = registry_server.start_local(tmp_path_factory.mktemp("basic"), storage, basic_auth=True)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def resolved(registry) -> dict:
    return registry_fetch.resolve(f"{registry.host}/{REPOSITORY}:minbase", [registry.url])


def base_id() -> str:
    out = subprocess.run(
        ["docker", "image", "inspect", "-f", "{{.Id}}", BASE_IMAGE], capture_output=True, text=True
    )
    return out.stdout.strip()


def fetch(
    tmp_path: Path, sources: list[str], layers: list[dict], env: dict | None = None
) -> tuple[int, list[dict]]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    plan = {"sources": sources, "repository": REPOSITORY, "dest": str(tmp_path / "layers"), "layers": layers}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "plan.json")],
        capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin", **(env or {})},
    )  # fmt: skip
    return proc.returncode, [json.loads(line) for line in proc.stdout.splitlines()]


def tar_sha256(tmp_path: Path, diff_id: str) -> str:
    data = (tmp_path / "layers" / f"{diff_id.split(':')[1]}.tar").read_bytes()
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_resolve_gives_the_layers_with_their_diff_ids(resolved, registry):
    assert resolved["config_digest"] == base_id()  # the registry's config is the local image's
    assert resolved["source"] == registry.host and resolved["dropped"] == []
    layer = resolved["layers"][0]
    assert layer["media_type"] == "application/vnd.docker.image.rootfs.diff.tar.gzip"
    assert layer["size"] > 1 << 20 and layer["digest"].startswith("sha256:")


def test_fetch_writes_each_layer_under_its_verified_diff_id(tmp_path, resolved, registry):
    code, events = fetch(tmp_path, [registry.url], resolved["layers"])
    assert code == 0, events
    layer = resolved["layers"][0]
    fetched = [e for e in events if e["event"] == "fetched"]
    assert fetched == [
        {**fetched[0], "diff_id": layer["diff_id"], "source": registry.host, "bytes": layer["size"]}
    ]
    assert tar_sha256(tmp_path, layer["diff_id"]) == layer["diff_id"]
    names = sorted(p.name for p in (tmp_path / "layers").iterdir())
    assert names == sorted(
        [layer["diff_id"].split(":")[1] + ".tar", "." + layer["diff_id"].split(":")[1] + ".lock"]
    )


def test_an_unreachable_mirror_is_dropped_and_the_next_source_serves(tmp_path, resolved, registry):
    dead = "http://127.0.0.1:9"  # discard port: nothing listens
    code, events = fetch(tmp_path, [dead, registry.url], resolved["layers"])
    assert code == 0
    dropped = [e for e in events if e["event"] == "dropped"]
    assert dropped == [{"event": "dropped", "source": "127.0.0.1:9", "reason": dropped[0]["reason"]}]
    assert "cannot be reached" in dropped[0]["reason"]
    assert [e["source"] for e in events if e["event"] == "fetched"] == [registry.host]


def test_no_reachable_source_reports_the_layer_missing_for_the_laptop(tmp_path, resolved):
    code, events = fetch(tmp_path, ["http://127.0.0.1:9"], resolved["layers"])
    assert code == 0
    assert [e["event"] for e in events] == ["dropped", "missing"]
    assert not list((tmp_path / "layers").glob("*.tar"))


def test_a_blob_cut_mid_way_is_resumed_with_a_range(tmp_path, resolved, registry):
    address, port = registry.host.split(":")
    proxy = FlakyProxy((address, int(port)), "cut", after=5 << 20)
    relay = proxy.start()
    try:
        code, events = fetch(tmp_path, [f"http://{relay}"], resolved["layers"])
    finally:
        proxy.stop()
    assert code == 0, events
    layer = resolved["layers"][0]
    assert proxy.triggered and any(b"Range: bytes=" in r for r in proxy.requests)
    assert proxy.relayed < layer["size"] + (1 << 20)  # the first 5 MB were not sent again
    assert tar_sha256(tmp_path, layer["diff_id"]) == layer["diff_id"]


def test_a_blob_corrupted_in_flight_is_discarded_and_fetched_again(tmp_path, resolved, registry):
    address, port = registry.host.split(":")
    proxy = FlakyProxy((address, int(port)), "corrupt", after=3 << 20)
    relay = proxy.start()
    try:
        code, events = fetch(tmp_path, [f"http://{relay}"], resolved["layers"])
    finally:
        proxy.stop()
    assert code == 0, events
    corrupt = [e for e in events if e["event"] == "corrupt"]
    assert len(corrupt) == 1 and corrupt[0]["attempt"] == 1
    layer = resolved["layers"][0]
    assert tar_sha256(tmp_path, layer["diff_id"]) == layer["diff_id"]


def test_a_registry_serving_a_corrupt_blob_twice_stops_the_fetch_naming_it(tmp_path, resolved, storage):
    damaged = registry_server.copy_storage(storage, tmp_path / "damaged")
    blob = registry_server.blob_path(damaged, resolved["layers"][0]["digest"])
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    server = registry_server.start_local(tmp_path, damaged)
    try:
        code, events = fetch(tmp_path, [server.url], resolved["layers"])
    finally:
        server.stop()
        shutil.rmtree(damaged)
    assert code == 3
    errors = [e["reason"] for e in events if e["event"] == "error"]
    assert len(errors) == 1 and errors[0].startswith(f"registry {server.host} served blob sha256:")
    assert "corrupt twice" in errors[0]
    assert not list((tmp_path / "layers").glob("*.tar")) and not list((tmp_path / "layers").glob(".*.part"))


def test_basic_auth_credentials_come_from_the_environment(tmp_path, resolved, locked_registry):
    env = {"REGISTRY_USER": locked_registry.user, "REGISTRY_PASSWORD": locked_registry.password}
    code, events = fetch(tmp_path, [locked_registry.url], resolved["layers"], env)
    assert code == 0, events
    assert locked_registry.password not in json.dumps(events)


def test_refused_credentials_stop_the_fetch_with_a_clear_error(tmp_path, resolved, locked_registry):
    env = {"REGISTRY_USER": locked_registry.user, "REGISTRY_PASSWORD": "wrong-" + locked_registry.password}
    code, events = fetch(tmp_path, [locked_registry.url], resolved["layers"], env)
    assert code == 2
    errors = [e["reason"] for e in events if e["event"] == "error"]
    assert errors == [
        f"registry {locked_registry.host} refused the credentials in REGISTRY_USER/REGISTRY_PASSWORD"
    ]
    assert locked_registry.password not in json.dumps(events)


def test_a_registry_wanting_credentials_none_were_given_for_is_dropped(tmp_path, resolved, locked_registry):
    code, events = fetch(tmp_path, [locked_registry.url], resolved["layers"])
    assert code == 0
    assert [e["event"] for e in events] == ["dropped", "missing"]
    assert "needs credentials" in events[0]["reason"]


def test_the_laptop_resolves_with_the_job_credentials_and_refusal_is_bad_input(locked_registry, monkeypatch):
    from runner.errors import BadInput

    spec = ImageSpec.model_validate(
        {
            "ref": "sha256:" + "0" * 64,
            "registry": {
                "base": f"{locked_registry.host}/{REPOSITORY}:minbase",
                "username_env": "REG_USER",
                "password_env": "REG_PASS",
            },
        }
    )
    monkeypatch.setenv("REG_USER", locked_registry.user)
    monkeypatch.setenv("REG_PASS", locked_registry.password)
    found = resolve_source(spec, None, "ssh", lambda line: None)
    assert found is not None and found.config_digest == base_id()
    assert found.credentials_env() == {
        "REGISTRY_USER": locked_registry.user,
        "REGISTRY_PASSWORD": locked_registry.password,
    }
    assert locked_registry.password not in json.dumps(found.to_lock())
    monkeypatch.setenv("REG_PASS", "wrong")
    with pytest.raises(BadInput, match="refused the credentials"):
        resolve_source(spec, None, "ssh", lambda line: None)


def test_a_base_no_registry_has_means_the_laptop_sends_everything(registry):
    spec = ImageSpec.model_validate(
        {"ref": "sha256:" + "0" * 64, "registry": {"base": f"{registry.host}/no/such:image"}}
    )
    said: list[str] = []
    assert resolve_source(spec, None, "ssh", said.append) is None
    assert len(said) == 1 and said[0].startswith(f"no registry could resolve {registry.host}/no/such:image")
    assert said[0].endswith("the laptop sends every layer")


def test_two_fetches_of_one_layer_take_turns(tmp_path, resolved, registry):
    """A second sync (or a fetch an interrupted sync left running) waits for the layer's lock,
    then finds it in the cache: nothing is written twice, nothing is taken for corrupt."""
    plan = {"sources": [registry.url], "repository": REPOSITORY, "dest": str(tmp_path / "layers")}
    (tmp_path / "plan.json").write_text(json.dumps({**plan, "layers": resolved["layers"]}))
    argv = [sys.executable, str(SCRIPT), str(tmp_path / "plan.json")]
    both = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=300)[0] for proc in both]
    assert [proc.returncode for proc in both] == [0, 0]
    events = [json.loads(line) for out in outputs for line in out.splitlines()]
    fetched = sorted(e["source"] for e in events if e["event"] == "fetched")
    assert fetched == sorted([registry.host, "cache"]) and not [e for e in events if e["event"] == "corrupt"]
    layer = resolved["layers"][0]
    assert tar_sha256(tmp_path, layer["diff_id"]) == layer["diff_id"]


@pytest.fixture
def front(registry):
    """Docker Hub's habits (a bearer token service, blobs redirected to storage) in front of
    the real registry."""
    fronts: list[TokenFront] = []

    def start(credentials: tuple[str, str] | None = None) -> tuple[TokenFront, str]:
        server = TokenFront(registry.url, credentials)
        fronts.append(server)
        return server, server.start()

    yield start
    for server in fronts:
        server.stop()


@pytest.mark.security
def test_bearer_tokens_and_blob_redirects_as_docker_hub_serves_them(tmp_path, front):
    server, host = front()
    resolved = registry_fetch.resolve(f"{host}/{REPOSITORY}:minbase", [f"http://{host}"])
    assert resolved["config_digest"] == base_id()
    code, events = fetch(tmp_path, [f"http://{host}"], resolved["layers"])
    assert code == 0, events
    layer = resolved["layers"][0]
    assert tar_sha256(tmp_path, layer["diff_id"]) == layer["diff_id"]
    tokens = [path for name, path, _ in server.seen if name == "front" and path.startswith("/token?")]
    assert tokens and all("scope=repository%3Abase%2Fbookworm%3Apull" in path for path in tokens)
    blob_asks = [auth for name, path, auth in server.seen if name == "front" and "/blobs/" in path]
    assert f"Bearer {server.token}" in blob_asks
    storage = [auth for name, _, auth in server.seen if name == "storage"]
    assert storage and storage == [None] * len(storage)  # no credentials followed the redirect


def test_a_token_service_refusing_the_credentials_is_a_clear_error(tmp_path, front, resolved):
    server, host = front(("puller", "right-password"))
    good = fetch(
        tmp_path / "good",
        [f"http://{host}"],
        resolved["layers"],
        {"REGISTRY_USER": "puller", "REGISTRY_PASSWORD": "right-password"},
    )
    assert good[0] == 0, good[1]
    code, events = fetch(
        tmp_path / "bad",
        [f"http://{host}"],
        resolved["layers"],
        {"REGISTRY_USER": "puller", "REGISTRY_PASSWORD": "wrong"},
    )
    assert code == 2
    assert [e["reason"] for e in events if e["event"] == "error"] == [
        f"registry {host} refused the credentials in REGISTRY_USER/REGISTRY_PASSWORD"
    ]
    anonymous = fetch(tmp_path / "anonymous", [f"http://{host}"], resolved["layers"])
    assert anonymous[0] == 0 and [e["event"] for e in anonymous[1]] == ["dropped", "missing"]
    assert "refused anonymous access" in anonymous[1][0]["reason"]


def test_the_user_config_adds_mirrors_per_provider_type_tried_before_upstream(
    registry, tmp_path, monkeypatch
):
    config = tmp_path / "config.toml"
    config.write_text('[registry.ssh]\nmirrors = ["http://127.0.0.1:9"]\n', encoding="utf-8")
    monkeypatch.setenv("RUNNER_CONFIG", str(config))
    spec = ImageSpec.model_validate(
        {"ref": "sha256:" + "0" * 64, "registry": {"base": f"{registry.host}/{REPOSITORY}:minbase"}}
    )
    said: list[str] = []
    found = resolve_source(spec, None, "ssh", said.append)
    assert found is not None and found.sources == ("http://127.0.0.1:9", registry.url)
    assert said == [said[0]] and said[0].startswith("registry 127.0.0.1:9 cannot be reached")
    assert said[0].endswith("; the next source answered")
    assert resolve_source(spec, None, "aws", said.append).sources == (registry.url,)  # another provider type
