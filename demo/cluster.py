"""The main job, for real: a local Slurm 22.05 cluster (munged, MariaDB + slurmdbd, slurmctld,
slurmd) for a simulated DGX-2 whose Prolog/Epilog are dgxvm's, libvirt + QEMU (TCG) for the VMs,
all inside network namespace dgxvm-demo. An ordinary user submits a mix of GPU jobs, more than
fit; each runs in its own VM. While they run, a picture shows which job's VM holds which GPUs;
at the end, Slurm's own accounting (sacct) shows every VM record, and `dgxvm report` sums it.
Everything started is stopped, by PID.

Run by demo/run (root).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness.node import REGISTRY_PORT, LocalNode  # noqa: E402
from harness.registry import LocalRegistry, build_image  # noqa: E402

SIZES = [8, 4, 2, 1, 1, 2, 4, 8, 1, 2]        # 33 GPUs asked, 16 exist: some jobs wait
IMAGE = f"127.0.0.1:{REGISTRY_PORT}/demo/hello:1"
SCRIPT = """#!/bin/sh
# the job's batch script: it runs on the host and does its work in its VM, in a container
set -e
eval "$(dgxvm job --env)"
echo "job $SLURM_JOB_ID: my VM is $DGXVM_DOMAIN at $DGXVM_ADDRESS"
srun dgxvm run -- sh -c 'echo "inside: $(hostname), uid $(id -u), $(nproc) vCPU, kernel $(uname -r)"'
srun dgxvm run --container-image {image} -- \
    sh -c 'echo "in container $(cat /marker): uid $(id -u), SLURM_JOB_GPUS=$SLURM_JOB_GPUS, cwd $PWD" \
           > container-$SLURM_JOB_ID.txt'
sleep {hold}
"""


def step(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def picture(vms: list[dict], queue: list[dict], t: float) -> str:
    owner = {}
    for vm in vms:
        if vm["state"] in ("running", "creating", "no-record") or vm["held"]:
            for g in vm["gpus"]:
                owner[g] = vm["job_id"]
    cells = []
    for g in range(16):
        cells.append(f"{owner[g]:>3}" if g in owner else "  .")
        if g == 7:
            cells.append(" |")
    running = sorted({j for j in owner.values() if j is not None})
    pending = [f"{q['job']}({q['gres'].replace('gres:', '').replace('gpu:', '')} GPU)"
               for q in queue if q["state"] == "PENDING"]
    return (f"t={t:5.1f}s  job per GPU:" + "".join(cells) + f"   VMs: {len(running)}"
            + (f"   waiting: {' '.join(pending)}" if pending else ""))


def main() -> int:
    step("Starting the local node: simulated DGX-2, libvirt, Slurm with dgxvm's Prolog/Epilog")
    rc = _node()
    print("stopped.")
    return rc


def _node() -> int:
    with LocalNode(netns="dgxvm-demo", user="dgxvmdemo", network="dgxvmdemo",
                   cidr="10.215.0.0/24") as node:
        print(f"started in {node.timings['start_s']:.1f}s; slurm.conf {node.cluster.slurm_conf}")
        print("Prolog=" + node.cluster.prolog + "  (runs " + str(REPO / "prolog/dgxvm-prolog") + ")")
        print(node.cluster.run(["sinfo", "-N", "-o", "%N %T %G %f"]).stdout.rstrip())

        step(f"A container registry (Debian's docker-registry) in the node's namespace, with "
             f"one small image: {IMAGE}")
        registry = LocalRegistry(node.base / "registry", port=REGISTRY_PORT, netns=node.netns)
        registry.start()
        try:
            digest = build_image(registry, "demo/hello", "1", node.base / "image-build",
                                 marker="hello-1")
            print(f"pushed {IMAGE} ({digest})")
            return _jobs(node)
        finally:
            registry.stop()


def _jobs(node) -> int:
    """The jobs, the picture while they run, and what they left."""
    step(f"User {node.user} submits {len(SIZES)} jobs: sbatch --gres=gpu:N with N = "
         f"{' '.join(map(str, SIZES))} ({sum(SIZES)} GPUs for 16); each runs "
         f"`srun dgxvm run --container-image {IMAGE}` in its VM")
    t0 = time.monotonic()
    jobs = {}
    for n in SIZES:
        jobs[node.jobs.sbatch(SCRIPT.format(hold=6, image=IMAGE), gpus=n)] = n
    print("submitted: " + ", ".join(f"{j} ({n} GPU)" for j, n in jobs.items()))

    step("GPU 0-7 | 8-15 of dgx01: which job's VM holds each (. = free); Slurm's count "
         "admits, dgxvm's ledger places aligned blocks")
    last = None
    while True:
        queue = [q for q in node.jobs.squeue() if q["job"] in jobs]
        line = picture(node.jobs.vms(), queue, time.monotonic() - t0)
        key = line.split("job per GPU:")[1]
        if key != last:
            print(line, flush=True)
            last = key
        if not queue:
            break
        if time.monotonic() - t0 > 1200:
            print("demo: jobs still running after 20 minutes; stopping", file=sys.stderr)
            return 1
        time.sleep(1.0)
    print(f"all {len(jobs)} jobs done in {time.monotonic() - t0:.0f}s")

    first = next(iter(jobs))
    step(f"What job {first}'s batch script printed (slurm-{first}.out)")
    print((node.workdir / f"slurm-{first}.out").read_text().rstrip())

    step("What each job's container wrote into the shared work dir")
    for j in jobs:
        path = node.workdir / f"container-{j}.txt"
        print(f"{j:>4} {path.read_text().rstrip() if path.exists() else '(nothing)'}")

    step("Slurm's own accounting: sacct -o JobID,User,State,AllocTRES,AdminComment")
    rows = node.jobs.sacct(jobs)
    for j in jobs:
        r = rows[j]
        print(f"{j:>4} {r['User']:<10} {r['State']:<10} {r['AllocTRES']:<40}")
        print(f"     {r['AdminComment']}")

    step("dgxvm report (per user and account, from sacct)")
    print(node.cluster.run(["env", f"DGXVM_CONFIG={node.config}", node.jobs.dgxvm, "report",
                            "--since", "now-1hours"], user=node.user).stdout.rstrip())

    step("Nothing left: dgxvm list, virsh list --all")
    print(node.dgxvm_cmd("list").stdout.rstrip())
    out = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
                         capture_output=True, text=True, timeout=60).stdout.strip()
    print(f"virsh list --all: {out or '(no domains)'}")
    step("Stopping Slurm, libvirt and every process they started (by PID)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
