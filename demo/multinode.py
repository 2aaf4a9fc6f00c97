"""A job on two nodes, for real: two simulated DGX H100 nodes (harness/cluster.py), each with its
own libvirt and slurmd under one Slurm, on an underlay of network namespaces, with the job
fabric on. An ordinary user submits `sbatch -N 2 --gres=gpu:1`: each node's Prolog boots the
node's VM and the job's fabric; the tasks find each other by Slurm's node names in the VMs
(a rendezvous at the first node and an all-reduce over TCP), the first VM reaches the second
over SSH with the job's own key, and sacct holds both nodes' VM records. Everything started is
stopped, by PID.

Run by demo/run (root).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness.cluster import LocalCluster  # noqa: E402

ALLREDUCE = REPO / "harness" / "allreduce.sh"

SCRIPT = """#!/bin/sh
# the job's batch script, on the first node: each task runs in its own node's VM
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
echo "job $SLURM_JOB_ID on $SLURM_JOB_NODELIST, MASTER_ADDR=$MASTER_ADDR"
dgxvm job
srun -N2 --ntasks-per-node=1 dgxvm run -- sh ./allreduce.sh
dgxvm run -- sh -c 'echo "ssh from the first VM to the second: $(dbclient -T dgxb hostname) \
at $(grep -w dgxb /etc/hosts)"'
"""


def step(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def main() -> int:
    step("Two simulated DGX H100 nodes (dgxa, dgxb): each its own network and mount namespace, "
         "libvirtd and slurmd; one slurmctld; the job fabric on ([jobnet])")
    t0 = time.monotonic()
    with LocalCluster(nodes=("dgxa", "dgxb"), machine="dgx-h100", user="dgxvmdemo",
                      jobnet=True) as c:
        print(f"cluster up in {time.monotonic() - t0:.1f}s")
        print(c.cluster.run(["sinfo", "-N", "-o", "%N %T %G"], check=True).stdout)
        (c.workdir / "allreduce.sh").write_text(ALLREDUCE.read_text())
        step("sbatch -N 2 --gres=gpu:1: a VM on each node, on the job's own fabric")
        job = c.jobs.sbatch(SCRIPT, gpus=1, nodes=2)
        t1 = time.monotonic()
        while c.cluster.run(["squeue", "-h", "-j", str(job)], check=False).stdout.strip():
            time.sleep(1)
        print(f"job {job} ended in {time.monotonic() - t1:.1f}s; its output:")
        print((c.workdir / f"slurm-{job}.out").read_text())
        step("sacct: one VM record per node, in the job's AdminComment")
        out = c.cluster.run(["sacct", "-j", str(job), "-X", "-n", "-P", "-o",
                             "JobID,State,NodeList,AdminComment"], check=True).stdout
        for line in out.splitlines():
            jobid, st, nodes, comment = line.split("|", 3)
            print(f"{jobid} {st} {nodes}")
            for rec in comment.split(" ; "):
                words = rec.split()
                print("   ", " ".join(w for w in words if w.split("=")[0] in
                                      ("node", "state", "domain", "gpus", "boot_s",
                                       "create_stages")))
        step("Nothing left on either node")
        for n in ("dgxa", "dgxb"):
            node = c.node(n)
            links = node.run(["ip", "-o", "link", "show"], check=True).stdout
            fabric = [x for x in links.split() if x.startswith(("vxj", "brj"))]
            print(f"{n}: VMs {node.vms()}, fabric devices {fabric}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as exc:
        print(exc.stderr, file=sys.stderr)
        raise
