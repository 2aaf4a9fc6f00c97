"""A user's tree is the job's fault, never the node's (DESIGN 13), through the real Slurm cluster.

The job's user controls everything under their uid on the host: their container image cache
(``<cache_dir>/<uid>``), its modes, the FIFOs they plant in it, every process running as them
(``kill -STOP``). Each attack here is run as that user, for real: the job must be refused
(CANCELLED, the reason in its AdminComment and slurmd's log) with the node in service and
nothing left behind, and ``dgxvm reconcile`` must end within its deadline, naming the cache,
with no process of the user's that it started left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_dgxvm import config as config_mod
from slurm_dgxvm.lifecycle.cachedir import user_cache_dir
from slurm_dgxvm.shares.asuser import DEADLINE_S
from slurm_dgxvm.slurm.accounting import decode

from conftest import DGXVM
from test_slurm_jobs import nothing_left
from test_slurm_tenancy import EVIDENCE, refused

pytestmark = pytest.mark.integration

SLACK_S = 10.0          # a 2-core machine running libvirt, Slurm and a guest: generous


# -- helpers ---------------------------------------------------------------------------------------
def the_cache(node) -> Path:
    """``<cache_dir>/<uid>`` of the job's user, as the Prolog makes it (root's <cache_dir>)."""
    return user_cache_dir(config_mod.load(node.env.config), node.env.uid, node.env.gid)


def as_user(node, *argv: str) -> subprocess.CompletedProcess:
    """Run ``argv`` as the job's user (what they may do on the host, nothing more)."""
    return node.cluster.run(list(argv), user=node.env.user, timeout=60)


def root_dgxvm(node, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """dgxvm as root (an admin; the node-start unit) in the cluster's namespace."""
    return node.cluster.run(["env", f"DGXVM_CONFIG={node.env.config}", str(DGXVM), *args],
                            check=False, timeout=timeout)


def reconcile(node, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    """``dgxvm reconcile ARGS`` for this node, and the seconds it took."""
    t0 = time.monotonic()
    r = root_dgxvm(node, "reconcile", "--node", node.cluster.node_name, *args)
    return r, time.monotonic() - t0


def processes_of(uid: int) -> dict[int, str]:
    """``{pid: cmdline}`` of every process whose real uid is ``uid``."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
        if int(uids[0]) == uid:
            out[int(entry)] = cmd.strip()
    return out


def wait_for(what: str, cond, timeout: float = 120, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while not (got := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(step)
    return got


# -- the Prolog ------------------------------------------------------------------------------------
def test_a_cache_its_user_shut_out_refuses_the_job_and_the_node_stays_in_service(slurm_node):
    """Found for real: `chmod 000` of their own cache, then one GPU job, and the Prolog's pin
    of the cache as the user failed as ContainerCacheError: exit 1, the node drained."""
    node = slurm_node
    cache = the_cache(node)
    as_user(node, "chmod", "000", str(cache))
    try:
        job = node.jobs.sbatch(EVIDENCE, gpus=1)
        refused(node, job, f"container image cache '{cache}' is not shared into the VM")
        cause = decode(node.jobs.sacct([job])[job]["AdminComment"])["cause"]
        assert f"the job's user cannot read {cache} (Permission denied)" in cause, cause
        nothing_left(node)
    finally:
        as_user(node, "chmod", "700", str(cache))
    job = node.jobs.sbatch(EVIDENCE, gpus=1)                  # theirs again: a VM, the job runs
    node.jobs.wait_done([job], timeout=400)
    assert node.jobs.sacct([job])[job]["State"] == "COMPLETED"
    assert (node.jobs.workdir / f"ran-{job}").exists()
    node.cluster.wait_idle(timeout=120, drained_fails=True)
    nothing_left(node)


def stopped_prolog(job: int) -> int | None:
    """The pid of job ``job``'s ``dgxvm prolog`` once it is stopped at its fault point."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        state = stat.rsplit(")", 1)[1].split()[0]
        if state == "T" and b"prolog" in cmd and f"SLURM_JOB_ID={job}".encode() in env:
            return int(entry)
    return None


def test_a_cache_swapped_for_a_symlink_during_the_prolog_refuses_the_job(slurm_node):
    """Between the Prolog's pin and the VM's start (stopped there by a fault point), the
    cache's entry becomes a symlink to /etc: its virtiofsd refuses it, the job is refused,
    the node stays in service and nothing of the VM is left."""
    node = slurm_node
    cache = the_cache(node)
    aside = cache.with_name(f"{cache.name}.real")
    job = node.jobs.sbatch(EVIDENCE, gpus=1, extra=("--hold",))
    points = node.env.state_dir / "failpoints"          # root's: slurm_dgxvm/failpoints.py
    with open(points, "a") as f:
        f.write(f"after:define job-{job} stop\n")
    points.chmod(0o644)
    pid = None
    try:
        node.cluster.run(["scontrol", "release", str(job)])
        pid = wait_for(f"job {job}'s Prolog to stop after define", lambda: stopped_prolog(job))
        os.rename(cache, aside)
        cache.symlink_to("/etc")
        os.kill(pid, signal.SIGCONT)
        pid = None
        refused(node, job, f"container image cache '{cache}' is not shared into the VM: when "
                           f"the VM started: ")
        cause = decode(node.jobs.sacct([job])[job]["AdminComment"])["cause"]
        assert f"{cache} is a symbolic link" in cause, cause
        nothing_left(node)
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGCONT)
        if cache.is_symlink():
            cache.unlink()
        if aside.exists():
            os.rename(aside, cache)
        if points.exists():
            points.write_text("".join(ln + "\n" for ln in points.read_text().splitlines()
                                      if f" job-{job} " not in ln))
        node.cluster.run(["scancel", str(job)], check=False)


# -- dgxvm reconcile -------------------------------------------------------------------------------
STOPPER = r"""
import os, signal, sys, time
me, log = os.getpid(), open(sys.argv[1], "a")
while True:                    # every process of mine but me: stopped, as often as it runs
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) == me:
            continue
        try:               # /proc/PID of a non-dumpable process is root's: its status says
            with open(f"/proc/{p}/status") as f:
                uid = next(ln.split()[1] for ln in f if ln.startswith("Uid:"))
            if int(uid) != os.getuid():
                continue
            os.kill(int(p), signal.SIGSTOP)
            log.write(p + "\n"); log.flush()
        except OSError:
            pass
    time.sleep(0.002)
"""

BULK = 20000           # partial entries ahead of the FIFO lock: the read lives long enough to stop


def test_a_users_fifos_and_kill_stop_never_hang_reconcile(slurm_node):
    """Found for real: a FIFO at a pull lock, a FIFO in tmp/, or kill -STOP of the process
    reading the cache as the user, and `dgxvm reconcile` never ended (with --rebuild-ledger
    holding the ledger's lock, so every Prolog timed out). Now it ends within the deadline,
    names the cache, exit 0, and leaves none of the user's processes behind."""
    node = slurm_node
    uid = node.env.uid
    cache = the_cache(node)
    lock_hex, fifo_hex = "f" * 64, "e" * 64
    plant = (f"import os, shutil\nos.chdir({str(cache)!r})\n"
             f"for d in ('tmp', 'locks'):\n    shutil.rmtree(d, ignore_errors=True)\n"
             f"    os.mkdir(d)\n"
             f"os.mkdir('tmp/{lock_hex}.1.aa')\nos.mkfifo('locks/sha256-{lock_hex}.lock')\n"
             f"os.mkfifo('tmp/{fifo_hex}.2.bb')\n"
             f"for i in range({BULK}):\n    open('tmp/%064x.3.cc' % i, 'w').close()\n")
    as_user(node, sys.executable, "-c", plant)
    before, baseline = reconcile(node, "--dry-run")
    assert before.returncode == 0, before.stdout + before.stderr
    assert (f"image-cache {cache}: could not be read as uid {uid}: {cache}/locks/sha256-"
            f"{lock_hex}.lock is a FIFO (named pipe), not a regular file -> nothing: skipped"
            in before.stdout), before.stdout

    stopped_log = node.env.base / "stopped-pids"         # the user's to write (tmp_path is not)
    stopped_log.write_text("")
    os.chown(stopped_log, uid, node.env.gid)
    stopper = subprocess.Popen(["setpriv", f"--reuid={uid}", f"--regid={node.env.gid}",
                                "--init-groups", sys.executable, "-c", STOPPER,
                                str(stopped_log)], cwd="/")
    try:
        for args in (["--dry-run"], []):
            r, took = reconcile(node, *args)
            assert r.returncode == 0, r.stdout + r.stderr
            assert took < baseline + DEADLINE_S + SLACK_S, (took, baseline)
            [line] = [ln for ln in r.stdout.splitlines() if ln.startswith("image-cache")]
            assert line.startswith(f"image-cache {cache}: could not be read as uid {uid}: "), line
            assert (f"did not answer within {DEADLINE_S:g}s" in line
                    or "is a FIFO (named pipe)" in line), line
            assert line.endswith("-> nothing: skipped: nothing in it was touched: a user's "
                                 "files are theirs, not the node's state; the next run tries "
                                 "again"), line
    finally:
        stopper.kill()
        stopper.wait()
    stopped = {int(p) for p in stopped_log.read_text().split()}
    assert stopped, "the user's kill -STOP never met the process reading their cache"
    left = processes_of(uid)
    assert left == {}, f"processes of uid {uid} left: {left}"

    # the lock is a file again (as a pull makes it): the FIFO in tmp/ is swept, not waited on
    as_user(node, sys.executable, "-c",
            f"import os\nos.chdir({str(cache)!r})\nos.unlink('locks/sha256-{lock_hex}.lock')\n"
            f"for i in range({BULK}):\n    os.unlink('tmp/%064x.3.cc' % i)\n")
    r, _ = reconcile(node)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (f"image-cache {cache}: 2 partial entries in tmp/ of pulls that died (no pull holds "
            f"their lock) -> remove them with the cache's own sweep: done: removed "
            f"{fifo_hex}.2.bb, {lock_hex}.1.aa" in r.stdout), r.stdout
    assert as_user(node, "ls", "-A", str(cache / "tmp")).stdout == ""
    assert processes_of(uid) == {}
