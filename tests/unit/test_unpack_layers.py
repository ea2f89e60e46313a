"""The standalone layer unpacker the rootfs runtime sends to Docker-less hosts, run as a subprocess.

UNPACK_PYTHON picks the interpreter that runs the script (default: this one), so the same tests can
check the oldest python3 the remote hosts may have, e.g. UNPACK_PYTHON=python3.8.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

SCRIPT = Path(__file__).parents[2] / "runner" / "remote_scripts" / "unpack_layers.py"
PYTHON = os.environ.get("UNPACK_PYTHON", sys.executable)
MTIME = 1_600_000_000


def member(name, kind=tarfile.REGTYPE, data=b"", mode=0o644, link=""):
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime, info.linkname = kind, mode, MTIME, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def f(name, data=b"x", mode=0o644):
    return member(name, data=data, mode=mode)


def d(name, mode=0o755):
    return member(name, tarfile.DIRTYPE, mode=mode)


def sym(name, target):
    return member(name, tarfile.SYMTYPE, mode=0o777, link=target)


def hard(name, target):
    return member(name, tarfile.LNKTYPE, link=target)


def layer(tmp_path, name, *members):
    path = tmp_path / f"{name}.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def unpack(rootfs, *layers, stdin_script=False):
    args = ["--rootfs", str(rootfs), "--json"]
    for path in layers:
        args += ["--layer", str(path)]
    if stdin_script:  # the way the controller runs it over SSH: python3 - ARGS < script
        cmd, script = [PYTHON, "-", *args], SCRIPT.read_bytes()
        proc = subprocess.run(cmd, input=script, capture_output=True, timeout=60)
        return subprocess.CompletedProcess(cmd, proc.returncode, proc.stdout.decode(), proc.stderr.decode())
    return subprocess.run([PYTHON, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def report(proc):
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def rootfs(tmp_path):
    return tmp_path / "rootfs"


@pytest.fixture
def outside(tmp_path):
    """A folder beside the rootfs with a sentinel file no layer may touch."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "sentinel").write_text("original")
    return folder


def test_files_dirs_symlinks_and_hard_links_land_right(tmp_path, rootfs):
    l1 = layer(
        tmp_path,
        "l1",
        d("etc", 0o750),
        f("etc/hello", b"hi\n", 0o640),
        sym("etc/rel", "hello"),
        sym("abs", "/etc/hello"),
        hard("etc/hard", "etc/hello"),
        f("deep/er/file", b"parents made"),
    )
    out = report(unpack(rootfs, l1))
    hello = rootfs / "etc" / "hello"
    assert hello.read_bytes() == b"hi\n" and stat.S_IMODE(hello.stat().st_mode) == 0o640
    assert hello.stat().st_mtime == MTIME
    assert (
        stat.S_IMODE((rootfs / "etc").stat().st_mode) == 0o750 and (rootfs / "etc").stat().st_mtime == MTIME
    )
    assert os.readlink(rootfs / "etc" / "rel") == "hello" and os.readlink(rootfs / "abs") == "/etc/hello"
    assert (rootfs / "etc" / "hard").stat().st_ino == hello.stat().st_ino
    assert (rootfs / "deep" / "er" / "file").read_bytes() == b"parents made"
    assert out["rootfs"] == str(rootfs.resolve()) and out["skipped"] == []
    assert out["layers"] == [{"path": str(l1), "sha256": sha256(l1), "members": 6, "whiteouts": 0}]


def test_runs_from_stdin_like_over_ssh(tmp_path, rootfs):
    proc = unpack(rootfs, layer(tmp_path, "l1", f("a", b"via stdin")), stdin_script=True)
    assert report(proc)["layers"][0]["members"] == 1 and (rootfs / "a").read_bytes() == b"via stdin"


def test_whiteout_removes_a_file_and_a_folder_of_a_lower_layer(tmp_path, rootfs):
    l1 = layer(tmp_path, "l1", d("a"), f("a/keep"), f("a/gone"), d("b"), d("b/x"), f("b/x/y"))
    l2 = layer(tmp_path, "l2", d("a"), f("a/.wh.gone"), f(".wh.b"))
    out = report(unpack(rootfs, l1, l2))
    assert sorted(p.name for p in rootfs.iterdir()) == [".runner-unpacked.json", "a"]
    assert sorted(p.name for p in (rootfs / "a").iterdir()) == ["keep"]
    assert out["layers"][1]["whiteouts"] == 2 and out["layers"][1]["members"] == 1


def test_opaque_folder_drops_lower_content_but_keeps_this_layers_even_when_listed_first(tmp_path, rootfs):
    l1 = layer(tmp_path, "l1", d("d"), f("d/old"), d("d/sub"), f("d/sub/old2"), f("other"))
    l2 = layer(tmp_path, "l2", d("d"), f("d/new", b"new"), d("d/sub2"), f("d/.wh..wh..opq"))
    report(unpack(rootfs, l1, l2))
    assert sorted(p.name for p in (rootfs / "d").iterdir()) == ["new", "sub2"]
    assert (rootfs / "other").exists()


def test_whiteout_of_a_path_this_layer_recreates_keeps_the_new_entry(tmp_path, rootfs):
    l1 = layer(tmp_path, "l1", f("x", b"old"))
    l2 = layer(tmp_path, "l2", f("x", b"new"), f(".wh.x"))
    report(unpack(rootfs, l1, l2))
    assert (rootfs / "x").read_bytes() == b"new"


def test_entries_replace_lower_ones_of_another_type_without_following_links(tmp_path, rootfs, outside):
    l1 = layer(
        tmp_path, "l1", d("x"), f("x/inner"), sym("link", str(outside / "sentinel")), sym("l", str(outside))
    )
    l2 = layer(
        tmp_path, "l2", f("x", b"file now"), f("link", b"replaced"), d("l"), f("l/sentinel", b"inside")
    )
    report(unpack(rootfs, l1, l2))
    assert (rootfs / "x").read_bytes() == b"file now"
    assert not (rootfs / "link").is_symlink() and (rootfs / "link").read_bytes() == b"replaced"
    assert not (rootfs / "l").is_symlink() and (rootfs / "l" / "sentinel").read_bytes() == b"inside"
    assert sorted(p.name for p in outside.iterdir()) == ["sentinel"]
    assert (outside / "sentinel").read_text() == "original"


OUTSIDE = "@outside@"  # replaced by the outside folder's absolute path
EVIL = [sym("evil", OUTSIDE)]
ESCAPES = {
    "absolute": ([[f("/etc/evil")]], "/etc/evil", "absolute path"),
    "dotdot": ([[f("a/../../outside/sentinel")]], "a/../../outside/sentinel", "escapes"),
    "write through symlink": ([EVIL, [f("evil/sentinel", b"pwned")]], "evil/sentinel", "symlink"),
    "new file through symlink": ([EVIL, [f("evil/new")]], "evil/new", "symlink"),
    "whiteout through symlink": ([EVIL, [f("evil/.wh.sentinel")]], "evil/.wh.sentinel", "symlink"),
    "opaque below symlink": ([EVIL, [f("evil/sub/.wh..wh..opq")]], "evil/sub/.wh..wh..opq", "symlink"),
    "hard link out": (
        [[hard("stolen", "../outside/sentinel")]],
        "stolen",
        "target ../outside/sentinel: path escapes",
    ),
    "hard link absolute": ([[hard("stolen", "/etc/passwd")]], "stolen", "absolute path"),
    "hard link via symlink": ([EVIL, [hard("stolen", "evil/sentinel")]], "stolen", "symlink"),
}


@pytest.mark.security
@pytest.mark.parametrize("case", list(ESCAPES))
def test_escapes_are_refused_naming_the_member_and_nothing_leaves_the_rootfs(tmp_path, rootfs, outside, case):
    layers_members, name, reason = ESCAPES[case]
    for info, _ in EVIL:
        info.linkname = str(outside)
    layers = [layer(tmp_path, f"l{i}", *ms) for i, ms in enumerate(layers_members)]
    proc = unpack(rootfs, *layers)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert (
        len(lines) == 1
        and lines[0].startswith(f"error: {layers[-1]}: member {name}: ")
        and reason in lines[0]
    )
    assert sorted(p.name for p in outside.iterdir()) == ["sentinel"]
    assert (outside / "sentinel").read_text() == "original"
    assert not (tmp_path / "etc").exists() and not (rootfs / ".runner-unpacked.json").exists()


@pytest.mark.parametrize("with_dir", [False, True])
def test_opaque_marker_on_a_symlink_never_empties_its_target(tmp_path, rootfs, outside, with_dir):
    # overlayfs marks a folder that replaced a lower symlink opaque: that layer must apply, the link's
    # target must stay untouched
    l1 = layer(tmp_path, "l1", sym("evil", str(outside)))
    l2 = layer(tmp_path, "l2", *([d("evil"), f("evil/new")] if with_dir else []), f("evil/.wh..wh..opq"))
    report(unpack(rootfs, l1, l2))
    assert (outside / "sentinel").read_text() == "original"
    assert (rootfs / "evil").is_symlink() != with_dir


def test_hard_link_to_a_symlink_links_the_symlink_not_its_target(tmp_path, rootfs, outside):
    l1 = layer(tmp_path, "l1", sym("s", str(outside / "sentinel")))
    l2 = layer(tmp_path, "l2", hard("h", "s"))
    report(unpack(rootfs, l1, l2))
    assert (rootfs / "h").is_symlink() and os.readlink(rootfs / "h") == str(outside / "sentinel")
    assert (outside / "sentinel").stat().st_nlink == 1


def test_hard_link_to_a_missing_target_is_refused(tmp_path, rootfs):
    proc = unpack(rootfs, layer(tmp_path, "l1", hard("h", "nowhere")))
    assert proc.returncode == 2 and "member h: hard link target nowhere is missing" in proc.stderr


def test_a_refused_layer_writes_nothing_of_itself(tmp_path, rootfs):
    bad = layer(tmp_path, "bad", f("early", b"first"), f("/abs"))
    assert unpack(rootfs, bad).returncode == 2
    assert not (rootfs / "early").exists()


def test_setuid_and_setgid_are_dropped_sticky_kept(tmp_path, rootfs):
    l1 = layer(tmp_path, "l1", f("su", mode=0o4755), f("sg", mode=0o2711), d("tmp", 0o1777), d("g", 0o2775))
    report(unpack(rootfs, l1))
    modes = {n: stat.S_IMODE((rootfs / n).stat().st_mode) for n in ("su", "sg", "tmp", "g")}
    assert modes == {"su": 0o755, "sg": 0o711, "tmp": 0o1777, "g": 0o775}


def test_read_only_lower_folders_still_take_upper_entries(tmp_path, rootfs):
    l1 = layer(tmp_path, "l1", d("ro", 0o555), f("ro/old"), d("ro/sub", 0o500), f("ro/sub/x"))
    l2 = layer(tmp_path, "l2", f("ro/new"), f("ro/.wh.old"), f("ro/.wh.sub"))
    report(unpack(rootfs, l1, l2))
    assert sorted(p.name for p in (rootfs / "ro").iterdir()) == ["new"]
    assert stat.S_IMODE((rootfs / "ro").stat().st_mode) == 0o555


def test_marker_only_after_success_and_gone_after_a_refused_layer(tmp_path, rootfs):
    l1 = layer(tmp_path, "l1", f("a"))
    l2 = layer(tmp_path, "l2", f("b"))
    report(unpack(rootfs, l1, l2))
    marker = rootfs / ".runner-unpacked.json"
    assert json.loads(marker.read_text()) == {"layers": [sha256(l1), sha256(l2)]}
    assert not (rootfs / ".runner-unpacked.json.tmp").exists()
    bad = layer(tmp_path, "bad", f("../escape"))
    assert unpack(rootfs, l1, bad).returncode == 2
    assert not marker.exists() and (rootfs / "a").exists()


def test_a_layer_cannot_plant_the_marker(tmp_path, rootfs):
    proc = unpack(rootfs, layer(tmp_path, "l1", f(".runner-unpacked.json", b'{"layers": []}')))
    assert proc.returncode == 2 and "reserved name" in proc.stderr
    assert not (rootfs / ".runner-unpacked.json").exists()


def test_devices_and_fifos_are_skipped_and_reported(tmp_path, rootfs):
    l1 = layer(
        tmp_path,
        "l1",
        d("dev"),
        member("dev/null", tarfile.CHRTYPE, mode=0o666),
        member("dev/sda", tarfile.BLKTYPE),
        member("dev/pipe", tarfile.FIFOTYPE),
        hard("dev/null2", "dev/null"),
    )
    out = report(unpack(rootfs, l1))
    assert [(s["member"], s["type"]) for s in out["skipped"]] == [
        ("dev/null", "device"),
        ("dev/sda", "device"),
        ("dev/pipe", "device"),
        ("dev/null2", "device"),
    ]
    assert out["skipped"][0]["layer"] == str(l1) and list((rootfs / "dev").iterdir()) == []
    assert out["layers"][0]["members"] == 1


def test_unreadable_layer_fails_with_status_1(tmp_path, rootfs):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar" * 100)
    proc = unpack(rootfs, junk)
    assert proc.returncode == 1 and proc.stderr.startswith(f"error: {junk}: ")


def test_script_is_standalone_for_python_3_8():
    source = SCRIPT.read_text(encoding="utf-8")
    tree = ast.parse(source, feature_version=(3, 8))
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported


def test_known_digests_go_to_the_marker_unhashed_and_must_match_the_layer_count(tmp_path, rootfs):
    first, second = layer(tmp_path, "one", f("a")), layer(tmp_path, "two", f("b"))
    known = ["1" * 64, "2" * 64]
    args = ["--rootfs", str(rootfs), "--json", "--layer", str(first), "--digest", known[0]]
    done = subprocess.run(
        [PYTHON, str(SCRIPT), *args, "--layer", str(second), "--digest", known[1]],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert [r["sha256"] for r in report(done)["layers"]] == known
    assert json.loads((rootfs / ".runner-unpacked.json").read_text()) == {"layers": known}
    argv = [PYTHON, str(SCRIPT), *args, "--layer", str(second)]
    short = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert short.returncode == 2 and "give one --digest per --layer" in short.stderr
