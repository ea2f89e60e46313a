"""First sync of the trainer image over a slow laptop link: registry layer sources against the
laptop sending everything.

A rented instance's link to a registry is usually far faster than the laptop's uplink. Here
the laptop's link to the container test host (docker/sshd-host.Dockerfile: sshd, python3,
proot, no Docker) goes through a relay on 127.0.0.1 held to --rate-mbit (default 20 Mbit/s,
a typical home uplink) in each direction; the host's link to the registry (Debian's
docker-registry, in a container on a Docker network of this benchmark's own, holding the base
image) is not throttled. Two first syncs of the same trainer image, each into a fresh data
folder on the same host, in one run:

  laptop-only:  every layer compressed on the laptop (done beforehand, not timed) and sent
  registry:     the base's layers fetched by the host from the registry, the rest sent

Both end with the image unpacked into a root file system whose layers hash to the laptop's
diffIDs (prepare_image checks them). Reported: wall time, bytes from the laptop, bytes the
host fetched. Targets: laptop bytes at most 5 % of the image, wall time at least 5x shorter.
Traffic goes to 127.0.0.1 and the benchmark's own Docker network only; everything made here
is removed at the end. Run from the repository root: `.venv/bin/python -m bench.first_sync`.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench.image_sync import BASE_IMAGE, docker, start_host, trainer_context
from bench.throttle import throttled
from runner.images import ImageInfo
from runner.layer_sources import resolve_source
from runner.layers import LayerCache, image_layers, prepare_for_transfer
from runner.remote import Endpoint, RemoteHost
from runner.runtimes import RootfsRuntime
from runner.spec import ImageSpec
from runner.store import open_store
from tests.remote import registry_server

MB = 1e6


def start_registry(scratch: Path, network: str) -> registry_server.Registry:
    """The base image pushed into storage through a loopback registry, then served from a
    container on the network."""
    storage = scratch / "storage"
    storage.mkdir()
    pusher = registry_server.start_local(scratch, storage)
    try:
        registry_server.push(BASE_IMAGE, pusher, BASE_IMAGE)
    finally:
        pusher.stop()
    return registry_server.start_in_container(scratch, storage, network, "runner-base/bookworm:minbase")


def first_sync(endpoint: Endpoint, image: str, cache: LayerCache, data_dir: str, registry=None) -> dict:
    layers = image_layers(image, cache)
    with open_store() as store, RemoteHost(endpoint, store, accept_new_host_key=True) as remote:
        started = time.perf_counter()
        report = RootfsRuntime(remote, data_dir).prepare_image(layers, registry=registry)
        seconds = time.perf_counter() - started
    image_bytes = sum(layers.size_of(d) for d in dict.fromkeys(layers.diff_ids))
    return {
        "seconds": round(seconds, 1),
        "laptop_bytes": report.bytes_sent,
        "fetched_bytes": report.bytes_fetched,
        "image_bytes": image_bytes,
        "laptop_share": round(report.bytes_sent / image_bytes, 5),
        "layers_fetched": len(report.fetched),
        "layers_sent": len(report.sent),
        "notes": list(report.notes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate-mbit", type=float, default=20.0, help="the laptop link's rate each way")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-first-sync-"))
    os.environ["RUNNER_HOME"] = str(scratch / "home")  # host keys and link speeds stay here
    network = f"runner-bench-{secrets.token_hex(4)}"
    tag = f"runner-bench/trainer:{scratch.name}"
    host = registry = relay = None
    docker("network", "create", network)
    try:
        registry = start_registry(scratch, network)
        host = start_host(scratch)
        docker("network", "connect", network, host.container)
        base_ref = f"{registry.host}/{BASE_IMAGE}"
        docker("tag", BASE_IMAGE, base_ref)
        docker(
            "build", "-q", "--build-arg", f"BASE_IMAGE={base_ref}", "-t", tag, str(trainer_context(scratch))
        )
        spec = ImageSpec.model_validate(
            {"ref": "sha256:" + "0" * 64, "registry": {"insecure": [registry.host]}}
        )
        source = resolve_source(spec, ImageInfo(ref=base_ref, id=""), "ssh", print)
        relay = throttled(host.port, args.rate_mbit * 1e6)
        endpoint = Endpoint("127.0.0.1", relay.port, "root", host.key_file)
        cache = LayerCache(scratch / "cache")
        prepare_for_transfer(tag, cache=cache)  # the laptop's compression, outside both timings
        rows = {
            "laptop-only": first_sync(endpoint, tag, cache, "/data-laptop"),
            "registry": first_sync(endpoint, tag, cache, "/data-registry", source),
        }
    finally:
        if relay is not None:
            relay.close()
        if host is not None:
            subprocess.run(["docker", "rm", "-f", host.container], capture_output=True, timeout=120)
        if registry is not None:
            registry.stop()
        subprocess.run(["docker", "network", "rm", network], capture_output=True, timeout=60)
        untag = [tag, f"{registry.host}/{BASE_IMAGE}"] if registry is not None else [tag]
        subprocess.run(["docker", "rmi", *untag], capture_output=True, timeout=120)
        shutil.rmtree(scratch, ignore_errors=True)
    laptop, fetched = rows["laptop-only"], rows["registry"]
    speedup = laptop["seconds"] / fetched["seconds"]
    print(f"laptop link {args.rate_mbit:g} Mbit/s, image {laptop['image_bytes'] / MB:.0f} MB (uncompressed)")
    print(f"{'case':<13}{'wall s':>8}{'laptop MB':>11}{'fetched MB':>12}{'share':>10}")
    for name, row in rows.items():
        print(
            f"{name:<13}{row['seconds']:>8.1f}{row['laptop_bytes'] / MB:>11.2f}"
            f"{row['fetched_bytes'] / MB:>12.1f}{100 * row['laptop_share']:>9.3f}%"
        )
    share_ok = fetched["laptop_share"] <= 0.05
    verdict = "met" if share_ok else "NOT met"
    print(f"laptop bytes {100 * fetched['laptop_share']:.3f}% of the image (target <= 5%): {verdict}")
    print(f"wall time {speedup:.1f}x shorter (target >= 5x): {'met' if speedup >= 5 else 'NOT met'}")
    print(
        json.dumps(
            {"rate_mbit": args.rate_mbit, "speedup": round(speedup, 2), **{k: v for k, v in rows.items()}}
        )
    )


if __name__ == "__main__":
    main()
