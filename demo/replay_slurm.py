#!/usr/bin/env python3
"""Replay the GPU choices a real Slurm 22.05 made on a 16-GPU node through dgxvm's placement.

Measured (shared/DESIGN.md, decision 1): jobs of 1, 4, 2, 4, 1, 2 GPUs got indices 0 / 1-4 / 5-6 /
7-10 / 11 / 12-13 — not aligned to the DGX-2's NVSwitch and NUMA blocks. For each job this records
the VM's placement in the ledger, exactly as the Prolog will: place under the ledger lock, allocate.

    replay_slurm.py SYSFS_ROOT STATE_DIR allocate|release
"""

import sys

from slurm_dgxvm.config import Config
from slurm_dgxvm.ledger import Allocation, Ledger, job_key
from slurm_dgxvm.placement import Policy, Request, place
from slurm_dgxvm.ranges import format_index_list
from slurm_dgxvm.topology import SysfsRoot, discover

SLURM_CHOICES = [(101, (0,)), (102, (1, 2, 3, 4)), (103, (5, 6)), (104, (7, 8, 9, 10)),
                 (105, (11,)), (106, (12, 13))]


def main(sysfs_root: str, state_dir: str, action: str) -> int:
    ledger = Ledger(state_dir)
    if action == "release":
        for job, _ in SLURM_CHOICES:
            ledger.release(job_key(job))
        left = ledger.read().allocations
        print(f"released {len(SLURM_CHOICES)} jobs; ledger now holds {len(left)} allocation(s)")
        return 0 if not left else 1
    host = discover(SysfsRoot(sysfs_root))
    policy = Policy.from_config(Config())
    for job, slurm in SLURM_CHOICES:
        with ledger.transaction() as txn:
            p = place(host, txn.occupancy(), Request(count=len(slurm), slurm_gpus=slurm), policy)
            txn.allocate(Allocation.from_placement(job_key(job), p, owner="job", job_id=job,
                                                   domain=f"dgxvm-job-{job}", user="alice"))
        held_ms = ledger.last_held_s * 1000
        verdict = "kept" if not p.remapped else "remapped"
        extra = (f", NVSwitches {','.join(s[5:7] for s in p.nvswitches)}" if p.nvswitches else "")
        print(f"job {job}: {len(slurm):>2} GPU(s)  Slurm chose {format_index_list(slurm):<6} -> "
              f"VM gets {format_index_list(p.gpus):<6} ({verdict}, "
              f"{'aligned' if p.aligned else 'UNALIGNED'}), NUMA {format_index_list(p.numa_nodes)}, "
              f"{p.vcpus} vCPUs on CPUs {format_index_list(p.cpus)}{extra}  "
              f"[ledger lock held {held_ms:.1f} ms]")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[3] not in ("allocate", "release"):
        sys.exit(__doc__)
    sys.exit(main(*sys.argv[1:]))
