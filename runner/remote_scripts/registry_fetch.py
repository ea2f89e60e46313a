"""A small client of the registry HTTP API (v2 / OCI distribution): resolve an image, fetch layers.

Standalone: standard library only, Python >= 3.8. The controller imports it to resolve a base
image (manifest and config: a few KB), and ships it to the instance, where

    python3 registry_fetch.py PLAN.json

fetches the planned layers from the first registry that serves them into the instance's layer
cache (`<hex of diffID>.tar`). The instance's data-centre link to a registry or a regional
mirror is usually far faster than the laptop's uplink, so public base layers come this way and
only the project's own layers travel from the laptop.

What it guarantees, per layer:
- a layer is fetched under a lock (`.<hex>.lock`), so two fetches never write the same file;
- a blob is written to `.<hex>.blob.part` and resumed with an HTTP range after a cut (also by a
  later run); it counts only if its sha256 is the manifest's digest; a mismatch discards it and
  fetches once more, then stops with the registry named (exit 3);
- the blob is decompressed while hashed and renamed to `<hex of diffID>.tar` only when that
  hash is the diffID, so the cache's names stay trustworthy;
- sources are tried in order (mirrors first, the upstream registry last); one that cannot be
  reached or lacks the blob is dropped with a one-line reason, and a layer no source could give
  is reported so the laptop sends it;
- credentials come from the environment (REGISTRY_USER, REGISTRY_PASSWORD), never the command
  line, and are sent only to the registry and its token service, never after a redirect to
  another host (blob storage). Refused credentials stop the fetch (exit 2).

Progress and outcomes are JSON lines on stdout: {"event": "progress" | "fetched" | "dropped" |
"missing" | "error", ...}.
"""

from __future__ import annotations

import base64
import fcntl
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

CHUNK = 1 << 20
TIMEOUT_S = 30
RETRIES = 4  # cut transfers resumed per source before it is dropped
MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
INDEX_TYPES = MANIFEST_TYPES[:2]
DOCKER_HUB = "registry-1.docker.io"
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_PARAM = re.compile(r'(\w+)="([^"]*)"')
_lock = threading.Lock()


class RegistryError(Exception):
    """A source cannot serve what was asked (unreachable, missing, refusing): try the next.
    Its message reads after the source's name ("cannot be reached: ...").
    transient: the source could not be reached (worth a retry if it was serving a moment ago)."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class CredentialsRefused(Exception):
    """The registry refused the credentials given: a configuration error, not a fallback."""


class CorruptBlob(Exception):
    """A blob's bytes did not hash to its digest twice in a row."""


# -- references ----------------------------------------------------------------------------


def parse_reference(ref: str) -> tuple[str, str, str]:
    """(registry host, repository, tag or digest) of an image reference, as Docker reads it:
    no registry part means Docker Hub, and a one-word repository there is under library/."""
    name, digest = ref.split("@", 1) if "@" in ref else (ref, "")
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        host, path = first, rest
    else:
        host, path = DOCKER_HUB, name
    tag = ""
    if ":" in path.rsplit("/", 1)[-1]:
        path, tag = path.rsplit(":", 1)
    if host == DOCKER_HUB and "/" not in path:
        path = "library/" + path
    if host in ("docker.io", "index.docker.io"):
        host = DOCKER_HUB
    return host, path, digest or tag or "latest"


def registry_url(host: str, insecure: list) -> str:
    """https, except for loopback registries and those listed as insecure (plain HTTP)."""
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host
    plain = host in insecure or name in ("localhost", "127.0.0.1", "[::1]")
    return ("http://" if plain else "https://") + host


# -- HTTP with registry auth -----------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # followed by hand: credentials must not go along to another host


_opener = urllib.request.build_opener(_NoRedirect)


class Registry:
    """One registry (or mirror) at base_url, with the credentials to offer if it asks."""

    def __init__(self, base_url: str, credentials: tuple | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.credentials = credentials
        self._tokens: dict = {}

    @property
    def name(self) -> str:
        return urllib.parse.urlsplit(self.base_url).netloc

    def get(self, path: str, repository: str, headers: dict | None = None):
        """GET base_url + path, answering an auth challenge once; the open response (2xx)."""
        url = self.base_url + path
        headers = dict(headers or {})
        token = self._tokens.get(repository)
        if token:
            headers["Authorization"] = token
        status, response = self._open(url, headers)
        if status == 401:
            challenge = response.headers.get("WWW-Authenticate", "")
            response.close()
            self._tokens[repository] = headers["Authorization"] = self._authorize(challenge, repository)
            status, response = self._open(url, headers)
        self._refuse_errors(status, response, f"answered HTTP {status} for {path}")
        return status, response

    def _refuse_errors(self, status: int, response, what: str) -> None:
        """Close an error answer and raise for it: 401 after authorizing is a refusal."""
        if status == 401:
            response.close()
            raise self._refused()
        if status >= 400:
            response.close()
            raise RegistryError(what, transient=status >= 500)

    def _open(self, url: str, headers: dict, hops: int = 5) -> tuple:
        """(status, response) of one request, following redirects by hand (Authorization
        dropped for another host)."""
        origin = urllib.parse.urlsplit(url).netloc
        for _ in range(hops + 1):
            request = urllib.request.Request(url, headers=headers)
            try:
                response = _opener.open(request, timeout=TIMEOUT_S)
                status = response.status
            except urllib.error.HTTPError as exc:
                response, status = exc, exc.code
            except (OSError, ValueError) as exc:
                raise RegistryError(f"cannot be reached: {_why(exc)}", transient=True) from None
            if status not in (301, 302, 303, 307, 308):
                return status, response
            location = response.headers.get("Location", "")
            response.close()
            url = urllib.parse.urljoin(url, location)
            if urllib.parse.urlsplit(url).netloc != origin:
                headers = {k: v for k, v in headers.items() if k != "Authorization"}
        raise RegistryError("too many redirects")

    def _authorize(self, challenge: str, repository: str) -> str:
        """The Authorization value the challenge asks for: Basic with the credentials, or a
        Bearer token from the realm (anonymous, or with the credentials, as Docker Hub does)."""
        scheme, _, rest = challenge.partition(" ")
        if scheme.lower() == "basic":
            if not self.credentials:
                raise RegistryError("needs credentials (set REGISTRY_USER and REGISTRY_PASSWORD)")
            return "Basic " + _basic(self.credentials)
        if scheme.lower() != "bearer":
            raise RegistryError(f"asks for unknown authentication {scheme!r}")
        params = dict(_PARAM.findall(rest))
        query = {
            "service": params.get("service", ""),
            "scope": params.get("scope") or f"repository:{repository}:pull",
        }
        url = params.get("realm", "") + "?" + urllib.parse.urlencode(query)
        headers = {"Authorization": "Basic " + _basic(self.credentials)} if self.credentials else {}
        status, response = self._open(url, headers)
        self._refuse_errors(status, response, f"its token service answered HTTP {status}")
        with response:
            body = json.loads(response.read().decode() or "{}")
        token = body.get("token") or body.get("access_token")
        if not token:
            raise RegistryError("its token service gave no token")
        return "Bearer " + token

    def _refused(self) -> Exception:
        if self.credentials:
            return CredentialsRefused(
                f"registry {self.name} refused the credentials in REGISTRY_USER/REGISTRY_PASSWORD"
            )
        return RegistryError("refused anonymous access (give credentials)")

    # -- the API -------------------------------------------------------------------------

    def manifest(self, repository: str, reference: str) -> tuple:
        """(body bytes, media type, digest) of a manifest; checked against reference if a digest."""
        accept = {"Accept": ", ".join(MANIFEST_TYPES)}
        _, response = self.get(f"/v2/{repository}/manifests/{reference}", repository, accept)
        with response:
            body = response.read()
            media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if _DIGEST.fullmatch(reference) and digest != reference:
            raise RegistryError(f"served manifest {digest} for {reference}")
        return body, json.loads(body).get("mediaType") or media_type, digest

    def blob_bytes(self, repository: str, digest: str, limit: int = 64 << 20) -> bytes:
        """A small blob (an image config), verified against its digest."""
        _, response = self.get(f"/v2/{repository}/blobs/{digest}", repository)
        with response:
            body = response.read(limit + 1)
        if len(body) > limit or "sha256:" + hashlib.sha256(body).hexdigest() != digest:
            raise RegistryError(f"served a config that does not hash to {digest}")
        return body


def _basic(credentials: tuple) -> str:
    return base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()


def _why(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or exc
    return str(reason).strip() or type(reason).__name__


# -- resolving an image (used by the controller) ---------------------------------------------


def resolve(ref: str, sources: list, credentials: tuple | None = None, platform: str = "linux/amd64") -> dict:
    """The image at ref as the first answering source serves it: its manifest digest, its
    config digest and, per layer, blob digest, size, media type and diffID (from the config).

    sources are registry base URLs (mirrors first, the upstream last); a source that fails
    is reported in "dropped" with its reason. RegistryError when none answered."""
    _, repository, reference = parse_reference(ref)
    dropped = []
    for url in sources:
        registry = Registry(url, credentials)
        try:
            image = _resolve_at(registry, repository, reference, platform)
        except RegistryError as exc:
            dropped.append({"source": registry.name, "reason": str(exc)})
            continue
        return {**image, "ref": ref, "repository": repository, "source": registry.name, "dropped": dropped}
    reasons = "; ".join(f"{d['source']} {d['reason']}" for d in dropped) or "no source given"
    raise RegistryError(f"no registry could resolve {ref}: {reasons}")


def _resolve_at(registry: Registry, repository: str, reference: str, platform: str) -> dict:
    body, media_type, digest = registry.manifest(repository, reference)
    manifest = json.loads(body)
    if media_type in INDEX_TYPES:
        chosen = _for_platform(manifest, platform)
        if chosen is None:
            raise RegistryError(f"{repository}:{reference} has no {platform} image")
        body, media_type, digest = registry.manifest(repository, chosen)
        manifest = json.loads(body)
    config_digest = manifest["config"]["digest"]
    config = json.loads(registry.blob_bytes(repository, config_digest))
    diff_ids = config["rootfs"]["diff_ids"]
    layers = manifest["layers"]
    if len(diff_ids) != len(layers):
        raise RegistryError(f"{repository} lists {len(layers)} layers, its config {len(diff_ids)}")
    return {
        "manifest_digest": digest,
        "config_digest": config_digest,
        "layers": [
            {
                "digest": layer["digest"],
                "size": int(layer["size"]),
                "media_type": layer["mediaType"],
                "diff_id": diff_id,
            }
            for layer, diff_id in zip(layers, diff_ids)  # noqa: B905 (Python 3.8 on the host)
        ],
    }


def _for_platform(index: dict, platform: str) -> str | None:
    wanted_os, _, wanted_arch = platform.partition("/")
    for entry in index.get("manifests", []):
        found = entry.get("platform", {})
        if found.get("os") == wanted_os and found.get("architecture") == wanted_arch:
            return entry["digest"]
    return None


# -- fetching layers (run on the instance) ---------------------------------------------------


def emit(**event) -> None:
    with _lock:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()


class Sources:
    """The registries to try, in order; one that failed is dropped for every later layer."""

    def __init__(self, urls: list, credentials: tuple | None) -> None:
        self.registries = [Registry(url, credentials) for url in urls]
        self.dropped: set = set()

    def live(self) -> list:
        with _lock:
            return [r for r in self.registries if r.name not in self.dropped]

    def drop(self, registry: Registry, reason: str) -> None:
        with _lock:
            if registry.name in self.dropped:
                return
            self.dropped.add(registry.name)
        emit(event="dropped", source=registry.name, reason=reason)


def fetch_layer(layer: dict, repository: str, sources: Sources, dest: str) -> None:
    """Fetch one layer, holding its lock: another fetch of the same layer (a second sync, a
    fetch left running by an interrupted one) waits, then finds it in the cache."""
    with open(os.path.join(dest, "." + layer["diff_id"].split(":", 1)[1] + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _fetch_layer(layer, repository, sources, dest)


def _fetch_layer(layer: dict, repository: str, sources: Sources, dest: str) -> None:
    """Fetch one layer from the first source that gives it whole, into dest/<diff hex>.tar."""
    final = os.path.join(dest, layer["diff_id"].split(":", 1)[1] + ".tar")
    if os.path.exists(final):
        emit(event="fetched", diff_id=layer["diff_id"], source="cache", bytes=0, seconds=0)
        return
    decoder = _decoder(layer["media_type"])
    if decoder is None:
        emit(
            event="missing",
            diff_id=layer["diff_id"],
            reason=f"no decoder on this host for {layer['media_type']}",
        )
        return
    for registry in sources.live():
        started = time.monotonic()
        try:
            blob, sent = _download_verified(registry, repository, layer, dest)
            _unpack(blob, decoder, final, layer["diff_id"])
        except RegistryError as exc:
            sources.drop(registry, str(exc))
            continue
        emit(event="fetched", diff_id=layer["diff_id"], source=registry.name, bytes=sent,
             seconds=round(time.monotonic() - started, 3))  # fmt: skip
        return
    emit(event="missing", diff_id=layer["diff_id"], reason="no registry could serve it")


def _download_verified(registry: Registry, repository: str, layer: dict, dest: str) -> tuple:
    """The blob at dest/.<hex>.blob.part, hashed to its digest; a mismatch is refetched once."""
    part = os.path.join(dest, "." + layer["digest"].split(":", 1)[1] + ".blob.part")
    sent = 0
    for attempt in (1, 2):
        sent += _download(registry, repository, layer, part)
        found = _sha256_file(part)
        if found == layer["digest"]:
            return part, sent
        os.remove(part)
        emit(event="corrupt", diff_id=layer["diff_id"], source=registry.name, attempt=attempt, found=found)
    raise CorruptBlob(
        f"registry {registry.name} served blob {layer['digest']} corrupt twice (it hashed to {found})"
    )


def _download(registry: Registry, repository: str, layer: dict, part: str) -> int:
    """Append the blob's missing bytes to part, resuming with a range after every cut; the
    bytes received."""
    received, failures = 0, 0
    last_report = 0.0
    while True:
        have = os.path.getsize(part) if os.path.exists(part) else 0
        if have >= layer["size"]:
            return received
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            status, response = registry.get(f"/v2/{repository}/blobs/{layer['digest']}", repository, headers)
            with response, open(part, "ab" if status == 206 else "wb") as out:
                while True:
                    block = response.read(CHUNK)
                    if not block:
                        break
                    out.write(block)
                    received += len(block)
                    if time.monotonic() - last_report > 0.5:
                        last_report = time.monotonic()
                        emit(event="progress", diff_id=layer["diff_id"], done=out.tell(), total=layer["size"])
            if os.path.getsize(part) < layer["size"]:
                raise OSError("the connection closed early")
        except RegistryError as exc:
            if not (exc.transient and received):  # a source down from the start is dropped at once
                raise
            failures = _pause(failures, registry, layer, exc)
        except (OSError, ValueError) as exc:  # a cut: resume from what arrived
            failures = _pause(failures, registry, layer, exc)


def _pause(failures: int, registry: Registry, layer: dict, exc: BaseException) -> int:
    """Wait before resuming a cut transfer (0.5, 1, 2, 4 s); give the source up after RETRIES."""
    failures += 1
    if failures > RETRIES:
        raise RegistryError(f"kept dropping {layer['digest']}: {_why(exc)}") from None
    time.sleep(min(2**failures * 0.25, 5))
    return failures


def _decoder(media_type: str):
    """A function opening a layer blob as its uncompressed tar, or None if this host cannot."""
    if media_type.endswith(("tar.gzip", "tar+gzip")):
        return lambda path: gzip.open(path, "rb")
    if media_type.endswith(("rootfs.diff.tar", "layer.v1.tar")):
        return lambda path: open(path, "rb")
    if media_type.endswith("tar+zstd"):
        try:
            import zstandard
        except ImportError:
            if shutil.which("zstd") is None:
                return None
            return lambda path: subprocess.Popen(["zstd", "-dcq", "--", path], stdout=subprocess.PIPE).stdout
        return lambda path: zstandard.ZstdDecompressor().stream_reader(open(path, "rb"))
    return None


def _unpack(blob: str, decoder, final: str, diff_id: str) -> None:
    """Decompress blob to final while hashing; keep it only if it hashes to diff_id."""
    tmp = final + ".fetch.tmp"
    digest = hashlib.sha256()
    try:
        with decoder(blob) as source, open(tmp, "wb") as out:
            while True:
                block = source.read(CHUNK)
                if not block:
                    break
                digest.update(block)
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
    except (OSError, EOFError) as exc:
        _remove(tmp, blob)
        raise RegistryError(f"blob for {diff_id} does not decompress: {exc}") from None
    if "sha256:" + digest.hexdigest() != diff_id:
        _remove(tmp, blob)
        raise RegistryError(f"blob for {diff_id} decompressed to sha256:{digest.hexdigest()}")
    os.replace(tmp, final)
    os.remove(blob)


def _remove(*paths: str) -> None:
    for path in paths:
        if os.path.exists(path):
            os.remove(path)


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(CHUNK)
            if not block:
                return "sha256:" + digest.hexdigest()
            digest.update(block)


def main(plan_path: str) -> int:
    with open(plan_path) as f:
        plan = json.load(f)
    user, password = os.environ.get("REGISTRY_USER"), os.environ.get("REGISTRY_PASSWORD")
    sources = Sources(plan["sources"], (user, password) if user and password else None)
    os.makedirs(plan["dest"], exist_ok=True)
    failures: list = []

    def one(layer: dict) -> None:
        try:
            fetch_layer(layer, plan["repository"], sources, plan["dest"])
        except (CredentialsRefused, CorruptBlob) as exc:
            failures.append(exc)
            emit(event="error", diff_id=layer["diff_id"], reason=str(exc))

    with ThreadPoolExecutor(max_workers=max(1, int(plan.get("parallel", 4)))) as pool:
        list(pool.map(one, plan["layers"]))
    if any(isinstance(exc, CredentialsRefused) for exc in failures):
        return 2
    return 3 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
