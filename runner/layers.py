"""Image layers as content-addressed files: read once from the local engine, sent only where missing.

Images are 5-15 GB and a re-run after a one-line change must not re-send them, so an image is
handled as its config plus its layers, each named by its diffID (the sha256 of the layer's
uncompressed tar). The laptop keeps the layers it read from `docker save` in a cache under
RUNNER_HOME; the remote keeps the layers it received under its data disk, each checked against
its diffID on receipt, so a file's name there can be trusted without hashing gigabytes per sync.
A sync sends only the layers the remote lacks, each compressed and as its own resumable,
verified upload. Assembling a `docker load` archive or a root file system from the remote cache
is the runtimes' job, not this module's.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import IO, TYPE_CHECKING, NamedTuple

from runner.errors import BadInput, ProviderFailure
from runner.files import CHUNK, sha256_file, write_json_atomic
from runner.home import private_dir, runner_home
from runner.remote import check_remote_path, sha256_argv

if TYPE_CHECKING:
    from runner.layer_sources import RegistrySource
    from runner.remote import RemoteHost
    from runner.steps import DetachedSteps

LayerProgress = Callable[[str, int, int], None]  # (diffID, bytes done, bytes total) of one upload

# Fixed levels: the same input then always compresses to the same bytes (with the same library),
# so the prefix a dropped upload left on the remote stays valid for the next attempt.
GZIP_LEVEL = 6
GZIP_BLOCK = 16 << 20  # gzip is compressed in blocks of this size, each a gzip member, on all cores
ZSTD_LEVEL = 3

_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_LAYER_NAME = re.compile(r"([0-9a-f]{64})\.tar")
_BLOB_NAME = re.compile(r"(?:\./)?blobs/sha256/([0-9a-f]{64})")

# Prints what the host can decompress with: python3 is required, zstd is a bonus.
_PROBE_SH = (
    "command -v python3 >/dev/null 2>&1 && echo python3; "
    "command -v zstd >/dev/null 2>&1 && echo zstd-cli; "
    "python3 -c 'import zstandard' >/dev/null 2>&1 && echo zstd-py; "
    "exit 0"
)
# Decompresses an upload into FINAL.tmp while hashing it; renames it into place only when the
# hash equals the diffID, then deletes the upload. Exit 3 (with the hash found) on a mismatch.
_RECEIVE_PY = """\
import hashlib, os, subprocess, sys
decoder, upload, final, expected = sys.argv[1:5]
tmp, proc = final + ".tmp", None
if decoder == "gzip":
    import gzip
    source = gzip.open(upload, "rb")
elif decoder == "zstd-py":
    import zstandard
    source = zstandard.ZstdDecompressor().stream_reader(open(upload, "rb"))
else:
    proc = subprocess.Popen(["zstd", "-dcq", "--", upload], stdout=subprocess.PIPE)
    source = proc.stdout
digest, size = hashlib.sha256(), 0
with source, open(tmp, "wb") as out:
    while block := source.read(1 << 20):
        digest.update(block)
        out.write(block)
        size += len(block)
    out.flush()
    os.fsync(out.fileno())
if proc is not None and proc.wait() != 0:
    os.remove(tmp)
    sys.exit("zstd could not decompress " + upload)
if digest.hexdigest() != expected:
    os.remove(tmp)
    os.remove(upload)
    print(digest.hexdigest())
    sys.exit(3)
os.replace(tmp, final)
os.remove(upload)
print(size)
"""


def digest_hex(digest: str) -> str:
    """The hex of a `sha256:<64 hex>` digest. Anything else is refused: the hex becomes a file
    name here and on the remote, and a digest read from an image config must not carry a path."""
    match = _DIGEST.fullmatch(digest) if isinstance(digest, str) else None
    if match is None:
        raise BadInput(f"not a sha256 digest: {digest!r}")
    return match.group(1)


class Codec(str, Enum):
    """How a layer travels; zstd is faster and smaller, gzip is what every python3 can read."""

    ZSTD = "zstd"
    GZIP = "gzip"

    @property
    def suffix(self) -> str:
        return ".zst" if self is Codec.ZSTD else ".gz"


class CodecChoice(NamedTuple):
    """The codec both sides share, and the remote tool that decompresses it."""

    codec: Codec
    decoder: str  # "zstd-cli", "zstd-py" or "gzip" (python3's module)


def local_has_zstd() -> bool:
    return importlib.util.find_spec("zstandard") is not None


def choose_codec(local_zstd: bool, remote_tools: frozenset[str]) -> CodecChoice:
    """zstd when both sides have it (the remote's CLI preferred: it is faster), else gzip."""
    if "python3" not in remote_tools:
        raise ProviderFailure("the host has no python3, which receiving layers needs")
    if local_zstd and "zstd-cli" in remote_tools:
        return CodecChoice(Codec.ZSTD, "zstd-cli")
    if local_zstd and "zstd-py" in remote_tools:
        return CodecChoice(Codec.ZSTD, "zstd-py")
    return CodecChoice(Codec.GZIP, "gzip")


# -- the laptop's cache -------------------------------------------------------------------


@dataclass(frozen=True)
class LayerCache:
    """`<root>/sha256/<hex>.tar` (verified layers, compressed copies beside them) and
    `<root>/configs/<hex>.json` (image configs). A file under its final name was hashed
    while it was written, so its name can be trusted."""

    root: Path

    @classmethod
    def default(cls) -> LayerCache:
        return cls(runner_home() / "layers")

    def layer(self, diff_id: str) -> Path:
        return self.root / "sha256" / f"{digest_hex(diff_id)}.tar"

    def compressed(self, diff_id: str, codec: Codec) -> Path:
        return self.root / "sha256" / f"{digest_hex(diff_id)}.tar{codec.suffix}"

    def config(self, image_id: str) -> Path:
        return self.root / "configs" / f"{digest_hex(image_id)}.json"

    def manifest(self, image_id: str) -> Path:
        return self.root / "configs" / f"{digest_hex(image_id)}.manifest.json"


@dataclass(frozen=True)
class ImageLayers:
    """One image as content: its config (whose sha256 is the image ID) and its layers in order."""

    image_id: str
    config: bytes
    diff_ids: tuple[str, ...]
    sizes: tuple[int, ...]  # uncompressed, in the order of diff_ids
    cache: LayerCache

    def layer_path(self, diff_id: str) -> Path:
        """The layer's uncompressed tar in the local cache."""
        return self.cache.layer(diff_id)

    def size_of(self, diff_id: str) -> int:
        return self.sizes[self.diff_ids.index(diff_id)]


def image_layers(image: str, cache: LayerCache | None = None) -> ImageLayers:
    """The image's config and layers, extracting from `docker save` only what is not cached yet."""
    from runner.images import docker_client, engine_errors

    cache = cache or LayerCache.default()
    client = docker_client()
    with engine_errors(f"inspecting {image}"):
        attrs = client.api.inspect_image(image)
    image_id = attrs["Id"]
    wanted = {image_id, *attrs["RootFS"]["Layers"]}
    missing = {d for d in wanted if not _cached_path(cache, d, image_id).is_file()}
    if missing:
        with engine_errors(f"saving {image}"):
            found = store_save_stream(client.api.get_image(image_id), missing, image_id, cache)
        if missing - found:
            raise ProviderFailure(
                f"`docker save {image}` held nothing hashing to {sorted(missing - found)[0]}"
                " (an engine that keeps layers compressed, such as the containerd store?)"
            )
    return cached_image(cache, image_id)


def prepare_for_transfer(
    image: str, codec: Codec = Codec.GZIP, cache: LayerCache | None = None, skip: frozenset[str] = frozenset()
) -> ImageLayers:
    """Read the image's layers and compress them now, before an instance is booted and billed
    while the laptop compresses (gzip: what a host with only python3 can read). Layers in skip
    (a registry serves them to the instance) are compressed only if a fetch falls back."""
    layers = image_layers(image, cache)
    for diff_id in dict.fromkeys(layers.diff_ids):
        if diff_id not in skip:
            compress_layer(layers.cache, diff_id, codec)
    return layers


def cached_image(cache: LayerCache, image_id: str) -> ImageLayers:
    """An image whose config and layers are all in the cache; the config is checked again,
    since the diffIDs are read from it."""
    config = cache.config(image_id).read_bytes()
    if "sha256:" + hashlib.sha256(config).hexdigest() != image_id:
        raise ProviderFailure(f"cached config of {image_id} is corrupt: remove {cache.config(image_id)}")
    diff_ids = tuple(json.loads(config)["rootfs"]["diff_ids"])
    sizes = tuple(cache.layer(d).stat().st_size for d in diff_ids)
    return ImageLayers(image_id, config, diff_ids, sizes, cache)


def _cached_path(cache: LayerCache, digest: str, image_id: str) -> Path:
    return cache.config(digest) if digest == image_id else cache.layer(digest)


def store_save_stream(
    chunks: Iterable[bytes], wanted: set[str], image_id: str, cache: LayerCache
) -> set[str]:
    """Keep the files of a `docker save` stream that hash to a wanted digest; return those found.

    Members are recognised by content, not by manifest.json (which the stream reaches last):
    the legacy layout (`<id>/layer.tar`, `<id>.json`) and the OCI one (`blobs/sha256/<digest>`)
    both hold the config and the uncompressed layer tars as plain files. An OCI blob whose name
    says it is not wanted is skipped without being written.
    """
    found: set[str] = set()
    stream = io.BufferedReader(_ChunkStream(chunks), CHUNK)
    try:
        with tarfile.open(mode="r|", fileobj=stream, bufsize=CHUNK) as archive:
            for member in archive:
                blob = _BLOB_NAME.fullmatch(member.name)
                if not member.isfile() or found == wanted or (blob and f"sha256:{blob[1]}" not in wanted):
                    continue
                digest = _keep_if_wanted(archive.extractfile(member), wanted, image_id, cache)
                if digest:
                    found.add(digest)
    except tarfile.TarError as exc:
        raise ProviderFailure(
            f"the `docker save` stream of {image_id} is not a whole archive: {exc}"
        ) from exc
    return found


def _keep_if_wanted(reader: IO[bytes], wanted: set[str], image_id: str, cache: LayerCache) -> str | None:
    """Copy one archive member to a temp file while hashing it; keep it under its digest if wanted."""
    folder = private_dir(cache.root / "sha256")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".save-", suffix=".tmp")
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as writer:
            while block := reader.read(CHUNK):
                digest.update(block)
                writer.write(block)
        found = "sha256:" + digest.hexdigest()
        if found not in wanted:
            return None
        dest = _cached_path(cache, found, image_id)
        private_dir(dest.parent)
        os.replace(tmp, dest)
        return found
    finally:
        Path(tmp).unlink(missing_ok=True)


class _ChunkStream(io.RawIOBase):
    """A readable file over an iterator of byte chunks (the engine's `docker save` stream)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks: Iterator[bytes] = iter(chunks)
        self._view = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._view:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._view = memoryview(chunk)
        count = min(len(buffer), len(self._view))
        buffer[:count] = self._view[:count]
        self._view = self._view[count:]
        return count


def compress_layer(cache: LayerCache, diff_id: str, codec: Codec) -> Path:
    """The layer compressed for transfer, beside it in the cache; made once, atomically, and
    deterministic (fixed level and block size, no name or time in the gzip headers)."""
    target = cache.compressed(diff_id, codec)
    if target.is_file():
        return target
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with cache.layer(diff_id).open("rb") as reader, os.fdopen(fd, "wb") as raw:
            if codec is Codec.ZSTD:
                import zstandard

                with zstandard.ZstdCompressor(level=ZSTD_LEVEL).stream_writer(raw, closefd=False) as writer:
                    shutil.copyfileobj(reader, writer, CHUNK)
            else:
                _gzip_blocks(reader, raw)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _gzip_blocks(reader: IO[bytes], writer: IO[bytes]) -> None:
    """gzip on every core, as pigz does: each GZIP_BLOCK of input becomes a gzip member of its
    own (gzip readers take concatenated members), compressed in a thread (zlib drops the GIL),
    written in order."""
    workers = os.cpu_count() or 1
    pending: deque[Future[bytes]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gzip") as pool:
        while block := reader.read(GZIP_BLOCK):
            pending.append(pool.submit(gzip.compress, block, GZIP_LEVEL, mtime=0))
            if len(pending) > 2 * workers:
                writer.write(pending.popleft().result())
        while pending:
            writer.write(pending.popleft().result())


# -- the remote cache and the plan ----------------------------------------------------------


@dataclass(frozen=True)
class RemoteLayout:
    """Where things live on the host's data disk, under `<data_dir>/runner/`."""

    data_dir: str

    @classmethod
    def at(cls, data_dir: str) -> RemoteLayout:
        return cls(check_remote_path(data_dir))

    @property
    def layers_dir(self) -> str:
        return f"{self.data_dir}/runner/layers/sha256"

    def layer(self, diff_id: str) -> str:
        return f"{self.layers_dir}/{digest_hex(diff_id)}.tar"

    def upload(self, diff_id: str, codec: Codec) -> str:
        return f"{self.layer(diff_id)}{codec.suffix}.upload"

    def config(self, image_id: str) -> str:
        return f"{self.data_dir}/runner/images/{digest_hex(image_id)}.json"

    def manifest(self, image_id: str) -> str:
        return f"{self.data_dir}/runner/images/{digest_hex(image_id)}.manifest.json"


def remote_tools(host: RemoteHost) -> frozenset[str]:
    """What the host can decompress with: {"python3", "zstd-cli", "zstd-py"} or fewer."""
    result = host.run(["sh", "-c", _PROBE_SH], timeout=60)
    return frozenset(result.stdout.split())


def remote_layers(host: RemoteHost, data_dir: str) -> set[str]:
    """The diffIDs in the host's layer cache, by file name only: each file was verified on
    receipt (use verify_remote_layer to check one again)."""
    folder = RemoteLayout.at(data_dir).layers_dir
    result = host.run(["sh", "-c", '[ -d "$1" ] || exit 0; ls -1A -- "$1"', "sh", folder], timeout=60)
    if result.exit_code != 0:
        raise ProviderFailure(f"cannot list {folder} on {host.endpoint.address}: {result.stderr.strip()}")
    return {f"sha256:{m[1]}" for line in result.stdout.splitlines() if (m := _LAYER_NAME.fullmatch(line))}


def verify_remote_layer(host: RemoteHost, data_dir: str, diff_id: str) -> bool:
    """Hash the host's cached layer; a corrupt one is deleted (so the next sync sends it again).
    False when it is missing or was corrupt."""
    path = RemoteLayout.at(data_dir).layer(diff_id)
    result = host.run(sha256_argv(path), timeout=600)
    if result.exit_code == 2 and "cannot read" in result.stderr:
        return False
    words = result.stdout.split()
    if result.exit_code != 0 or not words:
        raise ProviderFailure(f"cannot hash {path} on {host.endpoint.address}: {result.stderr.strip()}")
    if words[0] == digest_hex(diff_id):
        return True
    host.run(["rm", "-f", "--", path], timeout=60)
    return False


@dataclass(frozen=True)
class LayerEntry:
    diff_id: str
    size: int  # uncompressed


@dataclass(frozen=True)
class SyncPlan:
    """Which layers to send and which the host already has, each once, in image order."""

    send: tuple[LayerEntry, ...]
    skip: tuple[LayerEntry, ...]

    @property
    def bytes_to_send(self) -> int:
        return sum(entry.size for entry in self.send)

    @property
    def bytes_skipped(self) -> int:
        return sum(entry.size for entry in self.skip)


def plan_sync(local: ImageLayers, remote_present: set[str]) -> SyncPlan:
    """Split the image's layers into those the host lacks and those it has (a layer that
    appears twice in an image is listed once)."""
    send: list[LayerEntry] = []
    skip: list[LayerEntry] = []
    seen: set[str] = set()
    for diff_id, size in zip(local.diff_ids, local.sizes, strict=True):
        if diff_id in seen:
            continue
        seen.add(diff_id)
        (skip if diff_id in remote_present else send).append(LayerEntry(diff_id, size))
    return SyncPlan(tuple(send), tuple(skip))


# -- the sync -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyncReport:
    """What a sync did. bytes_sent counts bytes on the wire from the laptop (compressed,
    resumed parts not counted twice); bytes_fetched what the host fetched from a registry;
    bytes_skipped the uncompressed size of the layers the host already had. sources says, per
    layer, where it came from: "instance", "laptop" or the registry that served it."""

    image_id: str
    codec: str
    sent: tuple[str, ...]
    skipped: tuple[str, ...]
    bytes_sent: int
    bytes_skipped: int
    seconds: float
    fetched: tuple[str, ...] = ()
    bytes_fetched: int = 0
    sources: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # why a layer or a registry fell back, one line each

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """'N layers sent, M fetched by the host (X MB), K skipped, X MB sent, Y MB skipped, T s'."""
        fetched = (
            f" {len(self.fetched)} fetched by the host ({self.bytes_fetched / 1e6:.1f} MB),"
            if self.fetched
            else ""
        )
        return (
            f"{len(self.sent)} layers sent,{fetched} {len(self.skipped)} skipped,"
            f" {self.bytes_sent / 1e6:.1f} MB sent, {self.bytes_skipped / 1e6:.1f} MB skipped,"
            f" {self.seconds:.1f} s"
        )

    @classmethod
    def nothing_sent(cls, image: ImageLayers, codec: str) -> SyncReport:
        """The report for a host that already had the whole image."""
        unique = tuple(dict.fromkeys(image.diff_ids))
        skipped = sum(image.size_of(diff_id) for diff_id in unique)
        sources = dict.fromkeys(unique, "instance")
        return cls(image.image_id, codec, (), unique, 0, skipped, 0.0, sources=sources)


def sync_layers(
    host: RemoteHost,
    image: ImageLayers,
    data_dir: str,
    progress: LayerProgress | None = None,
    *,
    verify: bool = False,
    needed: set[str] | None = None,
    registry: RegistrySource | None = None,
    steps: DetachedSteps | None = None,
    note: Callable[[str], None] | None = None,
    also_needs: int = 0,
) -> SyncReport:
    """Put the image's layers into the host's layer cache, then its config and a manifest of
    its diffIDs in order. Layers the cache has are skipped; with a registry (and the host's
    steps to run the fetcher), those it serves are fetched by the host while the laptop sends
    the rest, and any the host could not fetch are sent from the laptop afterwards.

    needed limits the layers the cache must hold (default: all); the others (say, layers the
    host's Docker engine has) count as skipped. With verify, the layers the host claims are
    hashed first and corrupt ones are replaced. Before anything moves, the data disk must have
    room for the layers to come and also_needs bytes more (what the caller makes of them)."""
    from runner import layer_fetch, link_speeds

    started = time.monotonic()
    layout = RemoteLayout.at(data_dir)
    choice = choose_codec(local_has_zstd(), remote_tools(host))
    wanted = set(image.diff_ids) if needed is None else set(needed)
    present = remote_layers(host, layout.data_dir) & wanted
    if verify:
        present = {d for d in present if verify_remote_layer(host, layout.data_dir, d)}
    present |= set(image.diff_ids) - wanted
    plan = plan_sync(image, present)
    host.require_space(data_dir, plan.bytes_to_send + also_needs, f"image {image.image_id[:19]}")
    servable = registry.blobs if registry is not None and steps is not None else {}
    fetch_entries = [e for e in plan.send if e.diff_id in servable]
    send_entries = [e for e in plan.send if e.diff_id not in servable]
    routes = link_speeds.Routes(host.endpoint.address, registry.name if registry else None)
    if note is not None and plan.send:
        note(
            routes.plan_line(
                sum(e.size for e in send_entries), sum(servable[e.diff_id].size for e in fetch_entries)
            )
        )
    fetch = (
        layer_fetch.start(steps, layout, registry, [e.diff_id for e in fetch_entries])
        if fetch_entries
        else None
    )
    try:
        sent = _send_layers(host, layout, image, send_entries, choice, progress, routes)
    except BaseException:
        if fetch is not None:
            layer_fetch.forget(steps, fetch)
        raise
    notes: list[str] = []
    sources = {e.diff_id: "instance" for e in plan.skip} | {e.diff_id: "laptop" for e in send_entries}
    fetched: dict[str, str] = {}
    bytes_fetched = 0
    if fetch is not None:
        outcome = layer_fetch.finish(steps, fetch, progress)
        routes.measured_fetch(outcome.bytes_fetched, outcome.seconds)
        fetched, bytes_fetched = outcome.fetched, outcome.bytes_fetched
        notes += [f"registry {reason}" for reason in outcome.dropped]
        notes += [
            f"layer {d.removeprefix('sha256:')[:12]}: {why}; sent from the laptop"
            for d, why in outcome.missing.items()
        ]
        fallback = [e for e in fetch_entries if e.diff_id in outcome.missing]
        sent += _send_layers(host, layout, image, fallback, choice, progress, routes)
        sources |= fetched | {e.diff_id: "laptop" for e in fallback}
    sent += _send_image_files(host, image, layout)
    return SyncReport(
        image_id=image.image_id,
        codec=choice.codec.value,
        sent=tuple(d for d, where in sources.items() if where == "laptop"),
        skipped=tuple(e.diff_id for e in plan.skip),
        bytes_sent=sent,
        bytes_skipped=plan.bytes_skipped,
        seconds=round(time.monotonic() - started, 3),
        fetched=tuple(fetched),
        bytes_fetched=bytes_fetched,
        sources={d: sources[d] for d in dict.fromkeys(image.diff_ids) if d in sources},
        notes=tuple(notes),
    )


def _send_layers(
    host: RemoteHost,
    layout: RemoteLayout,
    image: ImageLayers,
    entries: list[LayerEntry],
    choice: CodecChoice,
    progress: LayerProgress | None,
    routes,
) -> int:
    """Send layers from the laptop, compressing each ahead in a thread (zlib and zstd release
    the GIL) while the previous one goes out; the bytes sent."""
    if not entries:
        return 0
    started = time.monotonic()
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compress")
    try:
        packed = [pool.submit(compress_layer, image.cache, e.diff_id, choice.codec) for e in entries]
        sent = sum(
            _send_layer(
                host, layout, entry, future.result(), image.cache.layer(entry.diff_id), choice, progress
            )
            for entry, future in zip(entries, packed, strict=True)
        )
    finally:
        pool.shutdown(cancel_futures=True)
    routes.measured_upload(sent, time.monotonic() - started)
    return sent


def _send_layer(
    host: RemoteHost,
    layout: RemoteLayout,
    entry: LayerEntry,
    packed: Path,
    source: Path,
    choice: CodecChoice,
    progress: LayerProgress | None,
) -> int:
    """Upload the compressed layer (resumable, verified), decompress and verify it on the host;
    return the bytes sent. A layer that arrives as other bytes than its diffID names was
    corrupt at home: the compressed copy goes, and the cached layer (source) too if it no
    longer hashes to its name, so that the next sync takes it from the engine again."""
    upload = layout.upload(entry.diff_id, choice.codec)
    report = None if progress is None else (lambda done, total: progress(entry.diff_id, done, total))
    transfer = host.put(packed, upload, progress=report)
    final = layout.layer(entry.diff_id)
    argv = ["python3", "-c", _RECEIVE_PY, choice.decoder, upload, final, digest_hex(entry.diff_id)]
    result = host.run(argv, timeout=120 + entry.size / 20e6)
    if result.exit_code == 3:
        packed.unlink(missing_ok=True)  # the next sync compresses it afresh
        dropped = "the compressed copy was dropped"
        if sha256_file(source)[0] != digest_hex(entry.diff_id):
            source.unlink()
            dropped = f"the laptop's cached copy {source} was corrupt and is removed"
        raise ProviderFailure(
            f"layer {entry.diff_id} arrived on {host.endpoint.address} as sha256:"
            f"{result.stdout.strip()}; {dropped}, retry the sync"
        )
    if result.exit_code != 0:
        raise ProviderFailure(
            f"cannot unpack layer {entry.diff_id} on {host.endpoint.address}: {result.stderr.strip()}"
        )
    return transfer.bytes_sent


def _send_image_files(host: RemoteHost, image: ImageLayers, layout: RemoteLayout) -> int:
    """Upload the config and the manifest (put sends nothing when the host has the same bytes)."""
    manifest = image.cache.manifest(image.image_id)
    write_json_atomic(
        manifest,
        {
            "image_id": image.image_id,
            "config": f"images/{digest_hex(image.image_id)}.json",
            "diff_ids": list(image.diff_ids),
            "layers": [f"layers/sha256/{digest_hex(d)}.tar" for d in image.diff_ids],
        },
    )
    config = host.put(image.cache.config(image.image_id), layout.config(image.image_id))
    listing = host.put(manifest, layout.manifest(image.image_id))
    return config.bytes_sent + listing.bytes_sent
