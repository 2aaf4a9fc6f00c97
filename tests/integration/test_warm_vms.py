"""Warm VMs for real (slurm_dgxvm.lifecycle.warm): a VM booted ahead with no tenant, claimed by
a job whose placement is exactly its block: the job's user logs in with the job's key, its work
dir is served as that user, and nothing of the boot-ahead is left to it. A claim that cannot
be made, or fails part-way, leaves the job to a cold start with nothing leaked.
"""

from __future__ import annotations

import os
import time

import pytest

from slurm_dgxvm.ledger import Ledger
from test_vm_lifecycle import assert_nothing_left, ssh

pytestmark = pytest.mark.integration


@pytest.fixture()
def env(vmenv):
    from slurm_dgxvm import config as config_mod, lifecycle
    e = lifecycle.Env(config_mod.load(str(vmenv.config)))
    yield e
    (vmenv.state_dir / "failpoints").unlink(missing_ok=True)


def job_request(vmenv, job_id: int, count: int, work):
    from slurm_dgxvm import lifecycle
    from slurm_dgxvm.placement import Request
    return lifecycle.CreateRequest(
        name=f"job-{job_id}", placement=Request(count=count), owner="job", job_id=job_id,
        user=vmenv.user, uid=vmenv.uid, gid=vmenv.gid, home=f"/home/{vmenv.user}",
        workdir=str(work))


def workdir(vmenv, name):
    work = vmenv.workdir / name
    work.mkdir(exist_ok=True)
    os.chown(work, vmenv.uid, vmenv.gid)
    (work / "hello").write_text("from the host\n")
    return work


def test_a_job_claims_a_warm_vm_and_runs_as_its_own_user_with_its_share(vmenv, env):
    from slurm_dgxvm import lifecycle
    from slurm_dgxvm.lifecycle import warm
    from slurm_dgxvm.placement import Request
    work = workdir(vmenv, "warm-a")
    rec = warm.boot(env, Request(count=2))
    try:
        assert warm.is_warm(rec.name) and rec.extra["warm"] == "waiting"
        d = vmenv.state_dir / "vms" / rec.name
        assert not (d / "id_ed25519").exists(), "a warm VM has a key someone could log in with"
        t0 = time.monotonic()
        out = warm.claim(env, job_request(vmenv, 501, 2, work))
        claim_s = time.monotonic() - t0
        assert out.vm is not None, out.why
        assert out.vm.name == rec.name and out.vm.job_id == 501 and out.vm.user == vmenv.user
        keys = Ledger(vmenv.state_dir).read().allocations
        assert set(keys) == {"job:501"} and keys["job:501"].domain == rec.name
        assert keys["job:501"].gpu_pcis == rec.allocation.gpu_pcis
        r = ssh(vmenv, rec.name, f"id -u; hostname; cat {work}/hello; echo made > {work}/made; "
                                 f"cat /root/.ssh/authorized_keys 2>&1 | wc -c; "
                                 f"grep -c . /etc/passwd")
        assert r.returncode == 0, r.stderr
        lines = r.stdout.split("\n")
        assert lines[0] == str(vmenv.uid) and lines[2] == "from the host"
        st = (work / "made").stat()
        assert (st.st_uid, st.st_gid) == (vmenv.uid, vmenv.gid), "the share is not the user's"
        print(f"claim took {claim_s:.2f}s")
        # a second claim of the same VM (another job racing for it) finds it taken
        again = warm.claim(env, job_request(vmenv, 502, 2, work))
        assert again.vm is None and "no warm VM" in again.why
    finally:
        lifecycle.delete(env, rec.name, job_id=501)
    assert_nothing_left(vmenv, [rec.name])


def test_a_job_of_another_block_deletes_the_warm_vm_in_its_way(vmenv, env):
    from slurm_dgxvm.lifecycle import warm
    from slurm_dgxvm.placement import Request
    from slurm_dgxvm import lifecycle
    work = workdir(vmenv, "warm-b")
    rec = warm.boot(env, Request(count=2))
    try:
        # a 1-GPU job fits beside it and leaves it warm; a 16-GPU job has no room but its
        # block
        beside = warm.claim(env, job_request(vmenv, 506, 1, work))
        assert beside.vm is None and beside.destroyed == () and list(warm.waiting(env)) \
            == [rec.name], beside
        out = warm.claim(env, job_request(vmenv, 503, 16, work))
        assert out.vm is None and out.destroyed == (rec.name,), out
        assert "in the way" in out.why
    finally:
        if env.vms.exists(rec.name):
            lifecycle.delete(env, rec.name)
    assert_nothing_left(vmenv, [rec.name])


def test_a_job_cancels_the_boot_of_a_warm_vm_in_its_way_rather_than_wait_for_it(vmenv, env):
    """A refill is booting a 2-GPU warm VM when a 16-GPU job's claim finds it in its way: the
    boot stops at its next poll (BootCancelled) and undoes itself, the warm VM never having
    become ready; the job goes cold once that undo is done, and nothing of the VM is left."""
    import subprocess
    from conftest import DGXVM
    from slurm_dgxvm.lifecycle import warm
    work = workdir(vmenv, "warm-e")
    run_env = {k: v for k, v in os.environ.items()
               if k not in ("DGXVM_STATE_DIR", "DGXVM_SYSFS_ROOT")}
    boot = subprocess.Popen([str(DGXVM), "warm", "boot", "--gpu-count", "2"], text=True,
                            env={**run_env, "DGXVM_CONFIG": str(vmenv.config)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    name = None
    try:
        deadline = time.monotonic() + 120
        while name is None and time.monotonic() < deadline:    # its guest is booting
            for n in warm.waiting(env):
                rec = env.vms.load(n)
                if rec is not None and rec.state == "creating" and vmenv.virsh(
                        "domstate", n, check=False).stdout.strip() == "running":
                    name = n
            time.sleep(0.1)
        assert name is not None, "the warm boot never reached its guest's boot"
        out = warm.claim(env, job_request(vmenv, 505, 16, work))
        assert out.vm is None and out.destroyed == (name,) and "in the way" in out.why, out
        stdout, stderr = boot.communicate(timeout=120)
        assert boot.returncode == 6, (stdout, stderr)
        assert f"vm {name}: boot cancelled: a job needs its devices" in stderr, stderr
    finally:
        if boot.poll() is None:
            boot.kill()
            boot.wait()
    assert_nothing_left(vmenv, [name])


@pytest.mark.parametrize("point", ["claim:committed", "claim:plugged", "claim:applied"])
def test_a_claim_that_fails_part_way_deletes_the_vm_and_leaks_nothing(vmenv, env, point):
    from slurm_dgxvm.lifecycle import warm
    from slurm_dgxvm.placement import Request
    work = workdir(vmenv, "warm-c")
    rec = warm.boot(env, Request(count=1))
    fp = vmenv.state_dir / "failpoints"
    fp.write_text(f"{point} {rec.name} fail\n")
    os.chmod(fp, 0o644)
    out = warm.claim(env, job_request(vmenv, 504, 1, work))
    assert out.vm is None and f"fault point {point}" in out.why, out
    assert_nothing_left(vmenv, [rec.name])


def test_root_in_one_jobs_warm_vm_leaves_nothing_for_the_next_job(vmenv, env):
    """Guest root of job A plants what would fake the next claim or spy on the next tenant (a
    replaced qemu-ga wrapper, a login hook, a file in /etc); the next warm VM, booted after A's
    VM is deleted (even under the same name), has none of it, and job B's claim works."""
    import libvirt
    from slurm_dgxvm import lifecycle
    from slurm_dgxvm.lifecycle import warm
    from slurm_dgxvm.placement import Request
    from slurm_dgxvm.virt import hypervisor
    work = workdir(vmenv, "warm-d")
    first = warm.boot(env, Request(count=1))
    assert warm.claim(env, job_request(vmenv, 601, 1, work)).vm is not None
    conn = libvirt.open(vmenv.uri)
    try:
        plant = ("echo planted > /etc/planted && echo 'echo claimed; exit 0' > "
                 "/usr/lib/dgxvm/seed.sh && echo 'cat /etc/shadow > /tmp/x # dgxvm-planted' >> /etc/profile")
        code, out = hypervisor.agent_exec(conn.lookupByName(first.name),
                                          ["/bin/sh", "-c", plant], timeout_s=30, what="plant")
        assert code == 0, out
    finally:
        conn.close()
    lifecycle.delete(env, first.name, job_id=601)
    second = warm.boot(env, Request(count=1))
    try:
        assert second.name == first.name and second.uuid != first.uuid
        out = warm.claim(env, job_request(vmenv, 602, 1, work))
        assert out.vm is not None, out.why
        r = ssh(vmenv, second.name, "cat /etc/planted 2>&1; "
                                    "grep -c dgxvm-planted /etc/profile 2>/dev/null || echo 0; "
                                    "grep -c seed_account /usr/lib/dgxvm/seed.sh")
        lines = r.stdout.split("\n")
        assert "No such file" in lines[0] and lines[1] == "0" and int(lines[2]) > 0, r.stdout
    finally:
        lifecycle.delete(env, second.name, job_id=602)
    assert_nothing_left(vmenv, [second.name])
