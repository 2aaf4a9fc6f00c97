"""Soak: a stream of 1/2/4/8-GPU jobs through the local Slurm cluster (harness/node.py: real
Slurm 22.05, libvirt, TCG guests, a simulated DGX-2) with a fault every --fault-every jobs
(harness/soak.py `Soak`, faults rotating through `FAULTS`), recovered from as an admin would:

* a Prolog SIGKILLed after a create step (failpoints `after:place|disks|define|start`): Slurm
  drains the node and holds the job, its Epilog removes what was made; the bench resumes the
  node and releases the job, which then runs to COMPLETED;
* an Epilog SIGKILLed after `undefine`: Slurm drains the node; the bench runs `dgxvm epilog`
  for the job again (root, SLURM_JOB_ID) and resumes the node;
* a GPU of a running job whose reset fails (`dgxvm simulate --fault PCI:reset-fail`): it must
  be quarantined at the job's end and given to no VM until cleared (`--fault PCI:clear` and
  `dgxvm gpu clear`, once --fault-every/2 VMs were placed during the quarantine);
* a guest crash: a running job's QEMU SIGKILLed by pid.

Checks, printed with their figures, pass/fail each (exit 1 when one fails): every job ended,
every fault recovered, 0 leaks, 0 double assignments (every VM's GPUs and CPUs sampled every
0.5 s), no VM on a quarantined GPU, every job's sacct State and AdminComment, the node idle,
RSS and open fds of libvirtd, virtlogd, dnsmasq and the Slurm daemons (start, every
--sample-every jobs, end), the peak RSS of the short-lived dgxvm hooks, and the Prolog's time
(AdminComment boot_s and each create stage: min, p50, p95, max).

Run as root, with no libvirtd running (it starts its own in a network namespace):
    flock /tmp/dgxvm-libvirt.lock .venv/bin/python benchmarks/soak_bench.py \
        [--jobs 200] [--fault-every 20] [--hold 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness.node import LocalNode  # noqa: E402
from harness.soak import Node, Soak, exit_on_sigterm, print_checks  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--fault-every", type=int, default=20, help="0: no faults")
    ap.add_argument("--hold", type=float, default=2.0, help="seconds each job holds its VM")
    ap.add_argument("--fault-hold", type=float, default=15.0,
                    help="seconds a GPU-fault or crash job holds its VM (time to inject)")
    ap.add_argument("--queue", type=int, default=6, help="jobs queued or running at most")
    ap.add_argument("--sample-every", type=int, default=50,
                    help="RSS/fd samples of the daemons every N jobs done")
    args = ap.parse_args()
    if os.geteuid():
        raise SystemExit("soak_bench: run as root (it starts libvirtd and Slurm)")
    exit_on_sigterm()
    t0 = time.monotonic()
    say = lambda s: print(s, flush=True)   # noqa: E731
    with LocalNode(netns="dgxvm-soak", user="dgxvmsoak", network="dgxvmsoak",
                   cidr="10.217.0.0/24") as local:
        say(f"local node up in {local.timings['start_s']:.1f}s; {args.jobs} jobs, a fault "
            f"every {args.fault_every}")
        soak = Soak(Node.of_local(local), jobs=args.jobs, fault_every=args.fault_every,
                    hold=args.hold, fault_hold=args.fault_hold, queue=args.queue,
                    sample_every=args.sample_every, say=say)
        checks = soak.run()
    ok = print_checks(f"soak: {args.jobs} jobs, a fault every {args.fault_every} (TCG guests, "
                      f"{os.cpu_count()} host CPUs)", checks)
    say("\nfaulted jobs:")
    for job in soak.jobs.values():
        if job.fault:
            say(f"  job {job.id} ({job.gpus} GPU, {job.fault}): "
                + "; ".join(job.notes)
                + f"; sacct {soak.figures['rows'].get(job.id, {}).get('State', '?')}")
    say(f"\nwhole run {time.monotonic() - t0:.0f}s (soak {soak.wall_s:.0f}s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
