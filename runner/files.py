"""File integrity: content hashes and atomic writes.

Everything runner records about a file (inputs, artifacts, manifests) goes through here,
so a half-written file is never mistaken for a finished one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

CHUNK = 1 << 20


def sha256_file(path: Path) -> tuple[str, int]:
    """The file's sha256 (hex) and its size in bytes, reading it once."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def copy_hashed(src: Path, dest: Path) -> tuple[str, int]:
    """Copy src to dest through a temporary name; return the sha256 and size of what was written."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with src.open("rb") as reader, os.fdopen(fd, "wb") as writer:
            while chunk := reader.read(CHUNK):
                writer.write(chunk)
                digest.update(chunk)
                size += len(chunk)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest.hexdigest(), size


def write_json_atomic(path: Path, payload: object) -> None:
    """Write JSON so that readers see either the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2, sort_keys=True, ensure_ascii=False)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_objects(text: str) -> list[dict]:
    """The JSON objects of a JSON-lines text, one per line; other lines are skipped (a writer
    killed mid-line leaves a partial last one)."""
    objects = []
    for line in text.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            objects.append(value)
    return objects


def json_lines(path: Path) -> list[dict]:
    """json_objects of a file; [] when it cannot be read."""
    try:
        return json_objects(path.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return []
