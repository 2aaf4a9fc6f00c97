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

from harness.node import install_for_users
from test_dgxvm_run import _dgxvm_pid

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "guest-image" / "debian-cloud" / "build"
JOB = 990101
GROUP = 54322
IMAGE = "debcloud"


@pytest.fixture(scope="module")
def cloud_manifest() -> Path:
    t0 = time.monotonic()
    r = subprocess.run([str(BUILD)], capture_output=True, text=True, timeout=1500)
    if r.returncode != 0:
        pytest.fail(f"guest-image/debian-cloud/build failed ({r.returncode}):\n"
                    f"{r.stderr[-3000:]}")
    print(f"\ndebian-cloud image: {time.monotonic() - t0:.1f}s ({r.stderr.strip()[-200:]})")
    return Path(r.stdout.strip().splitlines()[-1]) / "manifest.json"


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
    exe = install_for_users(Path(str(vmenv.base)) / "dgxvm-for-users")
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

