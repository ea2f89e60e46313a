"""Download a file on the instance, resumably, and keep it only if its sha256 is the expected one.

Weights (13 GB for LLaMA-7B) and datasets belong on the instance's own fast link during the
cheap no-GPU boot, not on the laptop's uplink. A dropped connection resumes from the bytes
already on disk (HTTP Range), the result is hashed while written, and it takes its final name
only when the hash matches: a later step never sees a half-downloaded or wrong file.

    python -m trainer.fetch URL --out PATH --sha256 HEX [--retries N] [--record FILE]

With --record, a line is appended to FILE (JSON lines) saying what was fetched: the URL without
its query, fragment or credentials (signed URLs carry secrets there), the path, sha256 and size.
The bundled jobs record into /out/downloads.jsonl, which runner copies into the run's manifest.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from trainer.report import report

CHUNK = 1 << 20


def fetch(url: str, out: Path, sha256: str, retries: int = 5, timeout: float = 60.0) -> dict:
    """Download url to out (resuming out.part), check sha256, rename; return what was done."""
    if out.is_file() and _sha256(out) == sha256:
        return {"path": str(out), "sha256": sha256, "bytes": out.stat().st_size, "downloaded": 0}
    part = out.with_name(out.name + ".part")
    out.parent.mkdir(parents=True, exist_ok=True)
    downloaded = 0
    for attempt in range(1, retries + 1):
        try:
            downloaded += _download(url, part, timeout)
            break
        except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as exc:
            if isinstance(exc, urllib.error.HTTPError) and exc.code < 500 and exc.code != 429:
                raise
            if attempt == retries:
                raise
            print(f"fetch: {exc}; resuming ({attempt}/{retries})", file=sys.stderr)
            time.sleep(min(30, 2**attempt))
    found = _sha256(part)
    if found != sha256:
        part.unlink()
        raise ValueError(f"{url}: sha256 is {found}, expected {sha256}; the download was discarded")
    os.replace(part, out)
    return {"path": str(out), "sha256": sha256, "bytes": out.stat().st_size, "downloaded": downloaded}


def _download(url: str, part: Path, timeout: float) -> int:
    """Append what part lacks; a server that ignores the Range header gets the file afresh."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    written = 0
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left past the end: part is whole (the hash decides)
            return 0
        raise
    expected = response.headers.get("Content-Length")
    with response, part.open("ab" if response.status == 206 else "wb") as sink:
        while block := response.read(CHUNK):
            sink.write(block)
            written += len(block)
    if expected is not None and written < int(expected):
        raise ConnectionError(f"the answer stopped after {written} of {expected} bytes")
    return written


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while block := source.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def public_url(url: str) -> str:
    """The URL without user info, query or fragment: what may be written down."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def record(path: Path, url: str, result: dict) -> None:
    entry = {
        "url": public_url(url),
        "path": result["path"],
        "sha256": result["sha256"],
        "bytes": result["bytes"],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as log:
        log.write(json.dumps(entry) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.fetch", description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sha256", required=True, help="the file's expected sha256 (64 hex digits)")
    parser.add_argument("--retries", type=int, default=5)
    parser.add_argument("--record", type=Path, help="append what was fetched to this JSON-lines file")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if len(args.sha256) != 64 or any(c not in "0123456789abcdef" for c in args.sha256):
        parser.error(f"--sha256 must be 64 lowercase hex digits, got {args.sha256!r}")
    try:
        result = fetch(args.url, args.out, args.sha256, args.retries)
        if args.record is not None:
            record(args.record, args.url, result)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    line = f"{result['path']}: {result['bytes']} bytes, sha256 {result['sha256'][:16]}…"
    return report(result, args.json, line)


if __name__ == "__main__":
    sys.exit(main())
