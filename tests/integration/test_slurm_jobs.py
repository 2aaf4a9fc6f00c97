"""Slurm jobs end to end: a real Slurm 22.05 (munged, MariaDB + slurmdbd, slurmctld, slurmd)
with dgxvm's Prolog/Epilog, the real libvirt stack, the test guest under TCG, a simulated DGX-2.
Jobs are submitted by an ordinary user with sbatch --gres=gpu:N; nothing here calls dgxvm's
Prolog or Epilog directly.

Every test ends by checking that nothing is left: no domain, QEMU, VM directory (overlay, seed,
keys), ledger entry or DHCP reservation; and says in which state the node is.
"""

from __future__ import annotations

import json
import threading
import time

import libvirt
import pytest

from slurm_dgxvm.ledger import Ledger
from slurm_dgxvm.ranges import parse_index_list
from slurm_dgxvm.slurm.accounting import decode
from slurm_dgxvm.topology import SysfsRoot, discover
from slurm_dgxvm.virt import addresses, hypervisor

pytestmark = pytest.mark.integration

JOB_SCRIPT = """#!/bin/sh
# a job's batch script: find its VM, log in with the per-job key, leave evidence, hold a while
set -e
eval "$(dgxvm job --env)"
dgxvm job --json > vm-$SLURM_JOB_ID.json
$DGXVM_SSH 'echo "uid=$(id -u) host=$(hostname) gpus=$CUDA_VISIBLE_DEVICES"' > ssh-$SLURM_JOB_ID.txt
echo "address=$DGXVM_ADDRESS key=$DGXVM_KEY" >> ssh-$SLURM_JOB_ID.txt
sleep {hold}
"""


def nothing_left(node):
    env = node.env
    conn = libvirt.open(env.uri)
    try:
        doms = [d.name() for d in conn.listAllDomains()]
        own = {mac: host for mac, host in
               (hypervisor.reservations(conn, env.network) or {}).items()
               if not addresses.is_slot_mac(mac)}
    finally:
        conn.close()
    assert doms == [], f"domains left: {doms}"
    assert own == {}, f"DHCP reservations of a VM's own left: {own}"
    held = addresses.held(str(env.state_dir))
    assert held == {}, f"addresses still held: {held}"
    assert env.stack.qemu_pids() == [], "QEMU processes left"
    vms = env.state_dir / "vms"
    assert not (vms.exists() and any(vms.iterdir())), f"VM dirs left: {list(vms.iterdir())}"
    assert Ledger(env.state_dir).read().allocations == {}, "ledger entries left"


def wait_job_state(node, job, states, timeout=300):
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        r = node.cluster.run(["squeue", "-h", "-j", str(job), "-o", "%T|%r"], check=False)
        seen = r.stdout.strip()
        if seen.split("|")[0] in states:
            return seen
        time.sleep(0.3)
    raise AssertionError(f"job {job} not in {states} after {timeout}s (last: {seen!r})")


def slurmd_lines(node, job):
    text = node.cluster.slurmd_log.read_text(errors="replace")
    return [line for line in text.splitlines() if f"job {job} (" in line and "dgxvm" in line]


class Sampler(threading.Thread):
    """Looks at the running VMs every 0.3 s and checks that no two share a GPU or a CPU."""

    def __init__(self, node):
        super().__init__(daemon=True)
        self.node, self.stop_evt = node, threading.Event()
        self.snapshots, self.problems, self.max_vms, self.saw_pending = 0, [], 0, False

    def run(self):
        vms_dir = self.node.env.state_dir / "vms"
        while not self.stop_evt.is_set():
            held: dict[tuple[str, int], str] = {}
            recs = []
            for d in vms_dir.glob("*/record.json") if vms_dir.exists() else ():
                try:
                    recs.append(json.loads(d.read_text()))
                except (OSError, ValueError):
                    continue                  # being written or removed right now
            live = [r for r in recs if r["state"] in ("creating", "running")]
            self.max_vms = max(self.max_vms, len(live))
            for r in live:
                a = r["allocation"]
                for kind in ("gpus", "cpus"):
                    for x in a[kind]:
                        other = held.setdefault((kind, x), r["name"])
                        if other != r["name"]:
                            self.problems.append(f"{kind[:-1]} {x} in {other} and {r['name']}")
            self.snapshots += 1
            try:
                if any(q["state"] == "PENDING" for q in self.node.jobs.squeue()):
                    self.saw_pending = True
            except Exception:  # noqa: BLE001 - a slow squeue is not a failure of the check
                pass
            self.stop_evt.wait(0.3)


def test_a_mix_of_gpu_jobs_each_in_its_own_aligned_vm(slurm_node):
    node = slurm_node
    host = discover(SysfsRoot(str(node.env.sysfs)))
    node_of_cpu = {c: n.id for n in host.numa_nodes for c in n.cpus}
    blocks = {b.gpus for b in host.blocks}
    sizes = [8, 4, 2, 1, 1, 4, 8, 2, 1]          # 31 GPUs: more than the 16 there are
    since = time.strftime("%Y-%m-%dT%H:%M:%S")
    sampler = Sampler(node)
    sampler.start()
    try:
        jobs = {node.jobs.sbatch(JOB_SCRIPT.format(hold=4), gpus=n): n for n in sizes}
        node.jobs.wait_done(jobs, timeout=900)
    finally:
        sampler.stop_evt.set()
        sampler.join()
    assert sampler.problems == []
    assert sampler.snapshots > 10 and sampler.max_vms >= 2 and sampler.saw_pending
    rows = node.jobs.sacct(jobs)
    wd = node.jobs.workdir
    for job, n in jobs.items():
        row = rows[job]
        assert row["State"] == "COMPLETED", (job, row, slurmd_lines(node, job))
        assert f"gres/gpu={n}" in row["AllocTRES"]
        vm = json.loads((wd / f"vm-{job}.json").read_text())
        gpus = tuple(vm["allocation"]["gpus"])
        assert len(gpus) == n and gpus in blocks, f"job {job}: GPUs {gpus} are not an aligned block"
        gpu_nodes = {host.gpu(g).numa_node for g in gpus}
        assert {node_of_cpu[c] for c in vm["allocation"]["cpus"]} <= gpu_nodes
        assert vm["allocation"]["slurm_gpus"] is not None
        ssh = (wd / f"ssh-{job}.txt").read_text()
        assert f"uid={node.env.uid} host=job-{job}" in ssh, ssh
        assert f"address={vm['address']} key=" in ssh
        rec = decode(row["AdminComment"])
        assert rec is not None, row["AdminComment"]
        assert rec["state"] == "ended" and rec["domain"] == f"job-{job}"
        assert tuple(parse_index_list(rec["gpus"])) == gpus and rec["aligned"] == "yes"
        assert float(rec["boot_s"]) > 0 and float(rec["teardown_s"]) > 0
        assert rec["ended"].startswith("job ended; deleted") and rec["image"].startswith("testguest@")
        assert rec["vcpus"] and rec["memory_mib"] and rec["numa"]
        assert any("VM job-" in line and "ready in" in line for line in slurmd_lines(node, job))
    nothing_left(node)
    node.cluster.wait_idle(timeout=120, drained_fails=True)    # in service

    r = node.cluster.run(["env", f"DGXVM_CONFIG={node.env.config}", node.jobs.dgxvm, "report",
                          "--json", "--since", since], user=node.env.user)
    [mine] = [u for u in json.loads(r.stdout)["users"] if u["user"] == node.env.user]
    assert mine["vms"] == len(sizes) and mine["failures"] == 0
    assert mine["gpu_hours"] > sum(sizes) * 4 / 3600       # each held its GPUs >= its sleep
    assert mine["median_boot_s"] > 0 and mine["median_teardown_s"] > 0


def test_a_missing_image_in_the_comment_cancels_the_job_and_the_node_stays(slurm_node):
    node = slurm_node
    job = node.jobs.sbatch("#!/bin/sh\ntouch ran-$SLURM_JOB_ID\n", gpus=2,
                           comment="test dgxvm:image=nope")
    node.jobs.wait_done([job], timeout=120)
    row = node.jobs.sacct([job])[job]
    assert row["State"].startswith("CANCELLED"), row
    rec = decode(row["AdminComment"])
    assert rec["state"] == "refused" and "image 'nope' is not offered" in rec["cause"]
    [line] = [ln for ln in slurmd_lines(node, job) if "refused" in ln]
    assert "refused at reading the request" in line and "job cancelled, node stays in service" in line
    assert not (node.jobs.workdir / f"ran-{job}").exists(), "the batch script ran without a VM"
    node.cluster.wait_idle(timeout=120, drained_fails=True)    # in service
    nothing_left(node)


def test_a_missing_partition_image_drains_the_node_and_holds_the_job(slurm_node):
    node = slurm_node
    job = node.jobs.sbatch("#!/bin/sh\ntouch ran-$SLURM_JOB_ID\n", gpus=4, partition="broken")
    try:
        state = wait_job_state(node, job, ("PENDING",), timeout=120)
        deadline = time.monotonic() + 60
        while "drain" not in node.cluster.node_state() and time.monotonic() < deadline:
            time.sleep(0.3)
        assert node.cluster.node_state() in ("drained", "draining"), node.cluster.node_state()
        reason = node.cluster.run(["sinfo", "-h", "-N", "-o", "%E"]).stdout
        assert "Prolog error" in reason, reason
        assert "held" in wait_job_state(node, job, ("PENDING",)), state
        [line] = [ln for ln in slurmd_lines(node, job) if "failed at" in ln]
        assert "partition broken's image: no image named gone" in line
        assert "exit 1 drains the node" in line
        assert not (node.jobs.workdir / f"ran-{job}").exists()
        nothing_left(node)
    finally:
        node.cluster.run(["scancel", str(job)], check=False)
        node.jobs.wait_done([job], timeout=120)
        node.cluster.resume_node()
        node.cluster.wait_idle(timeout=60)


def test_a_job_cancelled_while_its_vm_boots_is_cleaned_up(slurm_node):
    node = slurm_node
    job = node.jobs.sbatch(JOB_SCRIPT.format(hold=30), gpus=4)
    vmdir = node.env.state_dir / "vms" / f"job-{job}"
    deadline = time.monotonic() + 120
    # the record is written just after the domain XML (lifecycle.create's design): wait for both
    while not ((vmdir / "domain.xml").exists() and (vmdir / "record.json").exists()):
        assert time.monotonic() < deadline, "the VM never started to be made"
        time.sleep(0.1)
    rec = json.loads((vmdir / "record.json").read_text())
    assert rec["state"] == "creating"
    node.cluster.run(["scancel", str(job)])
    node.jobs.wait_done([job], timeout=300)
    node.cluster.wait_idle(timeout=120)
    assert not (node.jobs.workdir / f"ssh-{job}.txt").exists()
    nothing_left(node)


def test_a_vm_that_dies_during_the_job_is_cleaned_up_and_accounted(slurm_node):
    node = slurm_node
    job = node.jobs.sbatch(JOB_SCRIPT.format(hold=600), gpus=1)
    wait_job_state(node, job, ("RUNNING",), timeout=300)
    deadline = time.monotonic() + 300
    while not (node.jobs.workdir / f"ssh-{job}.txt").exists():
        assert time.monotonic() < deadline
        time.sleep(0.2)
    node.env.virsh("destroy", f"job-{job}")          # the guest crashes under the job
    node.cluster.run(["scancel", str(job)])
    node.jobs.wait_done([job], timeout=300)
    rec = decode(node.jobs.sacct([job])[job]["AdminComment"])
    assert rec["state"] == "ended" and "stopped before the job ended" in rec["ended"], rec
    node.cluster.wait_idle(timeout=60)
    nothing_left(node)


def test_no_aligned_block_requeues_the_job_until_one_frees(slurm_node):
    """Slurm counts 16 free GPUs, but the ledger has one GPU of every 4-block held (as by VMs
    an admin made by hand): under alignment = strict the 8-GPU job is requeued, not run
    unaligned and not failed; once the blocks free up it runs on an aligned block."""
    from slurm_dgxvm.ledger import Allocation, domain_key
    from slurm_dgxvm.placement import Policy, Request, place
    node = slurm_node
    host = discover(SysfsRoot(str(node.env.sysfs)))
    ledger = Ledger(node.env.state_dir)
    keys = []
    for first in (0, 4, 8, 12):
        p = place(host, ledger.read().occupancy(), Request(count=1, gpu_index=first), Policy())
        keys.append(domain_key(f"pin{first}"))
        ledger.allocate(Allocation.from_placement(keys[-1], p, owner="domain",
                                                  domain=f"pin{first}", user="root"))
    job = node.jobs.sbatch(JOB_SCRIPT.format(hold=1), gpus=8)
    try:
        deadline = time.monotonic() + 120
        while not any("requeued to wait for an aligned block" in ln
                      for ln in slurmd_lines(node, job)):
            assert time.monotonic() < deadline, slurmd_lines(node, job)
            time.sleep(0.3)
        assert "PENDING" in wait_job_state(node, job, ("PENDING",), timeout=60)
        assert node.cluster.node_state() != "drained"
        assert not (node.jobs.workdir / f"ssh-{job}.txt").exists()
    finally:
        for key in keys:
            ledger.release(key)
    node.jobs.wait_done([job], timeout=600)
    row = node.jobs.sacct([job])[job]
    assert row["State"] == "COMPLETED", row
    rec = decode(row["AdminComment"])
    assert rec["state"] == "ended" and rec["aligned"] == "yes"
    assert len(parse_index_list(rec["gpus"])) == 8
    node.cluster.wait_idle(timeout=60)
    nothing_left(node)
