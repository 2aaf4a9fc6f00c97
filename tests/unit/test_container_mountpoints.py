"""containers.mountpoints: mount points made in a cached rootfs on the host never leave it,
whatever symlinks the image holds (the image is anyone's, the cache is its user's)."""

from __future__ import annotations

import os

import pytest

from slurm_dgxvm.containers import mountpoints
from slurm_dgxvm.errors import BadInput


def test_standard_points_and_the_work_dir_are_made(tmp_path):
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    made = mountpoints.ensure(rootfs, [*mountpoints.STANDARD_DIRS, "/home/u/run"],
                              mountpoints.STANDARD_FILES)
    for d in (*mountpoints.STANDARD_DIRS, "/home/u/run"):
        assert (rootfs / d.lstrip("/")).is_dir()
    assert made == list(mountpoints.STANDARD_FILES)
    assert (rootfs / "etc/hosts").is_file()


def test_tmp_and_var_tmp_made_here_are_world_writable_and_sticky(tmp_path):
    """runc keeps a tmpfs mount point's mode: these must be 1777 for the user to write there;
    ones the image has keep the image's mode, and nothing else is made writable."""
    rootfs = tmp_path / "rootfs"
    (rootfs / "var").mkdir(parents=True)
    os.chmod(rootfs / "var", 0o755)
    old = os.umask(0o022)
    try:
        mountpoints.ensure(rootfs, mountpoints.STANDARD_DIRS)
    finally:
        os.umask(old)
    modes = {d: (rootfs / d.lstrip("/")).stat().st_mode & 0o7777
             for d in mountpoints.STANDARD_DIRS}
    assert modes["/tmp"] == modes["/var/tmp"] == 0o1777, modes
    assert {m for d, m in modes.items() if d not in ("/tmp", "/var/tmp")} == {0o755}, modes
    assert (rootfs / "var").stat().st_mode & 0o7777 == 0o755
    other = tmp_path / "other"
    (other / "tmp").mkdir(parents=True)
    os.chmod(other / "tmp", 0o700)                       # the image's own choice stands
    mountpoints.ensure(other, ["/tmp"])
    assert (other / "tmp").stat().st_mode & 0o7777 == 0o700


def test_a_symlink_in_the_image_never_sends_a_mkdir_outside(tmp_path):
    rootfs, outside = tmp_path / "rootfs", tmp_path / "outside"
    rootfs.mkdir()
    outside.mkdir()
    os.symlink(outside, rootfs / "home")                 # absolute: the host's directory
    os.symlink("../../outside", rootfs / "var")          # relative, climbing out
    for target in ("/home/u/run", "/var/tmp"):
        with pytest.raises(BadInput) as e:
            mountpoints.ensure(rootfs, [target])
        assert target in str(e.value)
    assert list(outside.iterdir()) == []


def test_an_etc_file_the_image_has_as_a_symlink_is_left_and_not_bound(tmp_path):
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    secret = tmp_path / "secret"
    os.symlink(secret, rootfs / "etc" / "resolv.conf")
    made = mountpoints.ensure(rootfs, [], mountpoints.STANDARD_FILES)
    assert made == ["/etc/hosts"]
    assert not secret.exists()


@pytest.mark.parametrize("bad", ["relative/x", "/a/../b", "/a/./b"])
def test_paths_that_are_not_normalised_are_refused(tmp_path, bad):
    with pytest.raises(BadInput):
        mountpoints.ensure(tmp_path, [bad])
