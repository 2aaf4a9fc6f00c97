"""The work dir share against root in the guest, for real: one VM of the test guest with its
work dir shared, root in the guest reached through the QEMU guest agent (qemu-ga runs as root),
the guest's user through ssh. Every probe is an attack a job's user with sudo in their VM could
make; each must fail, and the host must show nothing the job's user could not have made.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness.guest_agent import domain, guest_exec
from slurm_dgxvm.shares import virtiofsd as share_server

from test_vm_lifecycle import assert_nothing_left, ssh

pytestmark = pytest.mark.integration

SECRET = "only root on the host may read this\n"


@pytest.fixture(scope="module")
def vm(vmenv):
    wd = vmenv.workdir / "share probe"
    wd.mkdir()
    os.chown(wd, vmenv.uid, vmenv.gid)
    (wd / "secret").write_text(SECRET)
    (wd / "secret").chmod(0o600)                       # root's, on the host
    (wd / "mine").write_text("the user's\n")
    os.chown(wd / "mine", vmenv.uid, vmenv.gid)
    r = vmenv.dgxvm("create", "--gpu-count", "1", "--domain", "shr", "--user", vmenv.user,
                    "--workdir", str(wd))
    assert r.returncode == 0, r.stderr
    conn, dom = domain(vmenv.uri, "shr")
    try:
        yield SimpleNamespace(wd=wd, dom=dom, env=vmenv)
    finally:
        conn.close()
        r = vmenv.dgxvm("delete", "--domain", "shr")
        assert r.returncode == 0, r.stderr
        assert_nothing_left(vmenv, ["shr"])
        assert virtiofsd_pids() == [], "the share's virtiofsd outlived its VM"


def as_root(vm, script: str):
    return guest_exec(vm.dom, script.replace("$WD", f"'{vm.wd}'"))


def host_entries(wd: Path) -> dict[str, os.stat_result]:
    return {p.name: p.lstat() for p in wd.iterdir()}


def _listing(d: Path) -> dict[str, tuple]:
    """name -> (mode, owner, size, mtime): what a write would change (not the atime a read
    does)."""
    return {n: (st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns)
            for n, st in host_entries(d).items()}


def virtiofsd_pids() -> list[Path]:
    return [p for p in Path("/proc").iterdir() if p.name.isdigit()
            and _exe(p) == share_server.VIRTIOFSD]


def test_virtiofsd_runs_as_the_jobs_user(vm):
    pids = virtiofsd_pids()
    assert pids, "no virtiofsd running for the VM"
    for p in pids:
        uids = next(line for line in (p / "status").read_text().splitlines()
                    if line.startswith("Uid:")).split()[1:]
        assert uids == [str(vm.env.uid)] * 4, f"virtiofsd {p.name} runs as {uids}"


def _exe(p: Path) -> str | None:
    try:
        return os.readlink(p / "exe")
    except OSError:
        return None


def test_guest_root_cannot_leave_a_setuid_file(vm):
    r = as_root(vm, "cp /bin/busybox $WD/suid; chmod 4755 $WD/suid; chmod 4755 $WD/mine; "
                    "mkdir $WD/sgid; chmod 2775 $WD/sgid")
    assert r.code != 0
    for name, st in host_entries(vm.wd).items():
        assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID), f"{name} is {oct(st.st_mode)}"


def test_guest_root_cannot_make_a_device_node(vm):
    r = as_root(vm, "mknod $WD/dev b 8 0 && echo made; mknod $WD/cdev c 1 3 && echo made")
    assert "made" not in r.out
    for name, st in host_entries(vm.wd).items():
        assert not (stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode)), name


def test_guest_root_cannot_leave_a_root_owned_file(vm):
    as_root(vm, "echo x > $WD/byroot; mkdir $WD/rootdir; ln -s /etc $WD/rootlink; "
                "chown 0:0 $WD/mine")
    for name, st in host_entries(vm.wd).items():
        if name != "secret":                            # the one the host made as root
            assert (st.st_uid, st.st_gid) == (vm.env.uid, vm.env.gid), (name, st.st_uid)


def test_guest_root_cannot_read_what_the_user_cannot(vm):
    r = as_root(vm, "cat $WD/secret")
    assert r.code != 0 and "only root" not in r.out
    r = as_root(vm, "dd if=$WD/secret bs=1 count=4 2>&1; ls -la $WD/..")
    assert "only" not in r.out


def test_the_users_files_are_the_users_and_setid_bits_are_refused(vm):
    out = ssh(vm.env, "shr", f"cd '{vm.wd}' && echo hi > made-in-guest && "
                             f"chmod 4755 made-in-guest; echo chmod=$?; cat mine")
    assert out.returncode == 0, out.stderr
    assert "chmod=1" in out.stdout and "the user's" in out.stdout
    st = (vm.wd / "made-in-guest").stat()
    assert (st.st_uid, st.st_gid) == (vm.env.uid, vm.env.gid)
    assert not st.st_mode & stat.S_ISUID
    assert (vm.wd / "made-in-guest").read_text() == "hi\n"


def test_guest_root_cannot_write_the_image_cache_even_remounted_read_write(vm):
    """The cache is read-only on the host's side (shares.readonly): what the guest's mount
    option says does not matter, so guest root cannot fill the state filesystem through it."""
    cache = vm.env.containers / str(vm.env.uid)
    (cache / "pulled").write_text("an image the user pulled\n")
    os.chown(cache / "pulled", vm.env.uid, vm.env.gid)
    before = _listing(cache)
    c = f"'{cache}'"
    r = as_root(vm, f"grep ' {cache} ' /proc/mounts; mount -o remount,rw {c}; "
                    f"echo remount=$?; echo x > {c}/by-guest-root; echo write=$?; "
                    f"dd if=/dev/zero of={c}/fill bs=1M count=4; echo fill=$?; "
                    f"echo more >> {c}/pulled; echo append=$?; rm {c}/pulled; echo rm=$?; "
                    f"cat {c}/pulled")
    assert "virtiofs" in r.out, r.out                    # it is the share, mounted
    for step in ("write", "fill", "append", "rm"):
        assert f"{step}=0" not in r.out, r.out
    assert "an image the user pulled" in r.out           # and still readable
    out = ssh(vm.env, "shr", f"touch {c}/by-user; echo touch=$?")
    assert "touch=0" not in out.stdout, out.stdout
    assert _listing(cache) == before
    assert (cache / "pulled").read_text() == "an image the user pulled\n"


def test_a_work_dir_outside_the_share_roots_is_refused_before_anything_is_taken(vmenv):
    for bad in ("/etc", "/", "/root"):
        r = vmenv.dgxvm("create", "--gpu-count", "1", "--domain", "shrbad", "--user",
                        vmenv.user, "--workdir", bad)
        assert r.returncode == 2, r.stderr
        assert f"work dir {bad!r} is not shared into the VM" in r.stderr
        assert not (vmenv.state_dir / "vms" / "shrbad").exists()
    link = vmenv.workdir / "to-etc"
    link.symlink_to("/etc")
    try:
        r = vmenv.dgxvm("create", "--gpu-count", "1", "--domain", "shrbad", "--user",
                        vmenv.user, "--workdir", str(link))
        assert r.returncode == 2 and "is a symbolic link" in r.stderr, r.stderr
    finally:
        link.unlink()
    from slurm_dgxvm.ledger import Ledger
    assert "domain:shrbad" not in Ledger(vmenv.state_dir).read().allocations
