"""shares.asuser: what root does in a tree a user controls, it does as that user, with a deadline,
no-follow and non-blocking opens, and none of root's descriptors. Each claim is the attack run
for real as root against a real unprivileged uid (nobody): a FIFO, a SIGSTOP, a symlink, a
device node, a hard link to a root file."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from slurm_dgxvm.errors import (HostError, ShareRefused, ShareTimeout, UserTreeRefused,
                                UserTreeTimeout, is_job_fault)
from slurm_dgxvm.names import shown
from slurm_dgxvm.shares import asuser, policy

NOBODY = 65534
SLACK_S = 2.0                 # a loaded 2-core machine: fork, kill and reap take this at most

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="becomes another user: needs root")


@pytest.fixture
def home(traversable_tmp) -> Path:
    """A directory of nobody's (0700), as a user's cache is theirs."""
    d = traversable_tmp / "home"
    d.mkdir(mode=0o700)
    os.chown(d, NOBODY, NOBODY)
    return d


def as_nobody(work, **kw):
    return asuser.run(work, uid=NOBODY, gid=NOBODY, groups=[NOBODY],
                      subject=kw.pop("subject", "/the/users/tree"), **kw)


def gone(pid: int) -> bool:
    """Not running, not stopped, not a zombie: no /proc entry, and not our child any more."""
    try:
        os.waitpid(pid, os.WNOHANG)
        return False                            # still a child of ours (running or a zombie)
    except ChildProcessError:
        pass
    return not Path(f"/proc/{pid}").exists()


def wait_for_file(path: Path, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            text = path.read_text()
            if text.endswith("\n"):
                return text.strip()
        except FileNotFoundError:
            pass
        time.sleep(0.01)
    raise AssertionError(f"{path} not written in {timeout}s")


# -- the deadline ------------------------------------------------------------------------------------
def test_a_fifo_where_a_file_belongs_is_refused_at_once_not_read(home):
    """Reading a FIFO nobody writes blocks for ever: the helpers never open one."""
    os.mkfifo(home / "image.json")
    os.chown(home / "image.json", NOBODY, NOBODY)
    t0 = time.monotonic()
    with pytest.raises(UserTreeRefused) as info:
        as_nobody(lambda: asuser.read_file(str(home / "image.json")).decode(),
                  subject=str(home))
    assert time.monotonic() - t0 < 1.0
    assert is_job_fault(info.value) and info.value.exit_code == 2
    assert f"{home}/image.json is a FIFO (named pipe), not a regular file" in str(info.value)


def test_a_share_walk_through_a_fifo_is_refused_naming_it(home):
    os.mkfifo(home / "cache")
    with pytest.raises(ShareRefused, match=r"cache is not a directory \(a FIFO"):
        policy.open_as_user(str(home / "cache"), NOBODY, NOBODY, [NOBODY])


def test_a_child_the_user_stops_is_killed_at_the_deadline_and_reaped(home):
    """The user may kill -STOP any process running as them: root kills it at the deadline
    (SIGKILL ends a stopped process too) and reaps it; the call raises the job's fault."""
    pidfile = home / "pid"

    def work():
        pidfile.write_text(f"{os.getpid()}\n")
        time.sleep(1.0)                          # long enough for the user's kill -STOP
        return "answered"

    stopped = {}

    def user_stops_it():
        pid = wait_for_file(pidfile)
        stopped["rc"] = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                                        "--clear-groups", "kill", "-STOP", pid]).returncode
    t = threading.Thread(target=user_stops_it)
    t.start()
    t0 = time.monotonic()
    with pytest.raises(UserTreeTimeout) as info:
        as_nobody(work, timeout_s=2.0, doing="listing tmp/", subject=str(home))
    took = time.monotonic() - t0
    t.join()
    assert stopped["rc"] == 0, "the user could not stop their own process"
    assert 2.0 <= took < 2.0 + SLACK_S
    assert str(info.value) == (f"{str(home)!r}: the user's files did not answer within "
                               f"2s (listing tmp/)")
    assert is_job_fault(info.value)
    assert gone(int(pidfile.read_text()))


@pytest.mark.parametrize("how", ["sleeps", "stops itself"])
def test_a_child_past_the_deadline_is_gone_when_the_call_returns(home, how):
    pidfile = home / "pid"

    def work():
        pidfile.write_text(f"{os.getpid()}\n")
        if how == "sleeps":
            time.sleep(60)
        else:
            os.kill(os.getpid(), signal.SIGSTOP)
    t0 = time.monotonic()
    with pytest.raises(UserTreeTimeout):
        as_nobody(work, timeout_s=0.5)
    assert time.monotonic() - t0 < 0.5 + SLACK_S
    assert gone(int(pidfile.read_text()))


def test_an_exception_in_the_waiting_parent_kills_and_reaps_the_child(home):
    """slurmd's SIGTERM (the Prolog raises Interrupted from its handler) mid-wait: the child
    does not outlive the call."""
    pidfile = home / "pid"

    class Interrupted(Exception):
        pass

    def raise_(*_):
        raise Interrupted()
    old = signal.signal(signal.SIGALRM, raise_)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(Interrupted):
            as_nobody(lambda: (pidfile.write_text(f"{os.getpid()}\n"), time.sleep(60)),
                      timeout_s=30)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert gone(int(wait_for_file(pidfile)))


def test_a_child_the_user_kills_is_a_refusal_not_a_hang(home):
    with pytest.raises(UserTreeRefused, match=r"ended without an answer \(killed by SIGKILL\)"):
        as_nobody(lambda: os.kill(os.getpid(), signal.SIGKILL))


def test_an_answer_and_its_descriptors_come_back_and_the_child_is_reaped(home):
    (home / "f").write_text("the user's")

    def work():
        fd = asuser.open_file(str(home / "f"))
        return asuser.Answer({"pid": os.getpid()}, (fd,))
    answer = as_nobody(work)
    [fd] = answer.fds
    try:
        assert os.read(fd, 100) == b"the user's"
        assert not os.get_inheritable(fd) and fcntl_cloexec(fd)
    finally:
        os.close(fd)
    assert gone(answer.value["pid"])


def fcntl_cloexec(fd: int) -> bool:
    import fcntl
    return bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)


def test_root_is_never_the_user(home):
    with pytest.raises(HostError, match="refusing uid 0"):
        asuser.run(lambda: None, uid=0, gid=0, subject="/")


# -- who the child is, and what it holds -----------------------------------------------------------
def test_the_child_has_the_users_ids_no_capability_and_cannot_get_root_back():
    def work():
        status = dict(line.split(":", 1) for line in
                      Path("/proc/self/status").read_text().splitlines() if ":" in line)
        try:
            os.setuid(0)
            back = "became root"
        except PermissionError:
            back = "refused"
        return {k: status[k].split() for k in ("Uid", "Gid", "Groups", "CapEff", "CapPrm",
                                               "NoNewPrivs")} | {"setuid0": back,
                                                                 "cwd": os.getcwd()}
    got = asuser.run(work, uid=NOBODY, gid=NOBODY, groups=[NOBODY, 4242],
                     subject="/").value
    assert got["Uid"] == [str(NOBODY)] * 4 and got["Gid"] == [str(NOBODY)] * 4
    assert sorted(got["Groups"]) == sorted(["4242", str(NOBODY)])
    assert got["CapEff"] == ["0000000000000000"] and got["CapPrm"] == ["0000000000000000"]
    assert got["NoNewPrivs"] == ["1"] and got["setuid0"] == "refused" and got["cwd"] == "/"


def test_the_child_holds_none_of_roots_descriptors(tmp_path):
    """Root's open files (here a root-only file and a socket, both inheritable: what a
    libvirt connection or a lock would be) are not open in the child, nor stdin/out/err."""
    secret = tmp_path / "root-only"
    secret.write_text("root's")
    secret.chmod(0o600)
    f = open(secret)
    os.set_inheritable(f.fileno(), True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    os.set_inheritable(listener.fileno(), True)
    try:
        def work():
            out = {}
            for fd in os.listdir("/proc/self/fd"):
                try:
                    out[fd] = os.readlink(f"/proc/self/fd/{fd}")
                except OSError:
                    out[fd] = None            # the listing's own descriptor, closed already
            return out
        fds = as_nobody(work).value
        parent_sock = os.readlink(f"/proc/self/fd/{listener.fileno()}")
    finally:
        f.close()
        listener.close()
    targets = [t for t in fds.values() if t is not None]
    assert str(secret) not in targets and parent_sock not in targets
    assert [fds[str(n)] for n in (0, 1, 2)] == ["/dev/null"] * 3
    others = [v for k, v in fds.items() if k not in ("0", "1", "2") and v is not None]
    # what is left: the socket the child answers on (the listing's own descriptor was closed
    # before its link was read)
    assert len(others) == 1 and others[0].startswith("socket:"), fds


# -- what the helpers open -------------------------------------------------------------------------
def plant(home: Path, what: str) -> Path:
    p = home / f"x-{what}"
    if what == "symlink":
        p.symlink_to("/etc/passwd")
    elif what == "symlink-dir":
        p.symlink_to("/etc")
    elif what == "fifo":
        os.mkfifo(p)
    elif what == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(p))
        s.close()
    elif what == "device":
        os.mknod(p, 0o666 | stat.S_IFCHR, os.makedev(1, 3))     # /dev/null's numbers
    elif what == "dir":
        p.mkdir()
    elif what == "file":
        p.write_text("x")
    os.lchown(p, NOBODY, NOBODY)
    return p


@pytest.mark.parametrize("what, words", [
    ("symlink", "a symbolic link"), ("fifo", "a FIFO (named pipe)"), ("socket", "a socket"),
    ("device", "a character device"), ("dir", "a directory")])
def test_only_a_regular_file_is_opened_as_one(home, what, words):
    p = plant(home, what)
    with pytest.raises(UserTreeRefused) as info:
        as_nobody(lambda: asuser.open_file(p.name, dir_fd=asuser.open_dir(str(home)),
                                           show=str(p)))
    assert f"{p} is {words}, not a regular file" in str(info.value)


@pytest.mark.parametrize("what, words", [
    ("symlink-dir", "a symbolic link"), ("fifo", "a FIFO (named pipe)"),
    ("socket", "a socket"), ("device", "a character device"), ("file", "a regular file")])
def test_only_a_directory_is_opened_as_one(home, what, words):
    p = plant(home, what)
    with pytest.raises(UserTreeRefused) as info:
        as_nobody(lambda: asuser.open_dir(p.name, dir_fd=asuser.open_dir(str(home)),
                                          show=str(p)))
    assert f"{p} is {words}, not a directory" in str(info.value)


def test_a_hard_link_to_a_root_file_gives_only_what_the_user_may_read(home, tmp_path):
    """Root's files linked into the user's tree (the user cannot make such links with
    protected_hardlinks; an old one, or one root made, is there): opened as the user, a
    root-only file is refused and a world-readable one read as anyone may."""
    private, public = tmp_path / "private", tmp_path / "public"
    private.write_text("root's secret")
    private.chmod(0o600)
    public.write_text("anyone's")
    public.chmod(0o644)
    os.link(private, home / "private")
    os.link(public, home / "public")
    with pytest.raises(UserTreeRefused, match="the job's user cannot open .*private "
                                              r"\(permission denied\)"):
        as_nobody(lambda: asuser.read_file(str(home / "private")).decode())
    assert as_nobody(lambda: asuser.read_file(str(home / "public")).decode()).value == "anyone's"


def test_a_file_larger_than_expected_is_refused_not_read_whole(home):
    (home / "big").write_bytes(b"x" * 5000)
    with pytest.raises(UserTreeRefused, match="larger than 4096 bytes"):
        as_nobody(lambda: len(asuser.read_file(str(home / "big"), limit=4096)))


def test_names_in_refusals_cannot_forge_lines(home):
    name = "evil\n\x1b[2Jreconcile: consistent"
    os.mkfifo(home / name)
    with pytest.raises(UserTreeRefused) as info:
        as_nobody(lambda: asuser.read_file(name, dir_fd=asuser.open_dir(str(home))))
    text = str(info.value)
    assert "\n" not in text and "\x1b" not in text
    assert shown(name) in text and "\\n\\x1b[2J" in text


def test_a_share_timeout_is_a_share_refusal_and_the_jobs_fault(home, monkeypatch):
    real = policy._walk
    monkeypatch.setattr(policy, "_walk", lambda p: (time.sleep(30), real(p))[1])
    with pytest.raises(ShareTimeout) as info:
        policy.open_as_user(str(home), NOBODY, NOBODY, [NOBODY], timeout_s=0.3)
    assert isinstance(info.value, ShareRefused) and is_job_fault(info.value)
    assert "did not answer within 0.3s" in str(info.value) and str(home) in str(info.value)


def test_a_child_stopped_after_its_answer_is_killed_and_its_answer_stands(home, monkeypatch):
    """The user stops the child between its answer and its exit: the answer is used, the
    child killed and reaped after a short grace, not after the whole deadline."""
    pidfile = home / "pid"

    def work():
        pidfile.write_text(f"{os.getpid()}\n")
        return "answered"
    real_sendmsg = socket.socket.sendmsg

    def send_then_stop(self, *a, **kw):        # in the child: send, then stopped by the user
        n = real_sendmsg(self, *a, **kw)
        os.kill(os.getpid(), signal.SIGSTOP)
        return n
    monkeypatch.setattr(socket.socket, "sendmsg", send_then_stop)
    t0 = time.monotonic()
    assert as_nobody(work, timeout_s=30).value == "answered"
    assert time.monotonic() - t0 < asuser.EXIT_GRACE_S + SLACK_S
    assert gone(int(pidfile.read_text()))
