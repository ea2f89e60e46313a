"""Layer sync against a real sshd host: only missing layers travel, each verified on arrival.

Two small images share their first layers (the base and two RUN layers) and differ in the last
(a COPY of a different file), which is what a one-line code change does to a trainer image.
"""

from __future__ import annotations

import json

import pytest

from runner.layers import (
    Codec,
    ImageLayers,
    RemoteLayout,
    image_layers,
    remote_layers,
    sync_layers,
    verify_remote_layer,
)
from runner.remote import RemoteHost, RetryPolicy
from runner.store import Store

pytestmark = pytest.mark.integration

FAST = RetryPolicy(attempts=4, first_delay=0.2, max_delay=1.0, deadline=20)


@pytest.fixture
def remote(sshd_host, runner_home):
    with Store(runner_home) as store, RemoteHost(sshd_host.endpoint(), store, retry=FAST) as host:
        yield host


@pytest.fixture
def data_dir(sshd_host, request) -> str:
    """A data disk of its own on the host for each test."""
    folder = f"/srv/layer-tests/{request.node.name}"
    sshd_host.exec("rm", "-rf", folder)
    yield folder
    sshd_host.exec("rm", "-rf", folder)


def remote_sha256(sshd_host, path: str) -> str:
    return "sha256:" + sshd_host.exec("sha256sum", path).stdout.split()[0]


def figures(name: str, report) -> None:
    """The measured figures, for the -s reader (bench/ has the real benchmark)."""
    keys = ("codec", "bytes_sent", "bytes_skipped", "seconds")
    print(
        json.dumps({"case": name, "layers_sent": len(report.sent), **{k: getattr(report, k) for k in keys}})
    )


def test_first_sync_sends_every_layer_and_each_arrives_verified(remote, sshd_host, images, cache, data_dir):
    image = image_layers(images["first"], cache)
    assert len(image.diff_ids) >= 4  # the base, two RUN layers, one COPY
    report = sync_layers(remote, image, data_dir)
    figures("first sync", report)
    assert report.sent == tuple(dict.fromkeys(image.diff_ids))
    assert report.skipped == () and report.bytes_skipped == 0
    assert 0 < report.bytes_sent < sum(image.sizes)  # compressed
    layout = RemoteLayout.at(data_dir)
    for diff_id in image.diff_ids:
        assert remote_sha256(sshd_host, layout.layer(diff_id)) == diff_id
    assert remote_sha256(sshd_host, layout.config(image.image_id)) == image.image_id
    manifest = json.loads(sshd_host.exec("cat", layout.manifest(image.image_id)).stdout)
    assert manifest["diff_ids"] == list(image.diff_ids)
    left = sshd_host.exec("ls", "-A", layout.layers_dir).stdout.split()
    assert sorted(left) == sorted({f"{d[7:]}.tar" for d in image.diff_ids})  # no uploads or temp files


def test_a_second_sync_sends_nothing(remote, images, cache, data_dir):
    image = image_layers(images["first"], cache)
    sync_layers(remote, image, data_dir)
    again = sync_layers(remote, image, data_dir)
    figures("re-sync", again)
    assert again.sent == () and again.bytes_sent == 0
    assert set(again.skipped) == set(image.diff_ids)
    assert again.bytes_skipped == sum(image.size_of(d) for d in set(image.diff_ids))


def test_a_changed_last_layer_is_the_only_one_sent(remote, images, cache, data_dir):
    first = image_layers(images["first"], cache)
    variant = image_layers(images["variant"], cache)
    assert first.diff_ids[:-1] == variant.diff_ids[:-1] and first.diff_ids[-1] != variant.diff_ids[-1]
    sync_layers(remote, first, data_dir)
    report = sync_layers(remote, variant, data_dir)
    figures("one-layer change", report)
    assert report.sent == (variant.diff_ids[-1],)
    others = sum(variant.size_of(d) for d in set(variant.diff_ids[:-1]))
    assert report.bytes_skipped == others
    assert report.bytes_sent < others / 1000
    assert set(variant.diff_ids) | set(first.diff_ids) == remote_layers(remote, data_dir)


def test_a_corrupt_cached_layer_is_detected_and_sent_again(remote, sshd_host, images, cache, data_dir):
    image: ImageLayers = image_layers(images["first"], cache)
    sync_layers(remote, image, data_dir)
    victim = image.diff_ids[1]
    path = RemoteLayout.at(data_dir).layer(victim)
    sshd_host.exec("sh", "-c", 'printf X | dd of="$1" bs=1 seek=600 conv=notrunc status=none', "sh", path)
    assert all(verify_remote_layer(remote, data_dir, d) for d in image.diff_ids if d != victim)
    assert not verify_remote_layer(remote, data_dir, victim)
    assert victim not in remote_layers(remote, data_dir)  # the corrupt copy was removed
    report = sync_layers(remote, image, data_dir, verify=True)
    assert report.sent == (victim,)
    assert remote_sha256(sshd_host, path) == victim


def test_sync_with_verify_replaces_a_corrupt_layer_it_was_not_told_about(
    remote, sshd_host, images, cache, data_dir
):
    image = image_layers(images["first"], cache)
    sync_layers(remote, image, data_dir)
    victim = image.diff_ids[-1]
    path = RemoteLayout.at(data_dir).layer(victim)
    sshd_host.exec("sh", "-c", 'printf X | dd of="$1" bs=1 seek=600 conv=notrunc status=none', "sh", path)
    assert sync_layers(remote, image, data_dir).sent == ()  # names alone are trusted
    report = sync_layers(remote, image, data_dir, verify=True)
    assert report.sent == (victim,)
    assert remote_sha256(sshd_host, path) == victim


def test_a_connection_cut_mid_layer_resumes_and_the_layer_verifies(
    remote, sshd_host, images, cache, data_dir
):
    image = image_layers(images["first"], cache)
    biggest = max(set(image.diff_ids), key=image.size_of)
    cuts: list[int] = []

    def cut_once_at_half(diff_id: str, done: int, total: int) -> None:
        if diff_id == biggest and not cuts and done >= total // 2:
            cuts.append(done)
            sshd_host.exec("pkill", "-f", "sshd: root")

    report = sync_layers(remote, image, data_dir, progress=cut_once_at_half)
    assert cuts, "the upload was never cut"
    assert report.sent == tuple(dict.fromkeys(image.diff_ids))
    figures("cut at half of the biggest layer", report)
    codec = Codec(report.codec)
    once = sum(cache.compressed(d, codec).stat().st_size for d in report.sent)
    restarted = once + cache.compressed(biggest, codec).stat().st_size // 2
    assert once <= report.bytes_sent < (once + restarted) / 2  # resumed near the cut, not from zero
    assert remote_sha256(sshd_host, RemoteLayout.at(data_dir).layer(biggest)) == biggest


def test_layers_prepared_before_a_boot_are_not_compressed_again(remote, images, data_dir, tmp_path):
    from runner.layers import LayerCache, prepare_for_transfer

    cache = LayerCache(tmp_path / "fresh-cache")
    layers = prepare_for_transfer(images["first"], Codec.GZIP, cache)
    packed = {d: cache.compressed(d, Codec.GZIP) for d in layers.diff_ids}
    assert all(path.is_file() for path in packed.values())
    written = {d: path.stat().st_mtime_ns for d, path in packed.items()}
    report = sync_layers(remote, layers, data_dir)
    assert report.codec == "gzip" and set(report.sent) == set(layers.diff_ids)
    assert {d: path.stat().st_mtime_ns for d, path in packed.items()} == written
