"""Multi-node jobs on a local cluster of two simulated DGX H100 nodes (harness/cluster.py), through
Slurm as the ordinary user: a two-node job's steps run on both nodes over the underlay, each node
has its own libvirtd and its own dgxvm config at the same path, and a two-node GPU job boots one
VM per node, whose `dgxvm run` steps answer from both, leaving nothing behind on either node.

The cluster is the session's (conftest.py: multinode), shared with test_multinode_fabric.py: its
namespaces (dgxvm-ul, dgxvm-ctl, dgxvm-dgxa, dgxvm-dgxb) and each node's mount namespace are its
own, apart from the session's libvirt stack (dgxvm-test, the host's /run/libvirt), so the tests
run in the ordinary integration session beside it."""

from __future__ import annotations

import os
import time

import libvirt
import pytest

from slurm_dgxvm.ledger import Ledger

pytestmark = [pytest.mark.integration, pytest.mark.multinode]

NODES = ("dgxa", "dgxb")


@pytest.fixture
def cluster(multinode):
    """The session's two-node cluster (conftest.py: multinode)."""
    return multinode


def run_job(c, script: str, *, gpus: int | None, timeout: float = 240) -> tuple[int, str]:
    """Submit ``script`` on both nodes as the cluster's user; wait for it to end (a job that
    Slurm requeues and holds fails at once, with the slurmd logs' tails); returns the job id
    and its output."""
    job = c.jobs.sbatch(script, gpus=gpus, nodes=len(NODES))
    deadline = time.monotonic() + timeout
    while True:
        r = c.cluster.run(["squeue", "-h", "-j", str(job), "-o", "%T|%r"], check=False)
        state = r.stdout.strip()
        if not state:
            break
        if "held" in state or time.monotonic() > deadline:
            logs = "\n".join(f"{p}:\n{p.read_text(errors='replace')[-1500:]}"
                             for p in c.cluster.slurmd_logs.values())
            pytest.fail(f"job {job} is {state!r}\n{logs}")
        time.sleep(0.3)
    out = c.workdir / f"slurm-{job}.out"
    return job, out.read_text(errors="replace") if out.exists() else ""


def nothing_left(node) -> None:
    conn = libvirt.open(node.stack.uri)
    try:
        doms = [d.name() for d in conn.listAllDomains()]
    finally:
        conn.close()
    assert doms == [], f"{node.name}: domains left: {doms}"
    assert node.stack.qemu_pids() == [], f"{node.name}: QEMU processes left"
    state = node.path("/var/lib/dgxvm")
    vms = state / "vms"
    assert not (vms.exists() and any(vms.iterdir())), f"{node.name}: VM dirs left"
    assert Ledger(state).read().allocations == {}, f"{node.name}: ledger entries left"


def test_a_two_node_job_runs_a_step_on_each_node_over_the_underlay(cluster):
    job, out = run_job(cluster, "#!/bin/sh\nsrun -N2 --ntasks-per-node=1 "
                                "sh -c 'echo on $SLURMD_NODENAME host $(hostname)'\n", gpus=None)
    assert sorted(out.split("\n")[:-1]) == [f"on {n} host {n}" for n in NODES], out
    assert cluster.jobs.sacct([job])[job]["State"] == "COMPLETED"


def test_each_node_has_its_own_libvirtd_and_its_own_dgxvm_config(cluster):
    a, b = (cluster.node(n) for n in NODES)
    assert a.stack.pids()["libvirtd"] != b.stack.pids()["libvirtd"]
    for n in (a, b):   # each node's libvirtd is in the node's network namespace and hostname
        pid = n.stack.pids()["libvirtd"]
        assert os.readlink(f"/proc/{pid}/ns/net") == \
            os.readlink(f"/proc/{n.ns.holder_pid}/ns/net")
        assert os.readlink(f"/proc/{pid}/ns/uts") == \
            os.readlink(f"/proc/{n.ns.holder_pid}/ns/uts")
    xml = ("<domain type='qemu'><name>only-on-dgxa</name><memory unit='MiB'>64</memory>"
           "<os><type arch='x86_64'>hvm</type></os></domain>")
    conn = libvirt.open(a.stack.uri)
    try:
        dom = conn.defineXML(xml)
        try:
            # what each node's own processes see at qemu:///system
            seen = {n.name: n.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
                                  check=True).stdout.split() for n in (a, b)}
        finally:
            dom.undefine()
    finally:
        conn.close()
    assert seen == {"dgxa": ["only-on-dgxa"], "dgxb": []}
    configs = {n.name: n.run(["cat", "/etc/dgxvm/dgxvm.toml"], check=True).stdout
               for n in (a, b)}
    assert configs["dgxa"] != configs["dgxb"]
    for n in (a, b):
        assert f'sysfs_root = "{n.sysfs}"' in configs[n.name]
        assert n.run(["hostname"], check=True).stdout.strip() == n.name


def test_a_two_node_gpu_job_boots_a_vm_per_node_and_dgxvm_run_answers_from_both(cluster):
    # -l: each line names its task; task 0 runs on dgxa, task 1 on dgxb (one per node). Each
    # node's VM is named for the job, and so is its guest's hostname.
    job, out = run_job(cluster, "#!/bin/sh\n"
                       "srun -l -N2 --ntasks-per-node=1 dgxvm run -- sh -c 'echo vm $(hostname)'\n"
                       "srun -l -N2 --ntasks-per-node=1 sh -c 'echo node $SLURMD_NODENAME'\n",
                       gpus=1, timeout=280)
    assert sorted(out.splitlines()) == [f"0: node {NODES[0]}", f"0: vm job-{job}",
                                        f"1: node {NODES[1]}", f"1: vm job-{job}"], out
    assert cluster.jobs.sacct([job])[job]["State"] == "COMPLETED", out
    cluster.wait_idle(timeout=120)            # both back in service, neither drained
    for n in NODES:
        nothing_left(cluster.node(n))
