"""Image sync to a Docker-less (rootfs) host: runner's layer sync against the naive full copy.

The product ships multi-GB images to rented hosts without a registry, so what matters is how
long a sync takes and how many bytes cross the link, above all after a one-line code change.
On the container test host (docker/sshd-host.Dockerfile on 127.0.0.1: sshd, python3, proot,
no Docker) with the trainer image, three cases run in one go:

  a  first sync:        cold local layer cache (compressing layers is part of the cost)
  b  re-sync:           same image, nothing changed
  c  one-line change:   an image whose last layer differs (a comment appended to a trainer file)

runner's sync = read the layers from the local engine (`image_layers`) + `sync_layers` +
`RootfsRuntime.prepare` (unpack into the rootfs cache); each part is reported too. The naive
sync = `docker save IMAGE | gzip | ssh HOST 'gunzip | tar -x -C DIR'`, then the archive's
layer tars unpacked into a fresh rootfs with the same unpack_layers.py, so both sides end with
a usable root file system; its bytes are the gzip stream's size. Targets (from the issue):
(a) no slower than naive; (b) under 2 s; (c) at least 20x less wall time and under 2% of the
naive bytes. The upload rate of the first sync is also compared with
`cat FILES | ssh HOST 'cat > /dev/null'` of the same compressed layer files: within 1.3x.

runner talks to the host through paramiko; the naive and reference pipelines use the OpenSSH
client with a known-hosts file of their own. Traffic goes to 127.0.0.1 only; the host
container, the scratch folder and the images built here are removed at the end (--keep keeps
the scratch folder and the images). Run from the repository root (it imports the test host's
helpers from tests/): `.venv/bin/python -m bench.image_sync`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shlex
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from runner.layers import Codec, LayerCache, RemoteLayout, digest_hex, image_layers, sync_layers
from runner.remote import Endpoint, RemoteHost
from runner.runtimes import RootfsRuntime
from runner.store import open_store
from tests.remote.conftest import free_port, make_key_pair, wait_for_sshd

REPO = Path(__file__).resolve().parents[1]
WORK = Path("/tmp/bench-sync-work")
BASE_IMAGE = "runner-base/torch-cpu:2.13.0"
HOST_DOCKERFILE = REPO / "docker" / "sshd-host.Dockerfile"
DATA_DIR = "/data"  # the host's data disk, as runner sees it
NAIVE_DIR = "/naive"  # where the naive pipeline unpacks, apart from runner's files
CHANGED_FILE = "trainer/__init__.py"
MB = 1e6


def docker(*args: str, timeout: float = 900) -> str:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"docker {' '.join(args[:2])} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


# -- images -------------------------------------------------------------------------------


def trainer_context(scratch: Path) -> Path:
    """The trainer image's build context as HEAD has it (no stray files from the work tree)."""
    context = scratch / "context"
    context.mkdir()
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(context)], input=archive, check=True)
    return context


def build_trainer_images(scratch: Path) -> tuple[str, str]:
    """The trainer image from HEAD's build context, and the same with one line appended to a
    trainer file (so only the last layer differs). Returns both tags."""
    context = trainer_context(scratch)
    base, changed = f"runner-bench/trainer:{scratch.name}-a", f"runner-bench/trainer:{scratch.name}-b"
    docker("build", "-q", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "-t", base, str(context))
    with (context / CHANGED_FILE).open("a", encoding="utf-8") as handle:
        handle.write("# bench/image_sync.py: a one-line change\n")
    docker("build", "-q", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "-t", changed, str(context))
    return base, changed


def build_changed_image(image: str, scratch: Path) -> str:
    """For --image: the given image plus one layer holding a one-line file."""
    context = scratch / "context"
    context.mkdir()
    (context / "change.txt").write_text("a one-line change\n", encoding="utf-8")
    (context / "Dockerfile").write_text(f"FROM {image}\nCOPY change.txt /opt/bench-change.txt\n")
    changed = f"runner-bench/changed:{scratch.name}"
    docker("build", "-q", "-t", changed, str(context))
    return changed


# -- the test host ------------------------------------------------------------------------


@dataclass
class BenchHost:
    """A started sshd-host container, and the OpenSSH client arguments that reach it."""

    container: str
    port: int
    key_file: Path
    known_hosts: Path

    def ssh_argv(self, command: str) -> list[str]:
        options = [
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR",
            "-o", "StrictHostKeyChecking=accept-new",
            "-o", f"UserKnownHostsFile={self.known_hosts}",
        ]  # fmt: skip
        return ["ssh", "-i", str(self.key_file), "-p", str(self.port), *options, "root@127.0.0.1", command]

    def ssh(self, command: str) -> str:
        proc = subprocess.run(self.ssh_argv(command), capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise SystemExit(f"ssh {command!r} failed: {proc.stderr.strip()}")
        return proc.stdout

    def endpoint(self) -> Endpoint:
        return Endpoint("127.0.0.1", self.port, "root", self.key_file, None)


def start_host(scratch: Path) -> BenchHost:
    tag = "runner-test/sshd-host:" + hashlib.sha256(HOST_DOCKERFILE.read_bytes()).hexdigest()[:12]
    if subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode != 0:
        docker("build", "-q", "-t", tag, "-f", str(HOST_DOCKERFILE), str(HOST_DOCKERFILE.parent))
    client, host_key = make_key_pair(scratch, "id_ed25519"), make_key_pair(scratch, "host_key")
    port, name = free_port(), f"runner-bench-sync-{secrets.token_hex(4)}"
    docker(
        "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:22",
        "-e", f"SSHD_HOST_KEY={host_key.private_pem}", "-e", f"SSHD_AUTHORIZED_KEY={client.public_line}",
        tag,
    )  # fmt: skip
    wait_for_sshd(port)
    return BenchHost(name, port, client.private_file, scratch / "known_hosts")


# -- runner's sync ------------------------------------------------------------------------


class UploadClock:
    """Times the byte-moving part of each upload from put's progress reports, leaving out
    compression and hashing: bytes and seconds between a layer's first and last report."""

    def __init__(self) -> None:
        self.spans: dict[str, list[float]] = {}  # diffID -> [t_first, done_first, t_last, done_last]

    def __call__(self, diff_id: str, done: int, total: int) -> None:
        now = time.perf_counter()
        span = self.spans.setdefault(diff_id, [now, done, now, done])
        span[2:] = [now, done]

    def rate(self) -> float | None:
        moved = sum(s[3] - s[1] for s in self.spans.values())
        seconds = sum(s[2] - s[0] for s in self.spans.values())
        return moved / seconds / MB if seconds > 0 else None


def runner_sync(remote: RemoteHost, image: str, cache: LayerCache) -> dict:
    """One full sync by runner, timed by part."""
    clock = UploadClock()
    started = time.perf_counter()
    layers = image_layers(image, cache)
    read_s = time.perf_counter() - started
    report = sync_layers(remote, layers, DATA_DIR, progress=clock)
    synced = time.perf_counter()
    layout = RemoteLayout.at(DATA_DIR)
    tars = [layout.layer(d) for d in layers.diff_ids]
    RootfsRuntime(remote, DATA_DIR).prepare(layers.image_id, tars, [digest_hex(d) for d in layers.diff_ids])
    done = time.perf_counter()
    return {
        "seconds": done - started,
        "bytes": report.bytes_sent,
        "read_layers_s": read_s,
        "sync_layers_s": synced - read_s - started,
        "prepare_s": done - synced,
        "codec": report.codec,
        "layers_sent": len(report.sent),
        "layers_skipped": len(report.skipped),
        "upload_mb_s": clock.rate(),
        "compressed_files": [str(cache.compressed(d, Codec(report.codec))) for d in report.sent],
    }


# -- the naive sync and the reference -----------------------------------------------------


def naive_sync(host: BenchHost, image: str) -> dict:
    """docker save | gzip | ssh 'gunzip | tar -x', then unpack the archive's layers into a
    fresh rootfs; the gzip stream is counted as it passes."""
    host.ssh(f"rm -rf {NAIVE_DIR}/archive {NAIVE_DIR}/rootfs && mkdir -p {NAIVE_DIR}/archive")
    started = time.perf_counter()
    save = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
    gzip = subprocess.Popen(["gzip", "-c"], stdin=save.stdout, stdout=subprocess.PIPE)
    save.stdout.close()
    ssh = subprocess.Popen(host.ssh_argv(f"gunzip | tar -x -C {NAIVE_DIR}/archive"), stdin=subprocess.PIPE)
    sent = 0
    while block := gzip.stdout.read(1 << 20):
        ssh.stdin.write(block)
        sent += len(block)
    ssh.stdin.close()
    if (save.wait(), gzip.wait(), ssh.wait()) != (0, 0, 0):
        raise SystemExit(f"the naive pipeline for {image} failed")
    transferred = time.perf_counter()
    manifest = json.loads(host.ssh(f"cat {NAIVE_DIR}/archive/manifest.json"))
    tars = [f"{NAIVE_DIR}/archive/{name}" for name in manifest[0]["Layers"]]
    layers = " ".join(f"--layer {shlex.quote(path)}" for path in tars)
    host.ssh(f"python3 {NAIVE_DIR}/unpack_layers.py --rootfs {NAIVE_DIR}/rootfs {layers}")
    done = time.perf_counter()
    return {"seconds": done - started, "bytes": sent, "transfer_s": transferred - started,
            "unpack_s": done - transferred}  # fmt: skip


def cat_over_ssh(host: BenchHost, files: list[str]) -> dict:
    """`cat FILES | ssh HOST 'cat > /dev/null'`: what the link carries with nothing else in the way."""
    size = sum(Path(f).stat().st_size for f in files)
    started = time.perf_counter()
    cat = subprocess.Popen(["cat", *files], stdout=subprocess.PIPE)
    subprocess.run(host.ssh_argv("cat > /dev/null"), stdin=cat.stdout, check=True)
    cat.stdout.close()
    seconds = time.perf_counter() - started
    if cat.wait() != 0:
        raise SystemExit("cat of the compressed layers failed")
    return {"seconds": seconds, "bytes": size, "mb_s": size / seconds / MB}


# -- the run ------------------------------------------------------------------------------


CASES = (
    ("a", "first sync", "no slower than naive", lambda r, n: r["seconds"] <= n["seconds"]),
    ("b", "re-sync, unchanged", "under 2 s", lambda r, n: r["seconds"] < 2.0),
    ("c", "re-sync, one-line change", ">=20x faster, <2% bytes",
     lambda r, n: r["seconds"] * 20 <= n["seconds"] and r["bytes"] < 0.02 * n["bytes"]),
)  # fmt: skip


def emit(record: dict) -> None:
    rounded = {k: round(v, 3) if isinstance(v, float) else v for k, v in record.items()}
    print(json.dumps(rounded), flush=True)


def measure(host: BenchHost, images: dict[str, str], cache: LayerCache) -> list[dict]:
    """Every case, runner then naive, plus the throughput reference after the first sync."""
    rows = []
    with (REPO / "runner" / "remote_scripts" / "unpack_layers.py").open("rb") as script:
        shipping = f"mkdir -p {NAIVE_DIR} && cat > {NAIVE_DIR}/unpack_layers.py"
        subprocess.run(host.ssh_argv(shipping), stdin=script, check=True)
    with open_store() as store, RemoteHost(host.endpoint(), store, accept_new_host_key=False) as remote:
        for case, label, target, met in CASES:
            ours = runner_sync(remote, images[case], cache)
            files = ours.pop("compressed_files")
            emit({"case": case, "side": "runner", "image": images[case], **ours})
            if case == "a":
                reference = cat_over_ssh(host, files)
                ratio = reference["mb_s"] / ours["upload_mb_s"]
                emit({"case": "throughput", "side": "cat|ssh", **reference, "slowdown": ratio})
                upload = {"case": "upload MB/s", "ours": ours["upload_mb_s"], "naive": reference["mb_s"],
                          "target": "within 1.3x", "met": ratio <= 1.3}  # fmt: skip
            naive = naive_sync(host, images[case])
            emit({"case": case, "side": "naive", "image": images[case], **naive})
            rows.append({"case": f"{case} {label}", "runner": ours, "naive": naive, "target": target,
                         "met": met(ours, naive)})  # fmt: skip
    return [*rows, upload]


def summary(rows: list[dict]) -> str:
    """The table: seconds and MB per side, naive/runner time ratio, runner bytes as % of naive."""
    header = ("case", "runner s", "runner MB", "naive s", "naive MB", "time x", "bytes %", "target met")
    lines = ["{:<26} {:>9} {:>10} {:>8} {:>9} {:>7} {:>8}  {}".format(*header)]
    for row in rows:
        met = f"{row['target']}: {'yes' if row['met'] else 'no'}"
        if "runner" not in row:  # the throughput row: MB/s in the seconds columns
            ours, theirs = row["ours"], row["naive"]
            blank = ""
            lines.append(
                f"{row['case']:<26} {ours:>9.1f} {blank:>10} {theirs:>8.1f} {blank:>9} {theirs / ours:>7.2f}"
                f" {blank:>8}  {met}"
            )
            continue
        ours, theirs = row["runner"], row["naive"]
        lines.append(
            f"{row['case']:<26} {ours['seconds']:>9.2f} {ours['bytes'] / MB:>10.3f} {theirs['seconds']:>8.2f}"
            f" {theirs['bytes'] / MB:>9.1f} {theirs['seconds'] / ours['seconds']:>7.1f}"
            f" {100 * ours['bytes'] / theirs['bytes']:>8.3f}  {met}"
        )
    lines.append("time x: naive s / runner s (upload row: cat|ssh MB/s / runner MB/s); bytes %: runner/naive")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image", help="use this existing image instead of building the trainer image")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder and built images")
    parser.add_argument("--json-only", action="store_true", help="print the JSON lines only")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=WORK))
    os.environ["RUNNER_HOME"] = str(scratch / "runner-home")  # never the user's real state
    built: list[str] = []
    host = None
    try:
        if args.image:
            built.append(build_changed_image(args.image, scratch))
            base, changed = args.image, built[0]
        else:
            base, changed = build_trainer_images(scratch)
            built += [base, changed]
        host = start_host(scratch)
        rows = measure(host, {"a": base, "b": base, "c": changed}, LayerCache(scratch / "layers"))
    finally:
        if host is not None:
            subprocess.run(["docker", "rm", "-f", host.container], capture_output=True, timeout=120)
        if not args.keep:
            for tag in built:
                subprocess.run(["docker", "rmi", tag], capture_output=True, timeout=120)
            shutil.rmtree(scratch, ignore_errors=True)
    if not args.json_only:
        print(summary(rows))


if __name__ == "__main__":
    main()
