"""The job's shared ssh connection (access.connection) and the teardown that stops its masters
(lifecycle.sshmux): which directory a run trusts for its socket, which processes a delete
stops. The connection itself, over a real master into a real guest, is
tests/integration/test_dgxvm_run.py's."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from slurm_dgxvm.access import connection
from slurm_dgxvm.access.target import Target
from slurm_dgxvm.lifecycle import sshmux


@pytest.fixture
def short(monkeypatch):
    """A socket directory short enough for a unix socket's path (tmp_path is not)."""
    import shutil
    import tempfile
    d = tempfile.mkdtemp(prefix="dgxvm-ut-", dir="/tmp")
    monkeypatch.setattr(connection, "base_dir", lambda: d)
    yield Path(d)
    shutil.rmtree(d)


def target(**kw) -> Target:
    base = dict(job_id=42, domain="job-42", address="10.0.0.2", user="u",
                key="/var/lib/dgxvm/vms/job-42/id_ed25519",
                known_hosts="/var/lib/dgxvm/vms/job-42/known_hosts", state="running",
                workdir=None, gpus=(0,), slurm_gpus=(0,), uid=os.geteuid(), gid=os.getegid())
    return Target(**(base | kw))


def test_the_socket_names_the_job_and_the_vm_under_the_users_own_directory(monkeypatch,
                                                                           tmp_path):
    monkeypatch.setattr("tempfile.gettempdir", lambda: "/tmp")
    path = connection.socket_path(target(), uid=1001)
    assert path.startswith(f"/tmp/dgxvm-1001/{connection.node_tag()}-42-")
    assert path.endswith(".ssh")
    # a VM made again for the job (another address, another key) has another socket
    assert connection.socket_path(target(address="10.0.0.3"), uid=1001) != path
    assert connection.socket_path(target(key="/x/id_ed25519"), uid=1001) != path
    assert connection.socket_path(target(), uid=1002) != path
    # another node of the job, its $TMPDIR the same shared directory
    monkeypatch.setattr(connection.os, "uname", lambda: os.uname_result(
        ("Linux", "dgx02", "6.1", "#1", "x86_64")))
    assert connection.socket_path(target(), uid=1001) != path


def test_a_tmpdir_too_long_for_a_socket_falls_back_to_tmp(monkeypatch):
    monkeypatch.setattr("tempfile.gettempdir", lambda: "/scratch/" + "x" * 60)
    assert connection.base_dir() == "/tmp"
    monkeypatch.setattr("tempfile.gettempdir", lambda: "/scratch/job42")
    assert connection.base_dir() == "/scratch/job42"


def test_the_directory_is_made_private_and_used(tmp_path):
    d = tmp_path / "dgxvm-me"
    assert connection._own_dir(str(d))
    assert (d.stat().st_mode & 0o777) == 0o700


@pytest.mark.parametrize("how", ["open to others", "another owner", "a symlink", "a file"])
def test_a_directory_that_is_not_the_users_alone_is_not_used(tmp_path, how):
    d = tmp_path / "dgxvm-me"
    if how == "open to others":
        d.mkdir()
        d.chmod(0o755)
    elif how == "another owner":
        d.mkdir(mode=0o700)
        os.chown(d, 65534, 65534)
    elif how == "a symlink":
        real = tmp_path / "real"
        real.mkdir(mode=0o700)
        d.symlink_to(real)
    else:
        d.write_text("")
    assert not connection._own_dir(str(d))


def test_root_reaching_another_users_job_shares_no_connection(short, monkeypatch):
    assert connection.shared_socket(target(uid=os.geteuid() + 1)) is None
    assert not any(short.iterdir())              # not even the directory was made


def test_a_socket_that_answers_is_used_without_starting_a_master(short, monkeypatch):
    t = target()
    path = connection.socket_path(t)
    os.makedirs(os.path.dirname(path), mode=0o700)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(4)
    started = []
    monkeypatch.setattr(connection, "_start_master", lambda *a: started.append(a) or True)
    try:
        assert connection.shared_socket(t) == path
    finally:
        listener.close()
    assert started == []


def test_a_stale_socket_is_replaced_by_a_new_master(short, monkeypatch):
    t = target()
    path = connection.socket_path(t)
    os.makedirs(os.path.dirname(path), mode=0o700)
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)                                  # bound, never listening: nobody answers
    dead.close()
    started = []

    def start(_t, p):
        started.append(p)
        assert not os.path.exists(p)                 # the stale one went first
        return True
    monkeypatch.setattr(connection, "_start_master", start)
    assert connection.shared_socket(t) == path
    assert started == [path]


def test_starting_a_master_removes_the_sockets_of_masters_that_are_gone(short, monkeypatch):
    t = target()
    path = connection.socket_path(t)
    d = Path(path).parent
    d.mkdir(mode=0o700)
    node = connection.node_tag()
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(d / f"{node}-41-aaaaaaaaaaaa.ssh"))     # another job's, its master killed
    dead.close()
    alive = socket.socket(socket.AF_UNIX)
    alive.bind(str(d / f"{node}-43-bbbbbbbbbbbb.ssh"))    # another job's, running
    alive.listen(1)
    other = socket.socket(socket.AF_UNIX)
    other.bind(str(d / "ffffff-41-cccccccccccc.ssh"))   # another node's (a shared $TMPDIR)
    other.close()
    (d / f"{node}-notes.ssh").write_text("a file of the user's")
    monkeypatch.setattr(connection, "_start_master", lambda *a: True)
    try:
        assert connection.shared_socket(t) == path
        assert sorted(p.name for p in d.iterdir()) == sorted([
            f"{node}-43-bbbbbbbbbbbb.ssh", "ffffff-41-cccccccccccc.ssh", f"{node}-notes.ssh"])
    finally:
        alive.close()


def test_something_else_at_the_socket_path_means_no_shared_connection(short, monkeypatch):
    t = target()
    path = connection.socket_path(t)
    os.makedirs(os.path.dirname(path), mode=0o700)
    Path(path).write_text("not a socket")
    monkeypatch.setattr(connection, "_start_master", lambda *a: pytest.fail("started"))
    assert connection.shared_socket(t) is None
    assert Path(path).read_text() == "not a socket"


def test_a_master_that_fails_to_start_means_no_shared_connection(short, monkeypatch):
    monkeypatch.setattr(connection, "_start_master", lambda *a: False)
    assert connection.shared_socket(target()) is None


# -- lifecycle.sshmux ------------------------------------------------------------------------
def fake_proc(root: Path, procs: dict[int, tuple[int, list[str]]]) -> str:
    for pid, (uid, argv) in procs.items():
        d = root / str(pid)
        d.mkdir(parents=True)
        (d / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in argv))
        (d / "status").write_text(f"Name:\tx\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
    return str(root)


def test_only_the_users_ssh_masters_of_this_vm_are_found(tmp_path):
    vmdir = Path("/var/lib/dgxvm/vms/job-42")
    kh = f"UserKnownHostsFile={vmdir}/known_hosts"
    other = "UserKnownHostsFile=/var/lib/dgxvm/vms/job-43/known_hosts"
    proc = fake_proc(tmp_path / "proc", {
        10: (1001, ["ssh", "-F", "none", "-o", kh, "-M", "-N", "-S", "/tmp/s", "u@a"]),
        11: (1001, ["/usr/bin/ssh", "-o", kh, "-M", "u@a"]),
        12: (1001, ["ssh", "-o", kh, "-S", "/tmp/s", "u@a", "echo"]),   # a client, not -M
        13: (1002, ["ssh", "-o", kh, "-M", "u@a"]),                     # another user's
        14: (1001, ["ssh", "-o", other, "-M", "u@b"]),                  # another VM's
        15: (1001, ["sshd", "-o", kh, "-M"]),                           # not ssh
        16: (1001, []),                                                 # a kernel thread
    })
    assert sorted(sshmux.masters(vmdir, 1001, proc=proc)) == [10, 11]


def test_stop_masters_kills_the_users_master_of_the_vm_and_nothing_else(tmp_path):
    """A real process whose command line is an ssh master's of the VM (argv[0] "ssh", -M, the
    VM's known_hosts), and one of another VM: only the first is killed."""
    vmdir = tmp_path / "vms" / "job-42"
    script = "import time; time.sleep(120)"

    def fake_ssh(known_hosts: Path) -> subprocess.Popen:
        return subprocess.Popen(["ssh", "-c", script, "-M", f"UserKnownHostsFile={known_hosts}"],
                                executable=sys.executable, stdin=subprocess.DEVNULL)
    ours = fake_ssh(vmdir / "known_hosts")
    theirs = fake_ssh(tmp_path / "vms" / "job-43" / "known_hosts")
    try:
        assert sshmux.stop_masters(vmdir, os.geteuid()) == 1
        # gone when it returns: nothing of this VM's is found any more (the zombie, which
        # this test has not reaped yet, has no command line)
        assert sshmux.masters(vmdir, os.geteuid()) == []
        assert ours.wait(timeout=10) == -9
        assert theirs.poll() is None
    finally:
        for p in (ours, theirs):
            p.kill()
            p.wait()


def test_stop_masters_of_a_vm_without_a_user_does_nothing(tmp_path):
    assert sshmux.stop_masters(tmp_path, None) == 0
