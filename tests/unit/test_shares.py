"""The work dir share, proven with the real kernel mechanisms (no VM): the share policy opens
directories as the job's user, the seccomp filter refuses setuid/setgid bits, the user namespace
holds only the user's ids, and the real virtiofsd starts under all of it as the user."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_dgxvm.errors import ShareRefused
from slurm_dgxvm.shares import policy, seccomp, userns, virtiofsd
from slurm_dgxvm.shares.policy import ShareSpec

UID, GID, OTHER_GID = 54321, 54322, 54323     # no passwd entry needed: the kernel only sees ids


@pytest.fixture
def base(traversable_tmp):
    return traversable_tmp


def user_dir(path: Path, mode=0o755, uid=UID, gid=GID) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, gid)
    path.chmod(mode)
    return path


def in_child(fn) -> int:
    """Run ``fn`` in a forked child; its return value (a small int) is the exit status."""
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            code = fn()
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


# -- policy: what may be shared -------------------------------------------------------------------
def test_a_users_dir_under_a_root_is_pinned_by_device_and_inode(base):
    wd = user_dir(base / "a b" / "run 'x' $y")
    spec = policy.check(str(wd), [str(base)], UID, GID, [GID])
    st = wd.stat()
    assert (spec.path, spec.dev, spec.ino, spec.uid) == (str(wd), st.st_dev, st.st_ino, UID)
    assert ShareSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize("case, reason", [
    ("outside", "not under vm.share_roots"),
    ("symlink", "is a symbolic link"),
    ("under-symlink", "is a symbolic link"),
    ("missing", "does not exist"),
    ("file", "is not a directory"),
    ("root-only", "cannot read"),
    ("unreachable", "cannot reach"),
])
def test_what_the_user_cannot_reach_is_refused_naming_it(base, case, reason):
    roots = [str(base / "share")]
    user_dir(base / "share")
    (base / "share" / "etc").symlink_to("/etc")
    (base / "share" / "file").write_text("x")
    (base / "share" / "root-only").mkdir(mode=0o700)
    user_dir(base / "share" / "locked" / "inner")
    os.chown(base / "share" / "locked", 0, 0)
    (base / "share" / "locked").chmod(0o700)
    path = {"outside": "/etc", "symlink": f"{base}/share/etc",
            "under-symlink": f"{base}/share/etc/ssh", "missing": f"{base}/share/nope",
            "file": f"{base}/share/file", "root-only": f"{base}/share/root-only",
            "unreachable": f"{base}/share/locked/inner"}[case]
    with pytest.raises(ShareRefused) as err:
        policy.check(path, roots, UID, GID, [GID])
    assert reason in str(err.value) and path in str(err.value)


def test_a_group_project_dir_is_reached_through_the_users_groups(base):
    proj = user_dir(base / "proj", mode=0o770, uid=0, gid=OTHER_GID)
    with pytest.raises(ShareRefused):
        policy.check(str(proj), [str(base)], UID, GID, [GID])
    assert policy.check(str(proj), [str(base)], UID, GID, [GID, OTHER_GID]).ino == proj.stat().st_ino


def test_no_roots_shares_nothing(base):
    with pytest.raises(ShareRefused, match="share_roots is empty"):
        policy.check(str(user_dir(base / "w")), [], UID, GID, [GID])


def test_roots_match_whole_components():
    assert policy.under_roots("/home/alice", ["/home"]) == "/home"
    assert policy.under_roots("/home", ["/home"]) == "/home"
    assert policy.under_roots("/homes/alice", ["/home"]) is None
    assert policy.under_roots("/scratch/x", ["/home", "/scratch"]) == "/scratch"


def test_a_directory_swapped_after_the_check_is_not_served(base):
    wd = user_dir(base / "w")
    spec = policy.check(str(wd), [str(base)], UID, GID, [GID])
    wd.rename(base / "w.old")
    user_dir(base / "w")                      # same path, another directory
    with pytest.raises(ShareRefused, match="no longer the directory"):
        virtiofsd.prepare(spec)
    shutil.rmtree(base / "w")
    (base / "w").symlink_to(base / "w.old")   # the checked one, but through a symlink
    with pytest.raises(ShareRefused, match="symbolic link"):
        virtiofsd.prepare(spec)


# -- seccomp: no setuid/setgid bit ------------------------------------------------------------------
def test_the_filter_refuses_setuid_and_setgid_bits_and_nothing_else(base):
    f = base / "f"
    f.write_text("x")

    def probe() -> int:
        seccomp.install_no_setid()
        results = []
        for mode in (0o755, 0o4755, 0o2755, 0o6755, 0o1777):
            try:
                os.chmod(f, mode)
                results.append(True)
            except PermissionError:
                results.append(False)
        try:
            os.close(os.open(base / "g", os.O_CREAT | os.O_WRONLY, 0o4755))
            results.append(True)
        except PermissionError:
            results.append(False)
        try:
            os.mkdir(base / "d", 0o2755)
            results.append(True)
        except PermissionError:
            results.append(False)
        os.close(os.open(base / "h", os.O_CREAT | os.O_WRONLY, 0o644))
        return 0 if results == [True, False, False, False, True, False, False] else 1
    assert in_child(probe) == 0
    assert f.stat().st_mode & 0o7777 == 0o1777 and (base / "h").exists()
    assert not (base / "g").exists() and not (base / "d").exists()


# -- the user namespace -----------------------------------------------------------------------------
def test_the_namespace_holds_only_the_users_ids(base):
    mine = user_dir(base / "mine")
    theirs = base / "theirs"
    theirs.mkdir(mode=0o700)                  # root's

    def probe() -> int:
        userns.enter(UID, GID, [GID, OTHER_GID], ("setuid", "setgid", "dac_override"))
        status = Path("/proc/self/status").read_text()
        assert f"Uid:\t{UID}\t{UID}\t{UID}" in status
        assert Path("/proc/self/uid_map").read_text().split() == [str(UID), str(UID), "1"]
        try:
            os.setresuid(0, 0, 0)             # root does not exist in here
            return 1
        except OSError:
            pass
        try:                                  # dac_override does not reach root's files
            os.listdir(theirs)
            return 2
        except PermissionError:
            pass
        (mine / "made").write_text("x")
        return 0
    assert in_child(probe) == 0
    st = (mine / "made").stat()
    assert (st.st_uid, st.st_gid) == (UID, GID)


def test_root_is_never_mapped():
    with pytest.raises(ValueError):
        userns.enter(0, 0, [], ())


# -- virtiofsd, started the way libvirt starts it ---------------------------------------------------
def test_libvirts_arguments_are_kept_but_source_and_sandbox(tmp_path):
    args = ["--fd=35", "-o", "source=/home/a,,b,cache=always,sandbox=namespace,xattr",
            "--thread-pool-size=4"]
    out = virtiofsd.rewrite_args(args, "/proc/self/fd/5/")
    assert out[0] == "--fd=35" and out[1] == "-o" and "--thread-pool-size=4" in out
    assert virtiofsd.split_options(out[2]) == ["source=/proc/self/fd/5/", "sandbox=chroot",
                                               virtiofsd.MODCAPS, "cache=always", "xattr"]
    assert out[-1] == "--rlimit-nofile=0"


def test_virtiofsd_runs_as_the_user_confined(base):
    wd = user_dir(base / "work dir")
    vmdir = base / "vm"
    vmdir.mkdir(mode=0o700)
    policy.check(str(wd), [str(base)], UID, GID, [GID]).save(vmdir / "share.json")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(vmdir / "sock"))
    sock.listen(1)
    fd = sock.fileno()
    proc = subprocess.Popen(
        [sys.executable, "-m", "slurm_dgxvm.shares.virtiofsd", str(vmdir / "share.json"),
         f"--fd={fd}", "-o", f"source={wd},xattr"],
        pass_fds=[fd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # exe names virtiofsd as soon as its execve begins; its argv is readable a moment
        # later (an empty cmdline until then, seen under load), so wait for both
        deadline = time.monotonic() + 20
        cmdline = []
        while time.monotonic() < deadline and proc.poll() is None:
            if os.readlink(f"/proc/{proc.pid}/exe") == virtiofsd.VIRTIOFSD:
                cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
                if cmdline[0]:
                    break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()
        status = dict(line.split(":\t", 1)
                      for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                      if ":\t" in line)
        assert status["Uid"].split() == [str(UID)] * 4
        assert status["NoNewPrivs"].strip() == "1" and status["Seccomp"].strip() == "2"
        caps = int(status["CapEff"], 16)
        assert caps == sum(1 << userns.CAPS[c] for c in virtiofsd.KEEP_CAPS)
        assert not caps & (1 << userns.CAPS["sys_admin"]) and not caps & (1 << userns.CAPS["mknod"])
        assert any(a.startswith(b"source=/proc/self/fd/") and b"sandbox=chroot" in a
                   for a in cmdline)
    finally:
        proc.terminate()
        proc.wait(10)
        sock.close()


def test_a_refusal_is_written_for_the_lifecycle(base):
    vmdir = base / "vm"
    vmdir.mkdir(mode=0o700)
    ShareSpec(path=str(base / "gone"), uid=UID, gid=GID, groups=(GID,), dev=1,
              ino=1).save(vmdir / "share.json")
    assert virtiofsd.main([str(vmdir / "share.json"), "--fd=3"]) == 1
    line = (vmdir / virtiofsd.ERROR_FILE).read_text()
    assert line.startswith(virtiofsd.REFUSED_PREFIX) and "does not exist" in line


# -- can this node serve shares? ----------------------------------------------------------------------
def test_share_check_does_the_real_thing_and_names_what_fails(base, tmp_path):
    from slurm_dgxvm.shares.check import findings
    rows = {r.check: r for r in findings(virtiofsd.VIRTIOFSD, [str(base)])}
    assert all(r.ok for r in rows.values()), rows
    assert set(rows) == {"virtiofsd", "user namespaces", "seccomp", "read-only mounts",
                         f"share root {base}"}
    (base / "link").symlink_to(base)
    rows = {r.check: r for r in findings(str(tmp_path / "no-virtiofsd"),
                                         [str(base / "link"), str(base / "gone")])}
    assert not rows["virtiofsd"].ok and "qemu-system-common" in rows["virtiofsd"].detail
    assert not rows[f"share root {base}/link"].ok and not rows[f"share root {base}/gone"].ok
    assert rows["user namespaces"].ok and rows["seccomp"].ok and rows["read-only mounts"].ok


def test_dgxvm_share_check_exits_3_when_the_node_cannot_share(base, tmp_path):
    from click.testing import CliRunner

    from slurm_dgxvm.cli.main import cli
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[vm]\nshare_roots = ["{base}"]\n')
    r = CliRunner().invoke(cli, ["--config", str(cfg), "share", "check"])
    assert r.exit_code == 0 and "ok   user namespaces" in r.output, r.output
    cfg.write_text(f'[vm]\nshare_roots = ["{base}/gone"]\nvirtiofsd = "/nonexistent"\n')
    r = CliRunner().invoke(cli, ["--config", str(cfg), "share", "check"])
    assert r.exit_code == 3
    assert "FAIL virtiofsd: /nonexistent" in r.output and f"FAIL share root {base}/gone" in r.output
