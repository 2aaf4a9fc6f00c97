"""`dgxvm run` and `dgxvm shell` into a job's VM, for real: one test-guest VM (named as job
JOB's VM) shared by every case, dgxvm run as the job's ordinary user from inside the libvirt
stack's namespace, the way a batch script on the node runs it. What each case checks is what the
user relies on: bytes and arguments arrive as given, streams stay apart, the exit status is the
command's, signals reach it, and nothing is left running in the guest when dgxvm run dies."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

from harness.node import dgxvm_for_users
from harness.ssh import ssh_argv

JOB = 990001
GROUP = 54321     # a supplementary group of the job's user (in the guest: g54321)


@pytest.fixture(scope="module")
def runvm(vmenv, tmp_path_factory):
    from slurm_dgxvm import config as config_mod
    from slurm_dgxvm import lifecycle
    from slurm_dgxvm.placement import Request
    from slurm_dgxvm.slurm.job import domain_for

    env = lifecycle.Env(config_mod.load(str(vmenv.config)))
    name = domain_for(env.cfg, JOB)
    work = vmenv.workdir / "run"
    work.mkdir(exist_ok=True)
    os.chown(work, vmenv.uid, vmenv.gid)
    dest = Path(str(vmenv.base)) / "dgxvm-for-users"
    exe = dgxvm_for_users(dest)
    req = lifecycle.CreateRequest(
        name=name, placement=Request(count=2), owner="job", job_id=JOB, user=vmenv.user,
        uid=vmenv.uid, gid=vmenv.gid, groups=(GROUP,), home=f"/home/{vmenv.user}",
        workdir=str(work))
    rec = lifecycle.create(env, req)
    vm = type("RunVm", (), {})()
    vm.env, vm.name, vm.rec, vm.work, vm.exe, vm.vmenv = env, name, rec, work, exe, vmenv
    try:
        yield vm
    finally:
        lifecycle.delete(env, name)


def user_argv(vm, *args: str, user: str | None = None, job: bool = True) -> list[str]:
    envs = [f"DGXVM_CONFIG={vm.vmenv.config}", "PATH=/usr/bin:/bin", "LANG=C.UTF-8"]
    if job:
        envs.append(f"SLURM_JOB_ID={JOB}")
    return ["ip", "netns", "exec", vm.vmenv.netns, "runuser", "-u", user or vm.vmenv.user, "--",
            "env", "-i", *envs, str(vm.exe), *args]


def dgxvm_run(vm, *cmd: str, input: bytes | None = None, cwd: Path | None = None,
              extra_env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    argv = user_argv(vm, "run", "--", *cmd)
    if extra_env:
        i = argv.index(str(vm.exe))
        argv[i:i] = [f"{k}={v}" for k, v in extra_env.items()]
    return subprocess.run(argv, input=input if input is not None else b"",
                          capture_output=True, timeout=timeout, cwd=str(cwd or vm.work))


def guest_ps(vm) -> str:
    """The guest's process list, seen over a plain ssh as the user."""
    d = vm.vmenv.state_dir / "vms" / vm.name
    argv = ["ip", "netns", "exec", vm.vmenv.netns, "runuser", "-u", vm.vmenv.user, "--",
            *ssh_argv(d / "id_ed25519", d / "known_hosts", f"{vm.vmenv.user}@{vm.rec.address}",
                      "ps -o pid,pgid,args 2>/dev/null || ps", connect_timeout=20)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def wait_gone(vm, marker: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while True:
        ps = guest_ps(vm)
        if marker not in ps or time.monotonic() > deadline:
            return ps
        time.sleep(0.5)


def wait_running(vm, marker: str, timeout: float = 20) -> str:
    """The guest's process list once ``marker`` is in it (AssertionError after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        ps = guest_ps(vm)
        if marker in ps:
            return ps
        assert time.monotonic() < deadline, f"no {marker!r} in the guest after {timeout}s:\n{ps}"
        time.sleep(0.5)


# -- bytes, arguments, streams, status ------------------------------------------------------
def test_stdout_and_stderr_arrive_apart_and_the_exit_status_is_the_commands(runvm):
    r = dgxvm_run(runvm, "sh", "-c", "echo out; echo err >&2; echo out2; exit 7")
    assert r.returncode == 7, r.stderr
    assert r.stdout == b"out\nout2\n"
    assert r.stderr == b"err\n"


def test_arguments_arrive_exactly_as_given(runvm):
    args = ["a b", "it's", 'say "hi"', "*", "$HOME", "x\ny", "été", "\\n", "", "-n", ";ls"]
    r = dgxvm_run(runvm, "printf", "[%s]\\n", *args)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode() == "".join(f"[{a}]\n" for a in args)


def test_stdin_is_forwarded_and_binary_output_is_exact(runvm):
    data = bytes(range(256)) * 4096   # 1 MiB, every byte value
    r = dgxvm_run(runvm, "cat", input=data)
    assert r.returncode == 0, r.stderr
    assert r.stdout == data


def test_the_command_runs_as_the_user_in_the_shared_cwd_with_the_job_environment(runvm):
    sub = runvm.work / "sub dir"
    sub.mkdir(exist_ok=True)
    os.chown(sub, runvm.vmenv.uid, runvm.vmenv.gid)
    r = dgxvm_run(runvm, "sh", "-c", 'id -u; pwd; echo "$MYVAR"; echo "$PATH"; '
                  'echo "$SLURM_JOB_GPUS"; echo "$CUDA_VISIBLE_DEVICES"; echo written > f',
                  cwd=sub, extra_env={"MYVAR": "a 'b' c", "SLURM_JOB_GPUS": "0,1",
                                      "CUDA_VISIBLE_DEVICES": "1"})
    assert r.returncode == 0, r.stderr
    uid, cwd, myvar, path, job_gpus, cvd = r.stdout.decode().splitlines()
    assert int(uid) == runvm.vmenv.uid
    assert cwd == str(sub)
    assert myvar == "a 'b' c"
    assert path.startswith("/usr/local/sbin:")     # the guest's PATH, not the host's
    assert (job_gpus, cvd) == ("0,1", "1")
    assert (sub / "f").read_text() == "written\n"
    assert (sub / "f").stat().st_uid == runvm.vmenv.uid


def test_a_cwd_the_vm_does_not_have_starts_in_the_home_with_a_note(runvm):
    r = dgxvm_run(runvm, "pwd", cwd=Path("/tmp"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().strip() == f"/home/{runvm.vmenv.user}"
    assert b"/tmp is not shared" in r.stderr


def test_a_death_by_signal_is_128_plus_n(runvm):
    r = dgxvm_run(runvm, "sh", "-c", "kill -USR2 $$")
    assert r.returncode == 128 + signal.SIGUSR2, r.stderr


def test_status_255_is_the_commands_own_not_a_transport_failure(runvm):
    r = dgxvm_run(runvm, "sh", "-c", "exit 255")
    assert r.returncode == 255, r.stderr
    assert b"dgxvm" not in r.stderr


def test_a_command_not_found_is_127(runvm):
    r = dgxvm_run(runvm, "no-such-command-here")
    assert r.returncode == 127


# -- signals and death ----------------------------------------------------------------------
def _start(vm, script: str) -> subprocess.Popen:
    return subprocess.Popen(user_argv(vm, "run", "--", "sh", "-c", script),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=str(vm.work))


def _read_until(proc: subprocess.Popen, want: bytes, timeout: float = 60) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    while want not in buf:
        left = deadline - time.monotonic()
        assert left > 0, f"no {want!r} after {timeout}s; got {buf!r}"
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            assert chunk, f"EOF before {want!r}; got {buf!r}"
            buf += chunk
    return buf


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1,
                                 signal.SIGUSR2])
def test_a_signal_to_dgxvm_run_reaches_the_commands_handler(runvm, sig):
    name = sig.name.removeprefix("SIG")
    p = _start(runvm, f"trap 'echo got {name}; exit 3' {name}; echo ready; "
                      "while :; do sleep 0.2; done")
    _read_until(p, b"ready")
    os.kill(_dgxvm_pid(p.pid), sig)
    out, err = p.communicate(timeout=60)
    assert b"got " + name.encode() in out, err
    assert p.returncode == 3, err


def test_sigkill_of_dgxvm_run_leaves_nothing_running_in_the_guest(runvm):
    p = _start(runvm, "echo ready; sleep 4242; echo never")
    _read_until(p, b"ready")
    assert "sleep 4242" in guest_ps(runvm)
    os.kill(_dgxvm_pid(p.pid), signal.SIGKILL)   # dgxvm only: its ssh clients live on
    p.wait(timeout=30)
    ps = wait_gone(runvm, "sleep 4242", timeout=20)
    assert "sleep 4242" not in ps, ps


def _dgxvm_pid(top: int, timeout: float = 10) -> int:
    """The dgxvm process below ``top`` (ip netns exec -> runuser -> env -> python): signals go
    to it, as Slurm's go to the step's processes, not to runuser (which has its own ideas)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in Path("/proc").iterdir():
            if not child.name.isdigit():
                continue
            try:
                cmdline = (child / "cmdline").read_bytes()
                ppid = int((child / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            # the harness's copy runs `python3 -c '...slurm_dgxvm.cli.main...'`, the package's
            # `/usr/bin/python3 /usr/bin/dgxvm`
            argv = cmdline.split(b"\0")
            is_dgxvm = b"slurm_dgxvm.cli.main" in cmdline or \
                any(a.endswith(b"/dgxvm") for a in argv[:2])
            if is_dgxvm and _descends(ppid, top):
                return int(child.name)
        time.sleep(0.05)
    raise AssertionError(f"no dgxvm process below {top}")


def _descends(pid: int, top: int) -> bool:
    while pid > 1:
        if pid == top:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


def test_a_process_left_in_the_background_is_stopped_when_the_command_ends(runvm):
    r = dgxvm_run(runvm, "sh", "-c", "sleep 4343 >/dev/null 2>&1 & echo started")
    assert r.returncode == 0, r.stderr
    ps = wait_gone(runvm, "sleep 4343", timeout=10)
    assert "sleep 4343" not in ps, ps


# -- the job's shared connection (access.connection) ------------------------------------------
def test_runs_on_a_dropbear_guest_make_their_own_connections(runvm):
    """The test guest's dropbear (Debian 12: 2022.83) may close a session opened while
    another's process exits (mkj/dropbear#321): its image's profile does not let runs share a
    connection, so eight runs at once each make their own, all succeed, and no master stays."""
    from concurrent.futures import ThreadPoolExecutor
    from slurm_dgxvm.lifecycle import sshmux
    vmdir = runvm.vmenv.state_dir / "vms" / runvm.name
    with ThreadPoolExecutor(8) as pool:
        runs = list(pool.map(lambda i: dgxvm_run(runvm, "echo", str(i)), range(8)))
    assert [(x.returncode, x.stdout) for x in runs] == [(0, f"{i}\n".encode())
                                                        for i in range(8)]
    assert sshmux.masters(vmdir, runvm.vmenv.uid) == []


# -- who may -------------------------------------------------------------------------------
def test_another_user_cannot_run_in_the_jobs_vm(runvm):
    r = subprocess.run(user_argv(runvm, "run", "--job", str(JOB), "--", "id", user="nobody"),
                       capture_output=True, timeout=60, cwd="/")
    assert r.returncode == 125
    assert f"job {JOB} has no VM of yours".encode() in r.stderr


def test_outside_a_job_is_a_clear_125(runvm):
    r = subprocess.run(user_argv(runvm, "run", "--", "true", job=False), capture_output=True,
                       timeout=60, cwd="/")
    assert r.returncode == 125
    assert b"no job" in r.stderr


# -- the shell -----------------------------------------------------------------------------
class PtyReader:
    """What a program under a pseudo-terminal said so far (``buf``); :meth:`until` reads until
    ``want`` is in it, failing after ``timeout`` or when the program ends first."""

    def __init__(self, fd: int, timeout: float = 60):
        self.fd, self.timeout, self.buf = fd, timeout, b""

    def until(self, want: bytes) -> None:
        deadline = time.monotonic() + self.timeout
        while want not in self.buf:
            left = deadline - time.monotonic()
            assert left > 0, f"no {want!r}; got {self.buf!r}"
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    self.buf += os.read(self.fd, 4096)
                except OSError as e:   # EIO: the other side is gone
                    raise AssertionError(f"the shell ended; it said {self.buf!r}") from e


def test_dgxvm_shell_under_a_terminal(runvm):
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(str(runvm.work))
        argv = user_argv(runvm, "shell")
        os.execvp(argv[0], argv)
    try:
        reader = PtyReader(fd)
        until = reader.until
        os.write(fd, b"tty >/dev/null && echo TTY-$((6*7)); pwd\n")
        until(b"TTY-42")
        until(str(runvm.work).encode())
        os.write(fd, b"sleep 50; echo after\n")
        wait_running(runvm, "sleep 50", timeout=30)   # the sleep runs, then is interrupted
        os.write(fd, b"\x03")           # Ctrl-C interrupts the sleep, not the shell
        os.write(fd, b"echo still-$((1+1))\n")
        until(b"still-2")
        os.write(fd, b"exit 5\n")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 5, reader.buf
    finally:
        os.close(fd)


# -- containers -----------------------------------------------------------------------------
REGISTRY_PORT = 5000    # inside the libvirt stack's namespace (config: insecure_registries)


@pytest.fixture(scope="module")
def image(runvm, tmp_path_factory):
    """A busybox image in Debian's docker-registry, listening on the namespace's loopback."""
    from harness.registry import LocalRegistry, build_image
    work = tmp_path_factory.mktemp("registry")
    reg = LocalRegistry(work / "reg", port=REGISTRY_PORT, netns=runvm.vmenv.netns)
    reg.start()
    try:
        digest = build_image(reg, "test/busy", "1", work / "build", marker="busy-1")
        yield type("Img", (), {"ref": f"{reg.endpoint}/test/busy:1", "digest": digest,
                               "registry": reg})()
    finally:
        reg.stop()


def container_run(vm, image_ref, *cmd, flags=(), timeout=180):
    argv = user_argv(vm, "run", "--container-image", image_ref, *flags, "--", *cmd)
    return subprocess.run(argv, input=b"", capture_output=True, timeout=timeout,
                          cwd=str(vm.work))


def test_a_command_runs_in_the_image_as_the_user_in_the_shared_cwd(runvm, image):
    r = container_run(runvm, image.ref, "sh", "-c",
                      'cat /marker; echo; id -u; id -g; id -G; pwd; echo "$PATH"; '
                      'echo made > in-container; touch /etc/x 2>/dev/null && echo rootfs-writable;'
                      ' exit 4')
    assert r.returncode == 4, r.stderr
    marker, uid, gid, groups, cwd, path = r.stdout.decode().splitlines()[:6]
    assert marker == "busy-1"                          # the image's own file
    # pyxis's default: the job's user as themselves, with their groups (mpirun refuses root)
    assert (int(uid), int(gid)) == (runvm.vmenv.uid, runvm.vmenv.gid)
    assert set(map(int, groups.split())) == {runvm.vmenv.gid, GROUP}
    assert cwd == str(runvm.work)
    assert path == "/bin"                              # the image's PATH
    assert "rootfs-writable" not in r.stdout.decode()
    made = runvm.work / "in-container"
    assert made.read_text() == "made\n" and made.stat().st_uid == runvm.vmenv.uid


@pytest.mark.parametrize("flags", [(), ("--container-remap-root",), ("--container-writable",)],
                         ids=["own-uid", "remap-root", "writable"])
def test_tmp_and_var_tmp_are_fresh_and_writable_in_the_container(runvm, image, flags):
    """Scripts write scratch files (and executables: a helper an ``nc -e`` runs) to /tmp."""
    r = container_run(runvm, image.ref, "sh", "-c",
                      "ls -ldn /tmp /var/tmp; ls -A /tmp; printf '#!/bin/sh\\necho ran\\n' "
                      "> /tmp/x && chmod +x /tmp/x && /tmp/x && echo kept > /var/tmp/y && "
                      "cat /var/tmp/y", flags=flags)
    assert r.returncode == 0, (r.stdout, r.stderr)
    out = r.stdout.decode().splitlines()
    assert out[0].startswith("drwxrwxrwt") and out[1].startswith("drwxrwxrwt"), out
    assert out[2:] == ["ran", "kept"], out       # nothing there before: fresh


def test_remap_root_is_root_in_the_container_and_the_user_outside(runvm, image):
    r = container_run(runvm, image.ref, "sh", "-c", "id -u; echo root > by-root",
                      flags=("--container-remap-root",))
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().split() == ["0"]
    made = runvm.work / "by-root"
    assert made.stat().st_uid == runvm.vmenv.uid       # root in there is the user out here


def test_root_in_an_own_uid_container_is_no_one_outside_it(runvm, image):
    """The container's root is a subordinate uid of the guest: not the user, not the guest's
    root. The image's files are the user's, so root there owns nothing it could use."""
    r = container_run(runvm, image.ref, "sh", "-c",
                      "cat /proc/self/uid_map; ls -ln /marker")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    maps = sorted(tuple(map(int, line.split())) for line in lines[:2])
    assert maps == [(0, 1, 1), (runvm.vmenv.uid, 0, 1)]   # in the helper's namespace
    assert lines[2].split()[2] == str(runvm.vmenv.uid)     # the image's files: the user's


def test_the_second_run_of_an_image_pulls_nothing(runvm, image):
    r = container_run(runvm, image.ref, "sh", "-c", "true")   # the image has busybox sh only
    assert r.returncode == 0, r.stderr
    blobs = image.registry.count("GET", r"/blobs/")
    r = container_run(runvm, image.ref, "sh", "-c", "cat /marker")
    assert r.returncode == 0 and r.stdout == b"busy-1", r.stderr
    assert image.registry.count("GET", r"/blobs/") == blobs


def test_an_image_the_registry_does_not_have_is_a_clear_125(runvm, image):
    ref = image.ref.replace("busy:1", "nope:1")
    r = container_run(runvm, ref, "sh", "-c", "true")
    assert r.returncode == 125
    assert b"test/nope" in r.stderr


def test_a_signal_reaches_the_containers_process(runvm, image):
    p = subprocess.Popen(user_argv(runvm, "run", "--container-image", image.ref, "--", "sh",
                                   "-c", "trap 'echo got USR1; exit 6' USR1; echo ready; "
                                         "while :; do sleep 0.2; done"),
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, cwd=str(runvm.work))
    _read_until(p, b"ready", timeout=120)
    os.kill(_dgxvm_pid(p.pid), signal.SIGUSR1)
    out, err = p.communicate(timeout=60)
    assert b"got USR1" in out, err
    assert p.returncode == 6, err


def test_sigkill_of_dgxvm_run_leaves_no_container_running(runvm, image):
    p = subprocess.Popen(user_argv(runvm, "run", "--container-image", image.ref, "--", "sh",
                                   "-c", "trap '' TERM; echo ready; sleep 4545"),
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, cwd=str(runvm.work))
    _read_until(p, b"ready", timeout=120)
    assert "sleep 4545" in guest_ps(runvm)
    os.kill(_dgxvm_pid(p.pid), signal.SIGKILL)
    p.wait(timeout=30)
    ps = wait_gone(runvm, "sleep 4545", timeout=30)
    assert "sleep 4545" not in ps, ps


def test_a_command_the_image_does_not_have_is_127_with_runcs_message(runvm, image):
    r = container_run(runvm, image.ref, "no-such-command-here")
    assert r.returncode == 127
    assert b"no-such-command-here" in r.stderr and b"not found" in r.stderr


def test_the_user_has_a_name_in_an_own_uid_container(runvm, image):
    r = container_run(runvm, image.ref, "sh", "-c", "whoami; id -gn")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().split() == [runvm.vmenv.user, runvm.vmenv.user]


def guest_layers(vm) -> list[str]:
    """What the guest keeps of writable containers (the helper's layer directory)."""
    r = dgxvm_run(vm, "sh", "-c", 'ls -a "/var/tmp/.dgxvm-$(id -u)" 2>/dev/null; true')
    assert r.returncode == 0, r.stderr
    return sorted(set(r.stdout.decode().split()) - {".", ".."})


def test_a_writable_container_changes_its_root_and_the_change_goes_with_the_run(runvm, image):
    r = container_run(runvm, image.ref, "sh", "-c",
                      "echo changed > /marker && mkdir -p /opt/new && cat /marker",
                      flags=("--container-writable",))
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"changed\n"
    layers = guest_layers(runvm)
    assert not any(n.startswith("run-") for n in layers), (layers, r.stderr)   # went with the run
    r = container_run(runvm, image.ref, "sh", "-c", "cat /marker; ls -d /opt/new")
    assert r.stdout.startswith(b"busy-1") and r.returncode != 0     # the image is untouched
    r = container_run(runvm, image.ref, "sh", "-c", "id -u; echo x > /etc/by-root",
                      flags=("--container-writable", "--container-remap-root"))
    assert r.returncode == 0 and r.stdout == b"0\n", r.stderr


def test_a_named_container_keeps_its_changes_across_runs_of_the_job(runvm, image):
    r = container_run(runvm, image.ref, "sh", "-c", "echo installed > /etc/tool",
                      flags=("--container-name", "env1"))
    assert r.returncode == 0, r.stderr
    # its layer is where the helper looks for it on every run: under the user's own uid (it
    # once took `id -u` inside the new namespace, 0 or 65534 depending on a race)
    assert "env1" in guest_layers(runvm)
    # pyxis's way: later runs name it, with or without the image
    r = container_run_named(runvm, "env1", "sh", "-c", "cat /etc/tool; whoami")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().split() == ["installed", runvm.vmenv.user]
    r = container_run(runvm, image.ref, "sh", "-c", "cat /etc/tool",
                      flags=("--container-name", "env1"))
    assert r.returncode == 0 and r.stdout == b"installed\n", r.stderr
    # another name is another container; an unnamed run sees the image as it is
    r = container_run(runvm, image.ref, "sh", "-c", "cat /etc/tool",
                      flags=("--container-name", "env2"))
    assert r.returncode != 0
    assert container_run(runvm, image.ref, "sh", "-c", "cat /etc/tool").returncode != 0
    r = container_run_named(runvm, "nope", "true")
    assert r.returncode == 125 and b"no container named nope" in r.stderr


def test_a_named_container_serves_one_run_at_a_time(runvm, image):
    p = subprocess.Popen(user_argv(runvm, "run", "--container-name", "busyenv",
                                   "--container-image", image.ref, "--", "sh", "-c",
                                   "echo ready; sleep 30"),
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, cwd=str(runvm.work))
    try:
        _read_until(p, b"ready", timeout=120)
        r = container_run_named(runvm, "busyenv", "sh", "-c", "true")
        assert r.returncode == 125 and b"container busyenv is in use" in r.stderr, r.stderr
    finally:
        os.kill(_dgxvm_pid(p.pid), signal.SIGTERM)
        p.communicate(timeout=60)
    r = container_run_named(runvm, "busyenv", "sh", "-c", "true")   # free once that run ended
    assert r.returncode == 0, r.stderr


def container_run_named(vm, name, *cmd, timeout=180):
    argv = user_argv(vm, "run", "--container-name", name, "--", *cmd)
    return subprocess.run(argv, input=b"", capture_output=True, timeout=timeout,
                          cwd=str(vm.work))


# -- flags checked first; root's run is the job's user's (issue 23, items 6 and 3) -------------
NO_REGISTRY = "127.0.0.1:5999/nowhere/image:1"     # nothing listens there, in the namespace


@pytest.mark.parametrize("flags, said", [
    (("--container-mounts=/tmp:",), "--container-mounts entry '/tmp:': destination '' is empty"),
    (("--container-env", "FOO,"), "--container-env 'FOO,': an empty name"),
    (("--container-readonly", "--container-writable"),
     "both --container-writable and --container-readonly were given"),
    # a fact of the VM's (its shares), still before the pull
    (("--container-mounts", "/etc:/hostetc"), "/etc is a host path the VM does not have"),
])
def test_a_bad_flag_is_told_at_once_not_after_a_pull(runvm, flags, said):
    t0 = time.monotonic()
    r = container_run(runvm, NO_REGISTRY, "true", flags=flags, timeout=60)
    took = time.monotonic() - t0
    err = r.stderr.decode()
    assert r.returncode == 125, err
    assert err.startswith("dgxvm: error: ") and said in err and err.count("\n") == 1, err
    assert "resolving" not in err and "reached" not in err     # no pull was begun
    assert took < 20, took                                     # no registry time-out waited


def root_run(vm, *args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    """``dgxvm run --job JOB ARGS`` as root, with only ``env`` (root's own session)."""
    argv = ["ip", "netns", "exec", vm.vmenv.netns, "env", "-i",
            f"DGXVM_CONFIG={vm.vmenv.config}", "LANG=C.UTF-8",
            *(f"{k}={v}" for k, v in env.items()), str(vm.exe), "run", "--job", str(JOB), *args]
    return subprocess.run(argv, input=b"", capture_output=True, timeout=180, cwd=str(cwd))


def etc_state() -> dict:
    """Every path under /etc with its inode, mtime and ctime (nothing followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk("/etc"):
        for name in [*dirnames, *filenames, None]:
            p = dirpath if name is None else os.path.join(dirpath, name)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            out[p] = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
    return out


@pytest.fixture
def root_session(runvm, tmp_path_factory):
    """Root's own session: a registry login of root's for the test registry in ~/.docker and
    in $DOCKER_CONFIG (a fake credential), XDG_RUNTIME_DIR and TMPDIR of root's, and skopeo
    found first as a wrapper that logs who ran it with which arguments."""
    import shutil
    base = Path(str(runvm.vmenv.base)) / "root-session"
    shutil.rmtree(base, ignore_errors=True)
    home, docker, bindir = base / "root-home", base / "root-docker", base / "bin"
    for d in (home / ".docker", docker):
        d.mkdir(parents=True, mode=0o700)
    login = json.dumps({"auths": {f"127.0.0.1:{REGISTRY_PORT}": {"auth": "cm9vdDpzZWNyZXQ="}}})
    for f in (home / ".docker" / "config.json", docker / "config.json"):
        f.write_text(login)
        f.chmod(0o600)
    bindir.mkdir(parents=True)
    base.chmod(0o755)
    bindir.chmod(0o755)
    log = base / "skopeo.log"
    log.touch()
    log.chmod(0o666)
    wrapper = bindir / "skopeo"
    wrapper.write_text(f'#!/bin/sh\nprintf \'%s %s\\n\' "$(id -u)" "$*" >> {log}\n'
                       f'exec {shutil.which("skopeo")} "$@"\n')
    wrapper.chmod(0o755)
    env = {"PATH": f"{bindir}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(home),
           "USER": "root", "DOCKER_CONFIG": str(docker), "XDG_RUNTIME_DIR": "/run/user/0",
           "TMPDIR": str(home)}
    try:
        yield type("Root", (), {"env": env, "log": log})()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_roots_run_into_a_users_job_runs_and_pulls_as_the_user(runvm, image, root_session,
                                                                tmp_path):
    from harness.registry import build_image
    uid = runvm.vmenv.uid
    digest = build_image(image.registry, "test/busy", "root", tmp_path / "build",
                         marker="busy-root")                   # not in the user's cache yet
    ref = f"{image.registry.endpoint}/test/busy:root"
    r = root_run(runvm, "--container-image", ref, "--", "sh", "-c", "id -u; cat /marker",
                 env=root_session.env, cwd=runvm.work)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().split() == [str(uid), "busy-root"]
    # pulled and unpacked by the user: every file of the new entry is theirs
    entry = runvm.vmenv.containers / str(uid) / "sha256" / digest.split(":")[1]
    owners = {os.lstat(os.path.join(d, n)).st_uid for d, ds, fs in os.walk(entry)
              for n in [*ds, *fs]}
    assert owners == {uid}, owners
    # skopeo ran as the user, anonymously: root's login (in ~/.docker and $DOCKER_CONFIG) unused
    runs = root_session.log.read_text().splitlines()
    assert runs and all(line.split()[0] == str(uid) for line in runs), runs
    assert all("no-creds" in line and "authfile" not in line for line in runs), runs


def test_roots_run_follows_none_of_the_users_symlinks(runvm, image, root_session):
    """The user plants symlinks in their own cache towards /etc; root's run (which is the
    user's) writes nothing there. The same run as root would have created
    /etc/dgxvm-probe-nologin (touching last-used), a lock file in /etc/dgxvm-probe-dir and the
    JSON file /etc/sudoers.d/busy@1 (remembering the tag)."""
    uid, gid = runvm.vmenv.uid, runvm.vmenv.gid
    r = container_run(runvm, image.ref, "sh", "-c", "true")   # the image in the user's cache
    assert r.returncode == 0, r.stderr
    cache = runvm.vmenv.containers / str(uid)
    entry = cache / "sha256" / image.digest.split(":")[1]
    refs = cache / "refs" / f"127.0.0.1:{REGISTRY_PORT}" / "test"
    nologin, probe_dir, sudoers = (Path("/etc/dgxvm-probe-nologin"), Path("/etc/dgxvm-probe-dir"),
                                   Path("/etc/sudoers.d"))
    assert not nologin.exists() and not probe_dir.exists()
    made_sudoers = not sudoers.exists()
    probe_dir.mkdir(mode=0o755)
    sudoers.mkdir(mode=0o750, exist_ok=True)
    planted = {entry / "last-used": nologin, cache / "locks": probe_dir, refs: sudoers}
    try:
        for link, to in planted.items():
            os.rename(link, f"{link}.real")
            os.symlink(to, link)
            os.lchown(link, uid, gid)
        before = etc_state()
        r = root_run(runvm, "--container-image", image.ref, "--", "sh", "-c", "id -u",
                     env=root_session.env, cwd=runvm.work)
        after = etc_state()
        changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
        assert {"nologin": nologin.exists(), "probe_dir": os.listdir(probe_dir),
                "sudoers.d": os.listdir(sudoers), "busy@1": (sudoers / "busy@1").exists(),
                "changed under /etc": changed} == {
            "nologin": False, "probe_dir": [], "sudoers.d": [], "busy@1": False,
            "changed under /etc": []}
        # the user's own cache refuses the user (their locks are root's /etc dir)
        assert r.returncode == 125, (r.stdout, r.stderr)
        assert b"/locks/sha256-" in r.stderr and b"Permission denied" in r.stderr, r.stderr
    finally:
        for link in planted:
            if link.is_symlink():
                link.unlink()
            os.rename(f"{link}.real", link)
        for p in (nologin,):
            if p.exists():
                p.unlink()
        for d in (probe_dir, *((sudoers,) if made_sudoers else ())):
            for child in d.iterdir():
                child.unlink()
            d.rmdir()
