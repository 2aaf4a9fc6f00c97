"""The Debian 12 cloud guest (guest-image/debian-cloud): systemd, real cloud-init reading dgxvm's
NoCloud seed, OpenSSH, qemu-guest-agent and podman, booted by its own boot loader. One VM (named
as job JOB's VM) for every case, booted once per module; `dgxvm run` reaches it as the job's
ordinary user, the way a batch script does. What each case checks is what a site relies on when
it brings such an image: the seed is applied by cloud-init exactly as the test guest's init
applies it (user, groups, key, pinned host key, hostname, the shares and their options), the
guest is ready only once it is, and `dgxvm run` works there as it does on the test guest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from harness.node import dgxvm_for_users
from test_dgxvm_run import PtyReader, _dgxvm_pid

JOB = 990101
GROUP = 54322
IMAGE = "debcloud"


@pytest.fixture(scope="module")
def cloudvm(vmenv, cloud_manifest):
    from slurm_dgxvm import config as config_mod
    from slurm_dgxvm import lifecycle
    from slurm_dgxvm.placement import Request
    from slurm_dgxvm.slurm.job import domain_for

    r = vmenv.dgxvm("image", "install", str(cloud_manifest), "--name", IMAGE)
    assert r.returncode == 0, r.stderr
    # systemd, cloud-init (python) and podman want more than the test guest's 384 MiB
    config = vmenv.base / "dgxvm-cloud.toml"
    config.write_text(vmenv.config_text.replace("fit_memory_mib = 384", "fit_memory_mib = 1024"))
    os.chmod(config, 0o644)
    env = lifecycle.Env(config_mod.load(str(config)))
    name = domain_for(env.cfg, JOB)
    work = vmenv.workdir / "cloud"
    work.mkdir(exist_ok=True)
    os.chown(work, vmenv.uid, vmenv.gid)
    exe = dgxvm_for_users(Path(str(vmenv.base)) / "dgxvm-for-users")
    req = lifecycle.CreateRequest(
        name=name, placement=Request(count=2), owner="job", job_id=JOB, user=vmenv.user,
        uid=vmenv.uid, gid=vmenv.gid, groups=(GROUP,), home=f"/home/{vmenv.user}",
        workdir=str(work), image=IMAGE)
    t0 = time.monotonic()
    rec = lifecycle.create(env, req)
    print(f"\ndebian-cloud VM {name}: define to ready {time.monotonic() - t0:.1f}s "
          f"(boot_s {rec.boot_s})")
    vm = type("CloudVm", (), {})()
    vm.env, vm.name, vm.rec, vm.work, vm.exe, vm.vmenv, vm.config = (
        env, name, rec, work, exe, vmenv, config)
    try:
        yield vm
    finally:
        lifecycle.delete(env, name)
        vmenv.dgxvm("image", "remove", IMAGE)


def user_argv(vm, *args: str) -> list[str]:
    envs = [f"DGXVM_CONFIG={vm.config}", "PATH=/usr/bin:/bin", "LANG=C.UTF-8",
            f"SLURM_JOB_ID={JOB}"]
    return ["ip", "netns", "exec", vm.vmenv.netns, "runuser", "-u", vm.vmenv.user, "--",
            "env", "-i", *envs, str(vm.exe), *args]


def dgxvm_run(vm, *cmd: str, input: bytes = b"", timeout: float = 180):
    return subprocess.run(user_argv(vm, "run", "--", *cmd), input=input, capture_output=True,
                          timeout=timeout, cwd=str(vm.work))


def test_cloud_init_applied_the_seed_and_said_so(cloudvm):
    """One look inside, as the job's user over the pinned host key (dgxvm run refuses a host
    key that is not the seed's: no trust on first use)."""
    from slurm_dgxvm.lifecycle.identity import hostname_for
    r = dgxvm_run(cloudvm, "sh", "-c",
                  "id -u; id -g; id -G; hostname; "
                  'grep " $0 " /proc/mounts; '
                  "test -x /usr/lib/dgxvm/dgxvm-guest && echo helper; "
                  "cat /run/cloud-init/status.json", str(cloudvm.work))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    uid, gid, groups, hostname, mount, helper = lines[:6]
    assert (int(uid), int(gid)) == (cloudvm.vmenv.uid, cloudvm.vmenv.gid)
    assert GROUP in set(map(int, groups.split()))
    assert hostname == hostname_for(cloudvm.name)
    fstype, options = mount.split()[2], mount.split()[3].split(",")
    assert fstype == "virtiofs" and "nosuid" in options and "nodev" in options, mount
    assert helper == "helper"
    # ready means cloud-init's init stages are done, without errors (the config and final
    # stages, where the seed has nothing, may still run: readiness does not wait for them)
    stages = json.loads("\n".join(lines[6:]))["v1"]
    for stage in ("init-local", "init"):
        assert stages[stage]["finished"] and not stages[stage]["errors"], stages
    assert stages["datasource"].startswith("DataSourceNoCloud"), stages
    # cloud-init's warnings go to the console: an "Invalid cloud-config" (schema) there means
    # a seed a newer cloud-init may refuse
    console = (cloudvm.vmenv.state_dir / "vms" / cloudvm.name / "console.log").read_text(
        errors="replace")
    assert "[WARNING]" not in console, [ln for ln in console.splitlines() if "WARNING" in ln]


def test_the_work_dir_is_shared_as_the_user(cloudvm):
    r = dgxvm_run(cloudvm, "sh", "-c", "echo from-cloud > made-in-cloud-guest")
    assert r.returncode == 0, r.stderr
    made = cloudvm.work / "made-in-cloud-guest"
    assert made.read_text() == "from-cloud\n" and made.stat().st_uid == cloudvm.vmenv.uid


def test_dgxvm_run_streams_statuses_and_arguments_on_a_systemd_guest(cloudvm):
    r = dgxvm_run(cloudvm, "sh", "-c", 'echo out; echo err >&2; printf "[%s]" "$@"; exit 9',
                  "argv0", "a b", "it's", "*")
    assert r.returncode == 9
    assert r.stdout == b"out\n[a b][it's][*]" and r.stderr == b"err\n"
    assert dgxvm_run(cloudvm, "sh", "-c", "kill -USR2 $$").returncode == 128 + signal.SIGUSR2
    assert dgxvm_run(cloudvm, "no-such-command-here").returncode == 127
    data = bytes(range(256)) * 1024
    r = dgxvm_run(cloudvm, "cat", input=data)
    assert r.returncode == 0 and r.stdout == data


def test_sigkill_of_dgxvm_run_leaves_nothing_running_in_a_systemd_guest(cloudvm):
    p = subprocess.Popen(user_argv(cloudvm, "run", "--", "sh", "-c",
                                   "trap '' TERM; echo ready; sleep 4646"),
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, cwd=str(cloudvm.work))
    assert p.stdout.readline() == b"ready\n"
    os.kill(_dgxvm_pid(p.pid), signal.SIGKILL)
    p.wait(timeout=30)
    deadline = time.monotonic() + 30
    while True:
        r = dgxvm_run(cloudvm, "sh", "-c", "ps -eo args | grep -c '[s]leep 4646' || true")
        if r.stdout.strip() == b"0" or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert r.stdout.strip() == b"0", r.stdout



# -- the job's shared connection (access.connection): OpenSSH multiplexes ---------------------
def root_run(vm, *args: str) -> subprocess.CompletedProcess:
    """``dgxvm run --job JOB ARGS`` as root."""
    argv = ["ip", "netns", "exec", vm.vmenv.netns, "env", "-i", f"DGXVM_CONFIG={vm.config}",
            "PATH=/usr/bin:/bin", "LANG=C.UTF-8", str(vm.exe), "run", "--job", str(JOB), *args]
    return subprocess.run(argv, input=b"", capture_output=True, timeout=180, cwd=str(vm.work))


def test_the_jobs_runs_share_one_connection_that_the_vms_teardown_stops(cloudvm):
    """The image's profile says its sshd multiplexes (shared_connection "yes"): the user's
    runs reuse one ssh master, sixteen at once included (beyond OpenSSH's default of 10
    sessions a connection; the seed raises it); root's run into the job makes its own and
    leaves none; the VM's teardown kills the master (sshmux.stop_masters, what delete calls),
    and the next run starts another."""
    from concurrent.futures import ThreadPoolExecutor
    from slurm_dgxvm.lifecycle import sshmux
    vmdir = cloudvm.vmenv.state_dir / "vms" / cloudvm.name
    uid = cloudvm.vmenv.uid
    sshmux.stop_masters(vmdir, uid)                  # none from an earlier case
    assert sshmux.masters(vmdir, uid) == []
    for _ in range(2):                               # the first round starts the master
        with ThreadPoolExecutor(16) as pool:
            runs = list(pool.map(lambda i: dgxvm_run(cloudvm, "echo", str(i)), range(16)))
        assert [(x.returncode, x.stdout, x.stderr) for x in runs] == [
            (0, f"{i}\n".encode(), b"") for i in range(16)]
        first = sshmux.masters(vmdir, uid)
        assert len(first) == 1, first
    r = dgxvm_run(cloudvm, "echo", "one")
    assert (r.returncode, r.stdout) == (0, b"one\n"), r.stderr
    assert sshmux.masters(vmdir, uid) == first       # the same process serves the next
    # another user on the node cannot reach the master: its socket is in the user's 0700 dir
    sockets = list(Path(f"/tmp/dgxvm-{uid}").glob(f"*-{JOB}-*.ssh"))
    assert len(sockets) == 1, sockets
    probe = subprocess.run(
        ["runuser", "-u", "nobody", "--", "python3", "-c",
         "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])",
         str(sockets[0])], capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "PermissionError" in probe.stderr, probe.stderr
    r = root_run(cloudvm, "--", "id", "-u")
    assert (r.returncode, r.stdout) == (0, f"{uid}\n".encode()), r.stderr
    assert sshmux.masters(vmdir, uid) == first       # root's run made its own and ended it
    assert sshmux.stop_masters(vmdir, uid) == 1
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{first[0]}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{first[0]}")
    r = dgxvm_run(cloudvm, "echo", "again")           # its socket is stale: a new master
    assert (r.returncode, r.stdout) == (0, b"again\n"), r.stderr
    again = sshmux.masters(vmdir, uid)
    assert len(again) == 1 and again != first


def test_a_shared_connection_directory_of_another_user_is_not_used(cloudvm):
    """Another user made the user's socket directory under the run's $TMPDIR: the run makes
    its own connection, never one through that directory, and works."""
    import shutil
    import tempfile
    from slurm_dgxvm.lifecycle import sshmux
    vmdir = cloudvm.vmenv.state_dir / "vms" / cloudvm.name
    uid = cloudvm.vmenv.uid
    sshmux.stop_masters(vmdir, uid)
    tmp = Path(tempfile.mkdtemp(prefix="dgxvm-sq-", dir="/tmp"))     # short: a socket's
    try:
        tmp.chmod(0o1777)
        squat = tmp / f"dgxvm-{uid}"
        squat.mkdir()
        squat.chmod(0o777)                           # root's, open to all
        argv = user_argv(cloudvm, "run", "--", "echo", "own")
        argv.insert(argv.index(str(cloudvm.exe)), f"TMPDIR={tmp}")
        r = subprocess.run(argv, input=b"", capture_output=True, timeout=180,
                           cwd=str(cloudvm.work))
        assert (r.returncode, r.stdout) == (0, b"own\n"), r.stderr
        assert list(squat.iterdir()) == []
        assert sshmux.masters(vmdir, uid) == []
    finally:
        shutil.rmtree(tmp)


# -- containers with podman, the image's runtime (containers.podman) -----------------------
REGISTRY_PORT = 5000    # inside the libvirt stack's namespace (config: insecure_registries)


@pytest.fixture(scope="module")
def image(cloudvm, tmp_path_factory):
    """A busybox image in Debian's docker-registry, on the namespace's loopback."""
    from harness.registry import LocalRegistry, build_image
    work = tmp_path_factory.mktemp("cloud-registry")
    reg = LocalRegistry(work / "reg", port=REGISTRY_PORT, netns=cloudvm.vmenv.netns)
    reg.start()
    try:
        build_image(reg, "test/busy", "1", work / "build", marker="busy-1")
        yield f"{reg.endpoint}/test/busy:1"
    finally:
        reg.stop()


def podman_run(vm, image_ref, *cmd, flags=(), input=b"", env=(), timeout=240):
    argv = user_argv(vm, "run", "--container-image", image_ref, *flags, "--", *cmd)
    i = argv.index(str(vm.exe))
    argv[i:i] = list(env)
    return subprocess.run(argv, input=input, capture_output=True, timeout=timeout,
                          cwd=str(vm.work))


def guest_leftovers(vm) -> list[str]:
    """What a podman run could leave in the guest: podman, conmon or a pause process of the
    user's, a container's process, the runs' state directories."""
    r = dgxvm_run(vm, "sh", "-c",
                  "ps -u \"$(id -u)\" -o args= | grep -E '^(podman|/usr/bin/podman|/usr/bin/conmon|"
                  "conmon|catatonit|/run/podman-init|sleep 47)' ; "
                  'ls "/tmp/.dgxvm-$(id -u)" | sed "s/^/dir /"; true')
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.decode().splitlines() if ln.strip()]
    dirs = [ln for ln in lines if ln.startswith("dir ")]
    assert len(dirs) >= 1, lines      # this check's own run directory is there
    return [ln for ln in lines if not ln.startswith("dir ")] + dirs[1:]


def test_podman_runs_the_container_as_the_user_with_groups_and_the_runc_profiles_maps(
        cloudvm, image):
    r = podman_run(cloudvm, image, "sh", "-c",
                   'cat /marker; echo; id -u; id -g; id -G; whoami; id -gn; pwd; echo "$PATH"; '
                   'echo "[$SPACED][$MULTI]"; cat /proc/self/uid_map; '
                   "echo made > by-podman; touch /etc/x 2>/dev/null && echo rootfs-writable; "
                   "echo err >&2; exit 4",
                   env=("SPACED= a b ", "MULTI=one\ntwo"))
    assert r.returncode == 4, r.stderr
    assert r.stderr.endswith(b"err\n"), r.stderr
    out = r.stdout.decode().splitlines()
    marker, uid, gid, groups, who, group, cwd, path = out[:8]
    assert marker == "busy-1"
    assert (int(uid), int(gid)) == (cloudvm.vmenv.uid, cloudvm.vmenv.gid)
    assert set(map(int, groups.split())) == {cloudvm.vmenv.gid, GROUP}
    assert (who, group) == (cloudvm.vmenv.user, cloudvm.vmenv.user)
    assert cwd == str(cloudvm.work) and path == "/bin"
    assert out[8:10] == ["[ a b ][one", "two]"]
    maps = sorted(tuple(map(int, line.split())) for line in out[10:12])
    assert maps == [(0, 1, 1), (cloudvm.vmenv.uid, 0, 1)]
    assert "rootfs-writable" not in out
    made = cloudvm.work / "by-podman"
    assert made.read_text() == "made\n" and made.stat().st_uid == cloudvm.vmenv.uid
    # podman's state went with the run: no podman, conmon or pause process, no run directory
    left = guest_leftovers(cloudvm)
    assert left == [], "\n".join(left)


def test_podman_streams_stdin_and_statuses(cloudvm, image):
    data = bytes(range(256)) * 512
    r = podman_run(cloudvm, image, "sh", "-c", "cat", input=data)   # busybox: cat is sh's
    assert r.returncode == 0 and r.stdout == data, r.stderr
    r = podman_run(cloudvm, image, "no-such-command-here")
    assert r.returncode == 127 and b"no-such-command-here" in r.stderr
    # a death by signal in the container (not of its PID 1, which ignores what it has no
    # handler for) is 128+N, through the container's status
    r = podman_run(cloudvm, image, "sh", "-c", 'sh -c "kill -USR2 \\$\\$"; exit $?')
    assert r.returncode == 128 + signal.SIGUSR2, r.stderr


def _start(vm, image_ref, script, flags=()):
    p = subprocess.Popen(user_argv(vm, "run", "--container-image", image_ref, *flags, "--",
                                   "sh", "-c", script),
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, cwd=str(vm.work))
    line = p.stdout.readline()
    assert line == b"ready\n", (line, p.stderr.read() if p.poll() is not None else b"")
    return p


def test_signals_reach_the_podman_containers_command(cloudvm, image):
    p = _start(cloudvm, image, "trap 'echo got USR1; exit 6' USR1; echo ready; "
                               "while :; do sleep 0.2; done")
    os.kill(_dgxvm_pid(p.pid), signal.SIGUSR1)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 6 and b"got USR1" in out, err
    # SIGTERM (scancel, the time limit) reaches the command's handler too
    p = _start(cloudvm, image, "trap 'echo got TERM; exit 0' TERM; echo ready; "
                               "while :; do sleep 0.2; done")
    os.kill(_dgxvm_pid(p.pid), signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0 and b"got TERM" in out, err


def test_sigkill_of_dgxvm_run_leaves_no_podman_container_running(cloudvm, image):
    p = _start(cloudvm, image, "trap '' TERM; echo ready; sleep 4702")
    os.kill(_dgxvm_pid(p.pid), signal.SIGKILL)
    p.wait(timeout=30)
    deadline = time.monotonic() + 40
    while (left := guest_leftovers(cloudvm)) and time.monotonic() < deadline:
        time.sleep(1)
    assert left == [], "\n".join(left)


def test_writable_and_named_podman_containers(cloudvm, image):
    r = podman_run(cloudvm, image, "sh", "-c", "echo changed > /marker && cat /marker",
                   flags=("--container-writable",))
    assert r.returncode == 0 and r.stdout == b"changed\n", r.stderr
    r = podman_run(cloudvm, image, "sh", "-c", "echo installed > /etc/tool",
                   flags=("--container-name", "penv"))
    assert r.returncode == 0, r.stderr
    r = subprocess.run(user_argv(cloudvm, "run", "--container-name", "penv", "--", "sh", "-c",
                                 "cat /etc/tool /marker; echo; whoami"),
                       input=b"", capture_output=True, timeout=240, cwd=str(cloudvm.work))
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().split() == ["installed", "busy-1", cloudvm.vmenv.user]
    r = podman_run(cloudvm, image, "sh", "-c", "id -u; echo x > by-root-podman",
                   flags=("--container-remap-root",))
    assert r.returncode == 0 and r.stdout == b"0\n", r.stderr
    assert (cloudvm.work / "by-root-podman").stat().st_uid == cloudvm.vmenv.uid
    left = guest_leftovers(cloudvm)
    assert left == [], "\n".join(left)


def test_dgxvm_shell_in_a_podman_container_under_a_terminal(cloudvm, image):
    import pty
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(str(cloudvm.work))
        argv = user_argv(cloudvm, "shell", "--container-image", image)
        os.execvp(argv[0], argv)
    try:
        reader = PtyReader(fd, timeout=120)
        until = reader.until
        os.write(fd, b"tty >/dev/null && echo TTY-$((6*7)); cat /marker; echo; whoami\n")
        until(b"TTY-42")
        until(b"busy-1")
        until(cloudvm.vmenv.user.encode())
        os.write(fd, b"exit 3\n")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 3, reader.buf
    finally:
        os.close(fd)
