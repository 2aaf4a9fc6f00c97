"""guest-image/buildcache.py: the builders' cache stays bounded. A new build keeps itself and
the newest other one; older builds and the work directories of killed builds go; nothing that is
not a build (the downloaded .debs, the lock) is touched. A build is published by a rename onto a
name nothing holds: a published build is never overwritten, a forced rebuild goes beside it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "guest-image"))

import buildcache  # noqa: E402
from buildcache import prune  # noqa: E402


def test_a_new_build_keeps_itself_and_the_newest_other_and_sweeps_killed_work(tmp_path):
    for i, key in enumerate(("aaaaaaaaaaaa", "bbbbbbbbbbbb", "cccccccccccc", "dddddddddddd")):
        d = tmp_path / key
        d.mkdir()
        (d / "disk.qcow2").write_bytes(b"x")
        os.utime(d, (1000 + i, 1000 + i))
    (tmp_path / "debs").mkdir()
    (tmp_path / ".lock").write_text("")
    (tmp_path / ".work-eeeeeeeeeeee-x1").mkdir()
    said = []
    removed = prune(tmp_path, tmp_path / "aaaaaaaaaaaa", said.append)   # the oldest mtime
    assert sorted(removed) == [".work-eeeeeeeeeeee-x1", "bbbbbbbbbbbb", "cccccccccccc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".lock", "aaaaaaaaaaaa", "dddddddddddd", "debs"]
    assert any("superseded build bbbbbbbbbbbb" in s for s in said)
    # nothing more to do the second time
    assert prune(tmp_path, tmp_path / "aaaaaaaaaaaa", said.append) == []


KEY = "0123456789ab"


def _files(make_calls: list, content: bytes):
    def make(work: Path, result: Path) -> None:
        make_calls.append(work)
        assert work.parent.name != "out" and result == work / "out" and not any(result.iterdir())
        (work / "scratch").write_bytes(b"scratch")
        (result / "disk.qcow2").write_bytes(content)
        (result / "manifest.json").write_text("{}\n")
    return make


def test_rename_noreplace_never_replaces_a_file_or_a_directory_even_an_empty_one(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("new")
    empty = tmp_path / "empty"          # plain rename(2) would replace an empty directory
    empty.mkdir()
    full = tmp_path / "full"
    full.mkdir()
    (full / "f").write_text("old")
    for dst in (empty, full):
        with pytest.raises(FileExistsError):
            buildcache.rename_noreplace(src, dst)
    assert (full / "f").read_text() == "old" and not any(empty.iterdir())
    buildcache.rename_noreplace(src, tmp_path / "free")
    assert (tmp_path / "free" / "f").read_text() == "new" and not src.exists()


def test_a_build_is_made_in_a_work_directory_published_complete_and_then_reused(tmp_path):
    calls, said = [], []
    out = buildcache.cached_build(tmp_path, KEY, _files(calls, b"v1"), said.append)
    assert out == tmp_path / KEY
    assert sorted(p.name for p in out.iterdir()) == [".complete", "disk.qcow2", "manifest.json"]
    assert (out / ".complete").read_text() == KEY + "\n"
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in out.iterdir())
    assert not calls[0].exists()                                  # the work directory went
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", KEY]
    assert buildcache.cached_build(tmp_path, KEY, _files(calls, b"v2"), said.append) == out
    assert len(calls) == 1 and (out / "disk.qcow2").read_bytes() == b"v1"
    assert any(s.startswith(f"reusing {out}") for s in said)


def test_a_forced_rebuild_goes_beside_the_published_build_which_it_never_touches(tmp_path):
    calls, said = [], []
    first = buildcache.cached_build(tmp_path, KEY, _files(calls, b"v1"), said.append)
    disk = first / "disk.qcow2"
    with open(disk, "rb") as reader:                 # an image install reading it meanwhile
        before = os.fstat(reader.fileno())
        second = buildcache.cached_build(tmp_path, KEY, _files(calls, b"v2"), said.append,
                                         force=True)
        assert second == tmp_path / f"{KEY}-2"
        assert reader.read() == b"v1"
    after = os.stat(disk)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert disk.read_bytes() == b"v1" and (second / "disk.qcow2").read_bytes() == b"v2"
    # the newest complete build of the key is the one reused; a third forced one is -3
    assert buildcache.cached_build(tmp_path, KEY, _files(calls, b"v3"), said.append) == second
    third = buildcache.cached_build(tmp_path, KEY, _files(calls, b"v3"), said.append, force=True)
    assert third == tmp_path / f"{KEY}-3" and len(calls) == 3
    # pruned as builds: the newest two stay
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        f"{KEY}-2", f"{KEY}-3"]


def test_an_incomplete_directory_of_the_key_is_never_reused_nor_overwritten(tmp_path):
    left = tmp_path / KEY                   # e.g. a directory without .complete
    left.mkdir()
    (left / "disk.qcow2").write_bytes(b"half")
    calls = []
    out = buildcache.cached_build(tmp_path, KEY, _files(calls, b"v1"), lambda _: None)
    assert out == tmp_path / f"{KEY}-2" and (out / "disk.qcow2").read_bytes() == b"v1"
    assert buildcache.latest(tmp_path, KEY) == out


def test_a_failed_build_publishes_nothing_and_leaves_no_work_directory(tmp_path):
    def make(work: Path, result: Path) -> None:
        (result / "disk.qcow2").write_bytes(b"partial")
        raise RuntimeError("mke2fs failed")
    with pytest.raises(RuntimeError):
        buildcache.cached_build(tmp_path, KEY, make, lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]
    assert buildcache.latest(tmp_path, KEY) is None


def test_revisions_are_the_keys_own_directories_only(tmp_path):
    for name in (KEY, f"{KEY}-2", f"{KEY}-10", f"{KEY}-x", f"{KEY}-1", f"{KEY}-0",
                 "ba9876543210", f".work-{KEY}-abc"):
        (tmp_path / name).mkdir()
    assert [(r, p.name) for r, p in buildcache.revisions(tmp_path, KEY)] == [
        (1, KEY), (2, f"{KEY}-2"), (10, f"{KEY}-10")]
