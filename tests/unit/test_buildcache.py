"""guest-image/buildcache.py: the builders' cache stays bounded. A new build keeps itself and
the newest other one; older builds and the work directories of killed builds go; nothing that is
not a build (the downloaded .debs, the lock) is touched."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "guest-image"))

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
