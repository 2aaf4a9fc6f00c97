"""The guest side of ``dgxvm run`` (seedfiles/dgxvm-guest.sh), run for real on this host without a
VM or ssh: the test plays the host's part with pipes, as access.session does through two ssh
sessions (``control ID`` carries the request, signals and STATUS; ``run ID`` carries the bytes).

Under both shells a guest may have: Debian's busybox (sh and every tool from its applets, as in
the test guest) and dash with coreutils/util-linux (a cloud image). DGXVM_GRACE=1 keeps the
TERM-then-KILL grace short.

This sandbox's PID 1 reaps no orphans, so a process the command left behind stays a zombie after
it is killed: ``alive`` counts zombies as gone (nothing runs), and the helper, which sees them
in the process group, waits its (short) grace before KILL.
"""

from __future__ import annotations

import os
import secrets
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

import slurm_dgxvm
from slurm_dgxvm.access.request import Request

HELPER = Path(slurm_dgxvm.__file__).parent / "seedfiles" / "dgxvm-guest.sh"
BUSYBOX = "/bin/busybox"
APPLETS = ("sh", "setsid", "base64", "sleep", "kill", "mkdir", "chmod", "rm", "mv", "cat", "id",
           "printf", "echo", "env", "true", "false", "test", "[")
BASE = Path(f"/tmp/.dgxvm-{os.getuid()}")
TIMEOUT = 15.0


def _default_signals() -> None:
    """The helper's processes start as an ssh session's do: signals at their defaults (pytest's
    own caller may have had SIGINT ignored, which would be inherited and untrappable)."""
    for s in (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1,
              signal.SIGUSR2, signal.SIGPIPE):
        signal.signal(s, signal.SIG_DFL)


def alive(pid: int) -> bool:
    """Whether ``pid`` is a process that still runs (a zombie does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def wait_for(predicate, timeout: float = TIMEOUT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            out.append(int(entry.name))
    return out


def sleeping(pid: int) -> bool:
    """Whether ``pid`` or a process below it is in a timed sleep (the kernel's nanosleep: the
    helper's ``sleep``, whether a process of its own or, in busybox, run in the shell itself).
    Where the helper's only sleep before an event is a poll for that event, this says it got
    there."""
    todo, seen = [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            if "nanosleep" in Path(f"/proc/{p}/wchan").read_text():
                return True
        except OSError:
            continue
        todo += _children(p)
    return False


def readline(stream, timeout: float = TIMEOUT) -> bytes:
    """One line from a pipe, without blocking past ``timeout`` (b"" at EOF)."""
    fd = stream.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while not buf.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"no line within {timeout} s (got {buf!r})")
        chunk = os.read(fd, 1)
        if not chunk:
            return buf
        buf += chunk
    return buf


@pytest.fixture(params=["busybox", "dash"])
def shell(request, tmp_path) -> tuple[list[str], str]:
    """``(argv prefix that runs a sh script, PATH)`` of one guest flavour."""
    return _shell(request.param, tmp_path)


@pytest.fixture
def dash_shell(tmp_path) -> tuple[list[str], str]:
    """The dash flavour only (busybox runs its own applets before anything on PATH)."""
    return _shell("dash", tmp_path)


def _shell(kind: str, tmp_path: Path) -> tuple[list[str], str]:
    if kind == "busybox":
        if not os.access(BUSYBOX, os.X_OK):
            pytest.fail("no /bin/busybox: scripts/bootstrap installs busybox-static")
        bindir = tmp_path / "busybox-bin"
        bindir.mkdir()
        for name in APPLETS:
            (bindir / name).symlink_to(BUSYBOX)
        return [BUSYBOX, "sh"], str(bindir)
    dash = shutil.which("dash")
    if dash is None:
        pytest.fail("no dash")
    return [dash], "/usr/local/bin:/usr/bin:/bin"


class Guest:
    """One run ID's two sessions, started as the host's ssh clients would start them."""

    def __init__(self, shell: tuple[list[str], str], tmp_path: Path, run_id: str | None = None):
        self.prefix, self.path = shell
        self.tmp = tmp_path
        self.id = secrets.token_hex(8) if run_id is None else run_id
        self.dir = BASE / self.id
        self.home = tmp_path / "home"
        self.home.mkdir(exist_ok=True)
        self.env = {"PATH": self.path, "HOME": str(self.home), "DGXVM_GRACE": "1"}
        self.procs: list[subprocess.Popen] = []
        self.pidfiles: list[Path] = []

    def _start(self, argv: list[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(argv, env=self.env, start_new_session=True,
                             preexec_fn=_default_signals, **kw)
        self.procs.append(p)
        return p

    def helper(self, verb: str, run_id: str | None = None, **kw) -> subprocess.Popen:
        return self._start([*self.prefix, str(HELPER), verb, self.id if run_id is None
                            else run_id], **kw)

    def stubbed_sleep(self, verb: str) -> subprocess.Popen:
        """The helper with its ``sleep`` made instant (a shell function, which both shells find
        before a builtin, an applet or PATH): its 30 s wait for the control session passes in
        an instant. The command it starts is not affected (a new process)."""
        script = 'sleep() { :; }; helper_=$3; set -- "$1" "$2"; . "$helper_"'
        return self._start([*self.prefix, "-c", script, "guest", verb, self.id, str(HELPER)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def control(self) -> subprocess.Popen:
        return self.helper("control", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)

    def run(self) -> subprocess.Popen:
        return self.helper("run", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)

    def pidfile(self, name: str) -> Path:
        p = self.tmp / name
        self.pidfiles.append(p)
        return p

    def cleanup(self) -> None:
        pids = []
        for f in self.pidfiles:
            try:
                pids.append(int(f.read_text().split()[0]))
            except (OSError, ValueError, IndexError):
                pass
        for pid in pids:   # the command's own process group (setsid), then the processes
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    p.kill()
            p.wait()
            for f in (p.stdin, p.stdout, p.stderr):
                if f is not None:
                    f.close()
        shutil.rmtree(self.dir, ignore_errors=True)   # this test's own ID only


@pytest.fixture
def guest(shell, tmp_path):
    g = Guest(shell, tmp_path)
    try:
        yield g
    finally:
        g.cleanup()


def send(control: subprocess.Popen, line: bytes) -> None:
    assert control.stdin is not None
    control.stdin.write(line)
    control.stdin.flush()


def ask_status(control: subprocess.Popen) -> bytes:
    send(control, b"STATUS\n")
    return readline(control.stdout)


def finish_control(guest: Guest, control: subprocess.Popen) -> None:
    """The host's end: EOF on control, which ends and leaves no state behind."""
    assert control.stdin is not None
    control.stdin.close()
    assert control.wait(timeout=TIMEOUT) == 0
    assert not guest.dir.exists()


def request(argv, env=None, cwd=None) -> bytes:
    return Request(argv=tuple(argv), env=dict(env or {}), cwd=cwd).line()


# -- the command's status, bytes, argv, environment -----------------------------------------
@pytest.mark.parametrize("control_first", [True, False], ids=["control-first", "run-first"])
def test_status_streams_and_stdin(guest, control_first):
    argv = ["sh", "-c", 'IFS= read -r line; echo "out:$line"; echo "err:$line" >&2; exit 7']
    if control_first:
        control = guest.control()
        send(control, request(argv))
        run = guest.run()
    else:   # run waits for its control session
        run = guest.run()
        # its only sleep before the control session attaches is the poll for it
        wait_for(lambda: sleeping(run.pid), what="the run session to wait for its control")
        control = guest.control()
        send(control, request(argv))
    out, err = run.communicate(b"hello world\n", timeout=TIMEOUT)
    assert (run.returncode, out, err) == (7, b"out:hello world\n", b"err:hello world\n")
    assert ask_status(control) == b"status 7\n"
    finish_control(guest, control)


ODD_ARGS = ["a b", "it's", 'say "hi"', "line1\nline2", "*", "?", "$(touch pwned)", "`id`",
            "${HOME}", "ünïcödé ✓", "", "back\\slash\\", " lead and trail ", "-n", "'",
            os.fsdecode(b"not utf-8: \xff\xfe\x80")]


def test_argv_arrives_exactly(guest, tmp_path):
    work = tmp_path / "work dir 'x'"
    work.mkdir()
    (work / "glob-would-match").touch()
    control = guest.control()
    send(control, request(["sh", "-c", 'printf "%s\\0" "$#" "$@"', "argv0", *ODD_ARGS],
                          cwd=str(work)))
    run = guest.run()
    out, err = run.communicate(timeout=TIMEOUT)
    assert (run.returncode, err) == (0, b"")
    assert out.split(b"\0")[:-1] == [str(len(ODD_ARGS)).encode(),
                                     *(os.fsencode(a) for a in ODD_ARGS)]
    assert sorted(p.name for p in work.iterdir()) == ["glob-would-match"]   # nothing ran
    finish_control(guest, control)


def test_environment_and_cwd_from_the_request(guest, tmp_path):
    work = tmp_path / "cwd"
    work.mkdir()
    env = {"FOO": "a b 'c' $HOME `x`\nsecond line", "EMPTY": "", "SLURM_JOB_ID": "42",
           "RAW": os.fsdecode(b"\xff\xfe")}
    script = ('printf "%s\\0" "$FOO" "${EMPTY-unset}" "$SLURM_JOB_ID" "$RAW" "$PWD"; '
              'env | grep -c "^FOO=" || true')
    control = guest.control()
    send(control, request(["sh", "-c", script], env=env, cwd=str(work)))
    run = guest.run()
    out, err = run.communicate(timeout=TIMEOUT)
    assert (run.returncode, err) == (0, b"")
    *values, exported = out.split(b"\0")
    assert values == [os.fsencode(env["FOO"]), b"", b"42", b"\xff\xfe", str(work).encode()]
    assert exported == b"1\n"   # exported, not only set in the helper's shell
    finish_control(guest, control)


def test_no_cwd_starts_in_home(guest):
    control = guest.control()
    send(control, request(["sh", "-c", 'printf %s "$PWD"']))
    run = guest.run()
    out, _ = run.communicate(timeout=TIMEOUT)
    assert (run.returncode, out) == (0, str(guest.home).encode())
    finish_control(guest, control)


def test_unreachable_cwd_is_125_and_runs_nothing(guest, tmp_path):
    marker = tmp_path / "ran"
    control = guest.control()
    send(control, request(["sh", "-c", f": > '{marker}'"], cwd=str(tmp_path / "absent")))
    run = guest.run()
    _, err = run.communicate(timeout=TIMEOUT)
    assert run.returncode == 125
    assert b"is not reachable in the VM" in err
    assert not marker.exists()
    finish_control(guest, control)


def test_killed_command_is_128_plus_signal(guest):
    control = guest.control()
    send(control, request(["sh", "-c", "kill -USR1 $$; sleep 5"]))
    run = guest.run()
    run.communicate(timeout=TIMEOUT)
    assert run.returncode == 128 + signal.SIGUSR1
    finish_control(guest, control)


# -- signals through the control session ----------------------------------------------------
@pytest.mark.parametrize("sig", ["TERM", "INT", "HUP", "USR1", "USR2"])
def test_signal_reaches_the_commands_trap(guest, sig):
    pidfile = guest.pidfile("cmd.pid")
    script = (f'trap "echo got-{sig}; exit 42" {sig}; echo $$ > "$1"; echo ready; '
              'while :; do sleep 0.05; done')
    control = guest.control()
    send(control, request(["sh", "-c", script, "cmd", str(pidfile)]))
    run = guest.run()
    assert readline(run.stdout) == b"ready\n"
    send(control, sig.encode() + b"\n")
    out, err = run.communicate(timeout=TIMEOUT)
    # (busybox's sh reports its sleep's death by the signal on stderr: "Terminated")
    assert (run.returncode, out) == (42, f"got-{sig}\n".encode())
    assert b"dgxvm-guest" not in err
    assert ask_status(control) == b"status 42\n"
    finish_control(guest, control)


def test_signal_sent_before_the_command_started_reaches_it(guest):
    """A scancel right after the start: the TERM waits in the control session for the command
    (which has no trap yet, so TERM ends it)."""
    control = guest.control()
    send(control, request(["sleep", "30"]) + b"TERM\n")
    # its only sleep before a command starts is the TERM's wait for one
    wait_for(lambda: sleeping(control.pid), what="the control session to hold the TERM")
    run = guest.run()
    run.communicate(timeout=TIMEOUT)
    assert run.returncode == 128 + signal.SIGTERM
    finish_control(guest, control)


def test_status_none_while_running_then_the_status(guest):
    control = guest.control()
    send(control, request(["sh", "-c", "echo ready; read -r x; exit 5"]))
    run = guest.run()
    assert readline(run.stdout) == b"ready\n"
    assert ask_status(control) == b"status none\n"
    out, _ = run.communicate(b"go\n", timeout=TIMEOUT)
    assert run.returncode == 5
    assert ask_status(control) == b"status 5\n"
    assert ask_status(control) == b"status 5\n"   # asked again (a 255 after a retry)
    finish_control(guest, control)


# -- the host gone: EOF on control ----------------------------------------------------------
@pytest.mark.parametrize("ignores_term", [False, True], ids=["dies-on-term", "ignores-term"])
def test_control_eof_stops_the_commands_group(guest, ignores_term):
    pidfile, childfile = guest.pidfile("cmd.pid"), guest.pidfile("child.pid")
    trap = 'trap "" TERM; ' if ignores_term else ""
    script = (f'{trap}echo $$ > "$1"; sleep 1000 & echo $! > "$2"; echo ready; '
              'while :; do sleep 0.05; done')
    control = guest.control()
    send(control, request(["sh", "-c", script, "cmd", str(pidfile), str(childfile)]))
    run = guest.run()
    assert readline(run.stdout) == b"ready\n"
    pids = [int(pidfile.read_text()), int(childfile.read_text())]
    assert all(alive(p) for p in pids)
    started = time.monotonic()
    control.stdin.close()   # the host side died
    run.communicate(timeout=TIMEOUT)
    assert run.returncode == 128 + (signal.SIGKILL if ignores_term else signal.SIGTERM)
    assert control.wait(timeout=TIMEOUT) == 0
    assert time.monotonic() - started < 8   # TERM, KILL after DGXVM_GRACE=1
    wait_for(lambda: not any(alive(p) for p in pids), 5, "the command's processes to end")
    assert not guest.dir.exists()


def test_what_the_command_left_in_the_background_is_stopped(guest):
    childfile = guest.pidfile("child.pid")
    control = guest.control()
    send(control, request(["sh", "-c", 'sleep 1000 & echo $! > "$1"; exit 3', "cmd",
                           str(childfile)]))
    run = guest.run()
    # the background sleep holds run's stdout: communicate returns once it is gone
    out, err = run.communicate(timeout=TIMEOUT)
    assert (run.returncode, out, err) == (3, b"", b"")
    wait_for(lambda: not alive(int(childfile.read_text())), 5, "the background sleep to end")
    assert ask_status(control) == b"status 3\n"
    finish_control(guest, control)


# -- no control session ------------------------------------------------------------------------
def test_run_without_a_control_session_gives_up(guest, tmp_path):
    """The helper waits 30 s for the control session; with its sleep stubbed the wait passes
    at once and the outcome shows: 125, and the command never starts."""
    run = guest.stubbed_sleep("run")
    out, err = run.communicate(timeout=TIMEOUT)
    assert (run.returncode, out) == (125, b"")
    assert b"no control session" in err
    assert not guest.dir.exists()


def test_control_gone_before_run_started_runs_nothing(guest, tmp_path):
    """The host died after sending the request, before the command session came: the command
    never starts. (The real helper takes its full 30 s wait here: the control session removed
    the state with its "gone" mark; the sleep is stubbed to keep the test fast.)"""
    marker = tmp_path / "ran"
    control = guest.control()
    send(control, request(["sh", "-c", f": > '{marker}'"]))
    control.stdin.close()
    assert control.wait(timeout=TIMEOUT) == 0
    assert not guest.dir.exists()
    run = guest.stubbed_sleep("run")
    run.communicate(timeout=TIMEOUT)
    assert run.returncode == 125
    assert not marker.exists()


def test_control_gone_while_run_is_starting_runs_nothing(dash_shell, tmp_path):
    """The window made wide: a slow setsid (found on PATH, so dash only: busybox prefers its
    applet) marks that run is past its wait and sourced the request, the host dies then."""
    shell = dash_shell
    shim = tmp_path / "shim"
    shim.mkdir()
    entered = tmp_path / "entered"
    real = shutil.which("setsid")
    (shim / "setsid").write_text(f"#!/bin/sh\n: > '{entered}'\nsleep 0.5\nexec {real} \"$@\"\n")
    (shim / "setsid").chmod(0o755)
    g = Guest((shell[0], f"{shim}:{shell[1]}"), tmp_path)
    marker = g.pidfile("ran")
    try:
        control = g.control()
        send(control, request(["sh", "-c", 'echo $$ > "$1"', "cmd", str(marker)]))
        run = g.run()
        wait_for(entered.exists, what="run to reach setsid")
        control.stdin.close()   # the host dies
        assert control.wait(timeout=TIMEOUT) == 0
        run.communicate(timeout=TIMEOUT)
        assert not marker.exists()
        assert run.returncode == 125
    finally:
        g.cleanup()


def test_job_variables_named_like_the_helpers_own_change_nothing(guest):
    control = guest.control()
    send(control, request(["sh", "-c", "exit 4"], env={"d": "/nonexistent-dgxvm-test"}))
    run = guest.run()
    run.communicate(timeout=TIMEOUT)
    assert run.returncode == 4
    assert ask_status(control) == b"status 4\n"
    finish_control(guest, control)


# -- bad invocations --------------------------------------------------------------------------
@pytest.mark.parametrize("verb", ["run", "control", "shell"])
@pytest.mark.parametrize("run_id", ["../x", "", "ABCDEF0123456789", "abc/def", "12 34", "-1",
                                    "0123456789abcdef\n"])
def test_bad_run_id_is_125(guest, verb, run_id):
    p = guest.helper(verb, run_id=run_id, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE)
    out, err = p.communicate(b"", timeout=TIMEOUT)
    assert (p.returncode, out) == (125, b"")
    assert b"bad run id" in err


@pytest.mark.parametrize("args", [[], ["run"], ["run", "ab", "cd"], ["nope", "ab"]])
def test_usage_is_125(guest, args):
    p = guest._start([*guest.prefix, str(HELPER), *args], stdin=subprocess.DEVNULL,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate(timeout=TIMEOUT)
    assert (p.returncode, out) == (125, b"")
    assert b"usage" in err


def test_request_that_is_not_base64_is_125(guest):
    control = guest.control()
    send(control, b"not base64 at all!\n")
    out, err = control.communicate(timeout=TIMEOUT)
    assert control.returncode == 125
    assert b"not base64" in err


@pytest.mark.parametrize("first", [b"", b"not base64 at all!\n"], ids=["eof", "not-base64"])
def test_a_failed_control_session_leaves_no_state(guest, first):
    control = guest.control()
    control.communicate(first, timeout=TIMEOUT)
    assert control.returncode == 125
    assert not guest.dir.exists()


def test_state_is_private_to_the_user(guest):
    control = guest.control()
    send(control, request(["true"]))
    wait_for(lambda: (guest.dir / "attached").exists(), what="the control session")
    assert (BASE.stat().st_mode & 0o777) == 0o700
    assert ((guest.dir / "request").stat().st_mode & 0o077) == 0
    finish_control(guest, control)


# -- userns: the namespace of a container run as the user's own uid -----------------------------
# Its mapping needs shadow's setuid newuidmap and the guest's /etc/subuid; that it works is
# proven in the test guest (tests/integration/test_dgxvm_run.py: id in a container). Here: what
# an image without them says, before anything runs.
def _userns(shell, tmp_path, *args, extra_path: str = "",
            path: str | None = None) -> subprocess.CompletedProcess:
    prefix, flavour_path = shell
    path = flavour_path if path is None else path
    env = {"PATH": f"{extra_path}:{path}" if extra_path else path, "HOME": str(tmp_path)}
    return subprocess.run([*prefix, str(HELPER), "userns", *args], env=env, capture_output=True,
                          timeout=TIMEOUT, preexec_fn=_default_signals)


def test_userns_without_newuidmap_says_so_and_runs_nothing(shell, tmp_path):
    """(This host may have newuidmap: the helper gets a PATH without it, as an image without
    uidmap has; busybox's own applets need no PATH.)"""
    marker = tmp_path / "ran"
    nothing = tmp_path / "empty-bin"
    nothing.mkdir()
    r = _userns(shell, tmp_path, "-", "-", "-", "-", "touch", str(marker), path=str(nothing))
    assert r.returncode == 125
    assert b"newuidmap is not installed" in r.stderr and b"--container-remap-root" in r.stderr
    assert not marker.exists()


def test_userns_without_a_subordinate_range_says_so_and_runs_nothing(shell, tmp_path):
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for tool in ("newuidmap", "newgidmap"):
        (stubs / tool).write_text("#!/bin/sh\nexit 1\n")
        (stubs / tool).chmod(0o755)
    user = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    subuid = Path("/etc/subuid").read_text() if Path("/etc/subuid").exists() else ""
    assert not any(line.split(":")[0] == user for line in subuid.splitlines()), \
        f"this test needs {user} without an /etc/subuid range"
    marker = tmp_path / "ran"
    r = _userns(shell, tmp_path, "-", "-", "-", "-", "touch", str(marker),
                extra_path=str(stubs))
    assert r.returncode == 125
    assert f"no subordinate uid/gid range for {user}".encode() in r.stderr
    assert not marker.exists()


def test_userns_refuses_a_gid_list_that_is_not_numbers(dash_shell, tmp_path):
    r = _userns(dash_shell, tmp_path, "5000,x;rm", "-", "-", "-", "true")
    assert r.returncode == 125 and b"bad gid 'x;rm'" in r.stderr


@pytest.mark.parametrize("name", ["../x", ".hidden", "a/b", "", "a b"])
def test_userns_refuses_a_container_name_that_could_leave_its_directory(dash_shell, tmp_path,
                                                                        name):
    r = _userns(dash_shell, tmp_path, "-", "/lower", "/target", name, "true")
    assert r.returncode == 125 and b"bad container name" in r.stderr


# -- a container runtime's own errors ------------------------------------------------------------
RUNC_LOG = (b'time="2026-11-26T23:13:12Z" level=warning msg="a warning, not shown"\n'
            b'time="2026-11-26T23:13:13Z" level=error msg="runc run failed: unable to start '
            b'container process: exec: \\"nope\\": executable file not found in $PATH"\n')


@pytest.mark.parametrize("log, status, want", [
    (RUNC_LOG, 1, 127),
    (RUNC_LOG.replace(b"executable file not found in $PATH", b"permission denied"), 1, 126),
    (RUNC_LOG, 3, 3),                     # a status of the command's own stays
    (b'level=error msg="runc run failed: mounting x: no such device"\n', 1, 1),
])
def test_a_runtimes_not_found_is_127_and_its_message_is_shown(guest, log, status, want):
    """runc says "executable file not found" and exits 1; the user gets a shell's 127 (126
    for permission denied) and runc's message on stderr, and nothing of its warnings."""
    command = (b"sh -c 'printf \"%s\" \"$1\" > \"$0/runtime.log\"; exit " + str(status).encode()
               + b"' \"$DGXVM_RUN_DIR\" '" + log.replace(b"'", b"'\\''") + b"'")
    control = guest.control()
    send(control, Request(argv=("x",), env={}, cwd=None, command=command).line())
    run = guest.run()
    out, err = run.communicate(timeout=TIMEOUT)
    assert run.returncode == want, err
    if b"level=error" in log:
        assert err.startswith(b"dgxvm-guest: runc run failed: ")
        assert b"warning" not in err and b'\\"' not in err
    finish_control(guest, control)
