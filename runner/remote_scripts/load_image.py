"""Load an image into this host's Docker engine from the layer cache, without a registry.

Standalone: standard library only, Python >= 3.8. The controller ships it to the host and runs
``python3 load_image.py PLAN_JSON``. The plan names the image's config file and, in order, each
layer's diffID and cached tar; a layer whose tar is null is one the engine already holds (with
every layer before it), and is left out of the archive: the classic image store skips a layer
whose chain it has, so the archive carries only what is new. The archive (the `docker save`
layout: manifest.json, the config, one layer.tar per layer) is streamed into ``docker load``
and never written to disk. Exit status: docker load's, or 2 when the plan is unusable.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile

HEX = re.compile(r"sha256:([0-9a-f]{64})")


def digest_hex(digest: str) -> str:
    match = HEX.fullmatch(digest) if isinstance(digest, str) else None
    if match is None:
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return match.group(1)


def add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size = len(data)
    member.mode = 0o644
    archive.addfile(member, io.BytesIO(data))


def add_file(archive: tarfile.TarFile, name: str, path: str) -> None:
    with open(path, "rb") as source:
        member = tarfile.TarInfo(name)
        member.size = os.fstat(source.fileno()).st_size
        member.mode = 0o644
        archive.addfile(member, source)


def write_archive(plan: dict, sink) -> None:
    """The `docker save` layout of the plan's image, layers the engine has left out."""
    config_name = digest_hex(plan["image_id"]) + ".json"
    names = [digest_hex(layer["diff_id"]) + "/layer.tar" for layer in plan["layers"]]
    manifest = [{"Config": config_name, "RepoTags": plan.get("tags") or None, "Layers": names}]
    written = set()
    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as archive:
        add_bytes(archive, "manifest.json", json.dumps(manifest).encode())
        add_file(archive, config_name, plan["config"])
        for index, layer in enumerate(plan["layers"]):
            name = names[index]
            if layer.get("tar") and name not in written:
                add_file(archive, name, layer["tar"])
                written.add(name)


def main(argv: list) -> int:
    if len(argv) != 1:
        print("usage: load_image.py PLAN_JSON", file=sys.stderr)
        return 2
    try:
        with open(argv[0]) as f:
            plan = json.load(f)
        digest_hex(plan["image_id"])
        for layer in plan["layers"]:
            digest_hex(layer["diff_id"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"error: bad load plan {argv[0]}: {e}", file=sys.stderr)
        return 2
    load = subprocess.Popen(["docker", "load", "-q"], stdin=subprocess.PIPE)
    try:
        write_archive(plan, load.stdin)
        load.stdin.close()
    except BrokenPipeError:
        pass  # docker load gave up; its own message and status say why
    return load.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
