"""Apply an image's uncompressed layer tars, in order, onto a root file system folder.

Standalone: standard library only, Python >= 3.8. The controller sends it over SSH and runs it as
``python3 - --rootfs DIR --layer TAR [--layer TAR ...] [--json] < unpack_layers.py``.

The result is what Docker would build: regular files, directories, symlinks (never followed when
writing) and hard links, with OCI whiteouts honoured. A ``.wh.NAME`` member deletes NAME from the
lower layers; ``.wh..wh..opq`` empties its folder of lower-layer content. All whiteouts of a layer
are applied before its other entries, whatever their order in the tar, since they only ever refer
to lower layers. Ownership is left alone (proot fakes root); mtimes and permission bits are kept,
minus setuid/setgid. Character/block devices and fifos (and hard links to them) are skipped and
reported: they cannot be made without root, and proot binds the host's /dev anyway.

Refused, with exit status 2 and one line ``error: LAYER: member NAME: reason`` on stderr: a member
path that is absolute or climbs out with ``..``, a member (or whiteout, or hard link target) whose
parent path passes through a symlink inside the rootfs, and a hard link target that escapes.
Other failures (unreadable tar, disk full) exit 1. ``DIR/.runner-unpacked.json`` (``{"layers":
[sha256 hex of each layer tar, in order]}``) is removed first and written, atomically, only after
every layer applied.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import posixpath
import stat
import sys
import tarfile

MARKER = ".runner-unpacked.json"
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


class Refused(Exception):
    def __init__(self, member: str, reason: str):
        super().__init__(f"member {member}: {reason}")


def normalise(name: str, member: str, what: str = "") -> str:
    """The path relative to the rootfs; '.' for the root itself. `what` prefixes the refusal."""
    if name.startswith("/"):
        raise Refused(member, what + "absolute path")
    rel = posixpath.normpath(name)
    if rel == ".." or rel.startswith("../"):
        raise Refused(member, what + "path escapes the rootfs")
    if rel.split("/")[0].startswith(MARKER):
        raise Refused(member, what + "reserved name")
    return rel


def classify(m: tarfile.TarInfo) -> tuple[str, str]:
    """(kind, path relative to the rootfs) for one member, refusing unsafe paths."""
    rel = normalise(m.name, m.name)
    base = posixpath.basename(rel)
    if base == OPAQUE:
        return "opaque", posixpath.dirname(rel) or "."
    if base.startswith(WHITEOUT + WHITEOUT):
        return "skip", rel  # other AUFS metadata (.wh..wh.plnk, ...): Docker ignores it too
    if base.startswith(WHITEOUT):
        name = base[len(WHITEOUT) :]
        if name in ("", ".", ".."):
            raise Refused(m.name, "bad whiteout")
        return "whiteout", posixpath.join(posixpath.dirname(rel), name)
    if m.islnk() and normalise(m.linkname, m.name, f"hard link target {m.linkname}: ") in (".", rel):
        raise Refused(m.name, f"bad hard link target {m.linkname}")
    kinds = (("root", rel == "."), ("device", m.ischr() or m.isblk() or m.isfifo()), ("hardlink", m.islnk()))
    kinds += (("dir", m.isdir()), ("symlink", m.issym()), ("file", m.isreg()))
    return next((kind for kind, hit in kinds if hit), "unknown"), rel


def remove(path: str) -> None:
    """Delete a file, link or whole folder without following links (folders may be read-only)."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    if st.st_mode & 0o700 != 0o700:
        os.chmod(path, stat.S_IMODE(st.st_mode) | 0o700)
    for name in os.listdir(path):
        remove(os.path.join(path, name))
    os.rmdir(path)


class Applier:
    """Applies one layer; folder modes are set at the end, so read-only folders can be filled."""

    def __init__(self, root: str, tar: tarfile.TarFile):
        self.root, self.tar = root, tar
        self.pending: dict[str, tuple[int, float | None]] = {}

    def writable(self, folder: str) -> None:
        mode = stat.S_IMODE(os.lstat(folder).st_mode)
        if mode & 0o700 != 0o700:
            self.pending.setdefault(folder, (mode, None))
            os.chmod(folder, mode | 0o700)

    def parent(self, rel: str, member: str, create: bool) -> str | None:
        """The real folder holding rel; refuses a path through a symlink or a non-folder."""
        cur = self.root
        for part in rel.split("/")[:-1]:
            nxt = os.path.join(cur, part)
            try:
                st = os.lstat(nxt)
            except FileNotFoundError:
                if not create:
                    return None
                self.writable(cur)
                os.mkdir(nxt, 0o755)
                cur = nxt
                continue
            shown = os.path.relpath(nxt, self.root)
            if stat.S_ISLNK(st.st_mode):
                raise Refused(member, f"parent {shown} is a symlink")
            if not stat.S_ISDIR(st.st_mode):
                raise Refused(member, f"parent {shown} is not a directory")
            cur = nxt
        return cur

    def whiteout(self, kind: str, rel: str, member: str) -> None:
        folder = self.parent(rel, member, create=False)
        target = os.path.join(self.root, rel)
        if folder is None or not os.path.lexists(target):
            return
        if kind == "opaque":  # a symlink or file here is replaced by this layer's folder, not emptied
            if os.path.isdir(target) and not os.path.islink(target):
                self.writable(target)
                for name in os.listdir(target):
                    remove(os.path.join(target, name))
        else:
            self.writable(folder)
            remove(target)

    def entry(self, kind: str, rel: str, m: tarfile.TarInfo) -> None:
        folder = self.parent(rel, m.name, create=True)
        self.writable(folder)
        path = os.path.join(self.root, rel)
        if os.path.lexists(path) and not (kind == "dir" and os.path.isdir(path) and not os.path.islink(path)):
            remove(path)
        mode = m.mode & 0o1777  # setuid/setgid dropped
        if kind == "dir":
            if not os.path.lexists(path):
                os.mkdir(path, 0o700)
            self.writable(path)
            self.pending[path] = (mode, m.mtime)
        elif kind == "file":
            self.write_file(path, m, mode)
        elif kind == "symlink":
            os.symlink(m.linkname, path)
            if os.utime in os.supports_follow_symlinks:
                os.utime(path, (m.mtime, m.mtime), follow_symlinks=False)
        else:
            self.hardlink(path, m)

    def write_file(self, path: str, m: tarfile.TarInfo, mode: int) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        src = self.tar.extractfile(m)
        with os.fdopen(os.open(path, flags, 0o600), "wb") as out:
            while src is not None:
                chunk = src.read(1 << 20)
                if not chunk:
                    break
                out.write(chunk)
        os.chmod(path, mode)
        os.utime(path, (m.mtime, m.mtime))

    def hardlink(self, path: str, m: tarfile.TarInfo) -> None:
        target_rel = normalise(m.linkname, m.name)
        folder = self.parent(target_rel, m.name, create=False)
        target = os.path.join(self.root, target_rel)
        if folder is None or not os.path.lexists(target):
            raise Refused(m.name, f"hard link target {m.linkname} is missing")
        if os.path.isdir(target) and not os.path.islink(target):
            raise Refused(m.name, f"hard link target {m.linkname} is a directory")
        os.link(target, path, follow_symlinks=False)  # a symlink target is linked, not followed

    def finish(self) -> None:
        for path in sorted(self.pending, key=lambda p: p.count(os.sep), reverse=True):
            if os.path.isdir(path) and not os.path.islink(path):
                mode, mtime = self.pending[path]
                os.chmod(path, mode)
                if mtime is not None:
                    os.utime(path, (mtime, mtime))


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def skipped_as(kind: str, m: tarfile.TarInfo, skipped: list) -> str | None:
    """Why this entry is skipped: a device, an unknown type, or a hard link to a skipped device."""
    if kind in ("device", "unknown"):
        return kind
    if kind == "hardlink" and posixpath.normpath(m.linkname) in {
        posixpath.normpath(s["member"]) for s in skipped
    }:
        return "device"
    return None


def apply_layer(root: str, layer: str, skipped: list, digest: str | None = None) -> dict:
    """Apply one layer tar; whiteouts first, then entries in tar order. digest, when the caller
    knows it (a cache file named by its verified digest), saves hashing the tar again."""
    report = {"path": layer, "sha256": digest or sha256_of(layer), "members": 0, "whiteouts": 0}
    with tarfile.open(layer, "r:") as tar:
        members = [(m,) + classify(m) for m in tar.getmembers()]  # every path checked before any write
        applier = Applier(root, tar)
        for m, kind, rel in members:
            if kind in ("opaque", "whiteout"):
                applier.whiteout(kind, rel, m.name)
                report["whiteouts"] += 1
        for m, kind, rel in members:
            why = skipped_as(kind, m, skipped)
            if why:
                skipped.append({"layer": layer, "member": m.name, "type": why})
                print(f"note: {layer}: member {m.name}: skipped ({why})", file=sys.stderr)
            elif kind in ("dir", "file", "symlink", "hardlink"):
                applier.entry(kind, rel, m)
                report["members"] += 1
        applier.finish()
    return report


def write_marker(root: str, digests: list) -> None:
    tmp = os.path.join(root, MARKER + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"layers": digests}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, MARKER))


def unpack(root: str, layers: list, digests: list | None = None) -> dict:
    os.makedirs(root, exist_ok=True)
    root = os.path.realpath(root)
    for name in (MARKER, MARKER + ".tmp"):
        if os.path.lexists(os.path.join(root, name)):
            remove(os.path.join(root, name))
    reports, skipped = [], []
    for index, layer in enumerate(layers):
        try:
            reports.append(apply_layer(root, layer, skipped, digests[index] if digests else None))
        except (Refused, OSError, tarfile.TarError) as e:
            e.layer = layer
            raise
    write_marker(root, [r["sha256"] for r in reports])
    return {"rootfs": root, "layers": reports, "skipped": skipped}


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unpack_layers.py", description=__doc__.split("\n")[0])
    parser.add_argument("--rootfs", required=True, help="target folder, created if missing")
    parser.add_argument("--layer", action="append", required=True, help="uncompressed layer tar, in order")
    parser.add_argument("--digest", action="append", help="each layer's known sha256 hex, in order")
    parser.add_argument("--json", action="store_true", help="print a JSON report on stdout")
    args = parser.parse_args(argv)
    if args.digest and len(args.digest) != len(args.layer):
        parser.error("give one --digest per --layer, or none")
    try:
        result = unpack(args.rootfs, args.layer, args.digest)
    except Refused as e:
        print(f"error: {getattr(e, 'layer', '?')}: {e}", file=sys.stderr)
        return 2
    except (OSError, tarfile.TarError) as e:
        print(f"error: {getattr(e, 'layer', args.rootfs)}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
    else:
        for r in result["layers"]:
            print(f"{r['path']}: {r['members']} members, {r['whiteouts']} whiteouts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
