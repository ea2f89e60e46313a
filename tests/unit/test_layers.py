"""Layer sync without services: digests as names, codec choice, plans, `docker save` parsing."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from runner.errors import BadInput, ProviderFailure
from runner.layers import (
    _RECEIVE_PY,
    Codec,
    CodecChoice,
    ImageLayers,
    LayerCache,
    RemoteLayout,
    cached_image,
    choose_codec,
    compress_layer,
    digest_hex,
    plan_sync,
    store_save_stream,
)

pytestmark = pytest.mark.unit

BAD_DIGESTS = [
    "sha256:../../etc/passwd",
    "sha256:" + "a" * 63,
    "sha256:" + "a" * 65,
    "sha256:" + "A" * 64,
    "sha512:" + "a" * 64,
    "a" * 64,
    "sha256:" + "a" * 64 + "/x",
    "sha256:" + "a" * 64 + "\n",
    "",
    None,
]


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar(**files: bytes) -> bytes:
    """A small, valid layer tar holding the given files."""
    return save_archive(files)


def fake_image(layers: list[bytes]) -> tuple[bytes, str, list[str]]:
    diff_ids = [digest(layer) for layer in layers]
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    return config, digest(config), diff_ids


def save_archive(files: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    """A tar of the given files then links, in order: a layer, or a `docker save`-like archive
    when manifest.json is given last, as the engine streams it."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            archive.addfile(info)
    return buffer.getvalue()


def chunks(data: bytes, size: int = 777) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("bad", BAD_DIGESTS)
def test_anything_but_a_sha256_digest_is_refused_as_a_name(bad, tmp_path):
    cache, remote = LayerCache(tmp_path), RemoteLayout.at("/data")
    for make_path in (digest_hex, cache.layer, cache.config, remote.layer, remote.config):
        with pytest.raises(BadInput):
            make_path(bad)


def test_paths_are_named_by_the_hex_of_the_digest(tmp_path):
    good = "sha256:" + "0123456789abcdef" * 4
    hex_ = good[7:]
    assert LayerCache(tmp_path).layer(good) == tmp_path / "sha256" / f"{hex_}.tar"
    assert LayerCache(tmp_path).compressed(good, Codec.ZSTD).name == f"{hex_}.tar.zst"
    remote = RemoteLayout.at("/data")
    assert remote.layer(good) == f"/data/runner/layers/sha256/{hex_}.tar"
    assert remote.upload(good, Codec.GZIP) == f"/data/runner/layers/sha256/{hex_}.tar.gz.upload"
    assert remote.config(good) == f"/data/runner/images/{hex_}.json"


@pytest.mark.parametrize("data_dir", ["data", "/data/../etc", "/data/", "/da\nta"])
def test_a_bad_remote_data_dir_is_refused(data_dir):
    with pytest.raises(BadInput):
        RemoteLayout.at(data_dir)


@pytest.mark.parametrize(
    ("local_zstd", "remote", "expected"),
    [
        (True, {"python3", "zstd-cli", "zstd-py"}, CodecChoice(Codec.ZSTD, "zstd-cli")),
        (True, {"python3", "zstd-py"}, CodecChoice(Codec.ZSTD, "zstd-py")),
        (True, {"python3"}, CodecChoice(Codec.GZIP, "gzip")),
        (False, {"python3", "zstd-cli", "zstd-py"}, CodecChoice(Codec.GZIP, "gzip")),
    ],
)
def test_zstd_only_when_both_sides_have_it(local_zstd, remote, expected):
    assert choose_codec(local_zstd, frozenset(remote)) == expected


def test_a_host_without_python3_is_refused():
    with pytest.raises(ProviderFailure, match="python3"):
        choose_codec(True, frozenset({"zstd-cli"}))


def test_plan_sends_what_the_host_lacks_once_in_order(tmp_path):
    a, b, c = ("sha256:" + ch * 64 for ch in "abc")
    image = ImageLayers("sha256:" + "f" * 64, b"{}", (a, b, a, c), (10, 20, 10, 30), LayerCache(tmp_path))
    plan = plan_sync(image, {b, "sha256:" + "e" * 64})
    assert [e.diff_id for e in plan.send] == [a, c]
    assert [e.diff_id for e in plan.skip] == [b]
    assert (plan.bytes_to_send, plan.bytes_skipped) == (40, 20)
    assert plan_sync(image, set()).bytes_to_send == 60
    assert plan_sync(image, {a, b, c}).send == ()


def _check_cached(cache: LayerCache, layers: list[bytes]) -> None:
    config, image_id, diff_ids = fake_image(layers)
    image = cached_image(cache, image_id)
    assert image.config == config
    assert image.diff_ids == tuple(diff_ids)
    assert image.sizes == tuple(len(layer) for layer in layers)
    for diff_id, layer in zip(diff_ids, layers, strict=True):
        assert image.layer_path(diff_id).read_bytes() == layer


def test_legacy_save_layout_is_read_by_content(tmp_path):
    layers = [layer_tar(a=b"one"), layer_tar(b=b"two" * 1000)]
    config, image_id, diff_ids = fake_image(layers)
    files = {"l1/VERSION": b"1.0", "l1/layer.tar": layers[0], "l2/layer.tar": layers[1]}
    files |= {f"{image_id[7:]}.json": config, "manifest.json": b"[]"}
    archive = save_archive(files, links={"l3/layer.tar": "../l1/layer.tar"})
    cache = LayerCache(tmp_path)
    found = store_save_stream(chunks(archive), {image_id, *diff_ids}, image_id, cache)
    assert found == {image_id, *diff_ids}
    _check_cached(cache, layers)
    assert sorted(p.name for p in (tmp_path / "sha256").iterdir()) == sorted(f"{d[7:]}.tar" for d in diff_ids)


def test_oci_save_layout_skips_blobs_already_cached(tmp_path):
    layers = [layer_tar(a=b"one"), layer_tar(b=b"two")]
    config, image_id, diff_ids = fake_image(layers)
    blobs = {f"blobs/sha256/{d[7:]}": layer for d, layer in zip(diff_ids, layers, strict=True)}
    archive = save_archive(
        {"oci-layout": b"{}", **blobs, f"blobs/sha256/{image_id[7:]}": config, "index.json": b"{}"}
        | {"manifest.json": b"[]"}
    )
    cache = LayerCache(tmp_path)
    found = store_save_stream(chunks(archive, 4096), {image_id, diff_ids[1]}, image_id, cache)
    assert found == {image_id, diff_ids[1]}
    assert not cache.layer(diff_ids[0]).exists()


def test_a_member_that_hashes_to_nothing_wanted_is_not_kept(tmp_path):
    archive = save_archive({"x/layer.tar": b"not what was asked for"})
    cache = LayerCache(tmp_path)
    assert store_save_stream(chunks(archive), {"sha256:" + "a" * 64}, "sha256:" + "b" * 64, cache) == set()
    assert list((tmp_path / "sha256").iterdir()) == []


def test_a_corrupt_cached_config_is_reported(tmp_path):
    layers = [layer_tar(a=b"one")]
    config, image_id, diff_ids = fake_image(layers)
    cache = LayerCache(tmp_path)
    store_save_stream(
        chunks(save_archive({"c.json": config, "l/layer.tar": layers[0]})),
        {image_id, *diff_ids},
        image_id,
        cache,
    )
    cache.config(image_id).write_bytes(config + b" ")
    with pytest.raises(ProviderFailure, match="corrupt"):
        cached_image(cache, image_id)


@pytest.mark.parametrize("codec", list(Codec))
def test_compression_is_deterministic_and_round_trips(codec, tmp_path):
    if codec is Codec.ZSTD:
        zstandard = pytest.importorskip("zstandard")
    layer = layer_tar(a=bytes(range(256)) * 4000)
    diff_id = digest(layer)
    cache = LayerCache(tmp_path)
    cache.layer(diff_id).parent.mkdir(parents=True)
    cache.layer(diff_id).write_bytes(layer)
    first = compress_layer(cache, diff_id, codec).read_bytes()
    cache.compressed(diff_id, codec).unlink()
    assert compress_layer(cache, diff_id, codec).read_bytes() == first
    assert len(first) < len(layer) // 10
    unpacked = gzip.decompress(first) if codec is Codec.GZIP else zstandard.decompress(first, len(layer))
    assert unpacked == layer


def _receive(tmp_path: Path, packed: bytes, expected: str) -> subprocess.CompletedProcess:
    upload, final = tmp_path / "x.tar.gz.upload", tmp_path / "x.tar"
    upload.write_bytes(packed)
    argv = [sys.executable, "-c", _RECEIVE_PY, "gzip", str(upload), str(final), expected]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_the_receive_script_renames_only_a_verified_layer(tmp_path):
    layer = layer_tar(a=b"payload" * 100)
    done = _receive(tmp_path, gzip.compress(layer), digest(layer)[7:])
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == len(layer)
    assert (tmp_path / "x.tar").read_bytes() == layer
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.tar"]


def test_the_receive_script_refuses_a_layer_with_another_hash(tmp_path):
    layer = layer_tar(a=b"payload")
    done = _receive(tmp_path, gzip.compress(layer), "0" * 64)
    assert done.returncode == 3
    assert done.stdout.strip() == digest(layer)[7:]
    assert list(tmp_path.iterdir()) == []


def test_the_receive_script_decodes_with_the_zstd_cli(tmp_path):
    zstd = shutil.which("zstd")
    if zstd is None:
        pytest.skip("no zstd command here")
    layer = layer_tar(a=b"payload" * 100)
    packed = subprocess.run([zstd, "-3", "-c", "-q"], input=layer, capture_output=True, check=True).stdout
    upload, final = tmp_path / "x.tar.zst.upload", tmp_path / "x.tar"
    upload.write_bytes(packed)
    argv = [sys.executable, "-c", _RECEIVE_PY, "zstd-cli", str(upload), str(final), digest(layer)[7:]]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert final.read_bytes() == layer and not upload.exists()


def test_a_truncated_save_stream_is_a_provider_failure(tmp_path):
    layers = [layer_tar(a=b"x" * 5000)]
    config, image_id, diff_ids = fake_image(layers)
    archive = save_archive({"l/layer.tar": layers[0], "c.json": config})
    with pytest.raises(ProviderFailure, match="not a whole archive"):
        store_save_stream(chunks(archive[:3000]), {image_id, *diff_ids}, image_id, LayerCache(tmp_path))
    assert list((tmp_path / "sha256").iterdir()) == []  # no temp file left behind


def test_importing_the_module_loads_no_sdk():
    probe = "import sys, runner.layers; print(' '.join(m.split('.')[0] for m in sys.modules))"
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, check=True
        ).stdout.split()
    )
    assert not loaded & {"docker", "paramiko", "zstandard", "requests"}


def test_gzip_in_blocks_is_deterministic_and_the_receiver_reads_every_member(tmp_path, monkeypatch):
    """Blocks compressed on several threads come out in order, as concatenated gzip members."""
    import runner.layers

    monkeypatch.setattr(runner.layers, "GZIP_BLOCK", 64 << 10)
    layer = layer_tar(a=os.urandom(300_000) + bytes(700_000))
    diff_id = digest(layer)
    cache = LayerCache(tmp_path / "cache")
    cache.layer(diff_id).parent.mkdir(parents=True)
    cache.layer(diff_id).write_bytes(layer)
    packed = compress_layer(cache, diff_id, Codec.GZIP).read_bytes()
    assert packed.count(b"\x1f\x8b\x08") >= len(layer) // (64 << 10)  # one member per block
    cache.compressed(diff_id, Codec.GZIP).unlink()
    assert compress_layer(cache, diff_id, Codec.GZIP).read_bytes() == packed
    done = _receive(tmp_path, packed, diff_id[7:])
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "x.tar").read_bytes() == layer
