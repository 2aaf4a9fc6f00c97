"""Slurm benchmark on the local node (harness/node.py: real Slurm 22.05 + libvirt + TCG guest,
simulated DGX-2), in one run:

* submit -> batch-script-start latency of a 1-GPU and an 8-GPU job with dgxvm's Prolog, beside
  the same jobs with a Prolog that does nothing (jobs whose comment holds "bench:noop" get a
  no-op hook from the wrapper), beside the raw boot time of the same guest (`virsh create` of
  benchmarks/raw_domain.xml to guest-agent-ready, as benchmarks/vm_bench.py);
* the makespan of a 20-job mix (1, 2, 4, 8 GPUs x 5; each holds its VM for --hold s);
* the longest time any Prolog held the ledger lock (lock_s of every job's AdminComment).

Run as root on a machine without a running libvirtd:
    python benchmarks/slurm_bench.py [--runs 3] [--hold 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import libvirt  # noqa: E402

from harness.node import LocalNode, build_guest  # noqa: E402
from slurm_dgxvm.slurm.accounting import decode  # noqa: E402
from vm_bench import raw_boot  # noqa: E402

NOOP = "bench:noop"
NETWORK = "dgxvmbench"       # raw_boot's network
SCRIPT = """#!/bin/sh
python3 -c 'import time; print(repr(time.time()))' > start-$SLURM_JOB_ID
sleep {hold}
"""


def latency(node, gpus: int, noop: bool) -> float:
    t0 = time.time()
    job = node.jobs.sbatch(SCRIPT.format(hold=0), gpus=gpus, comment=NOOP if noop else None)
    node.jobs.wait_done([job], timeout=900)
    started = float((node.workdir / f"start-{job}").read_text())
    return started - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--hold", type=float, default=5.0)
    args = ap.parse_args()
    with LocalNode(netns="dgxvm-bench", user="dgxvmbench", network=NETWORK,
                   cidr="10.216.0.0/24", noop_comment=NOOP) as node:
        print(f"local node up in {node.timings['start_s']:.1f}s", flush=True)
        latency(node, 1, False)                     # warm-up: caches, first-job slurmctld cost
        latency(node, 1, True)
        lat = {(g, noop): [] for g in (1, 8) for noop in (False, True)}
        raw = []
        manifest_path = build_guest()                # cached: the guest the node installed
        manifest, image_dir = json.loads(manifest_path.read_text()), manifest_path.parent
        conn = libvirt.open("qemu:///system")
        for i in range(args.runs):                  # interleaved: drift hits all alike
            for g in (1, 8):
                for noop in (False, True):
                    lat[(g, noop)].append(latency(node, g, noop))
            raw.append(raw_boot(conn, node.base, manifest, image_dir, i)[0])
            print(f"run {i}: " + "  ".join(
                f"{g}-GPU {'noop' if n else 'dgxvm'} {v[-1]:5.2f}s" for (g, n), v in lat.items())
                + f"  raw boot {raw[-1]:5.2f}s", flush=True)
        conn.close()

        sizes = [1, 2, 4, 8] * 5
        t0 = time.time()
        jobs = [node.jobs.sbatch(SCRIPT.format(hold=args.hold), gpus=n) for n in sizes]
        node.jobs.wait_done(jobs, timeout=3600)
        makespan = time.time() - t0
        rows = node.jobs.sacct(jobs)
        states = {r["State"] for r in rows.values()}
        all_rows = node.jobs.sacct(range(1, max(jobs) + 1))
        locks = [float(rec["lock_s"]) for r in all_rows.values()
                 if (rec := decode(r["AdminComment"])) and rec.get("lock_s")]

    med = {k: statistics.median(v) for k, v in lat.items()}
    print(f"\nsubmit -> batch start (median of {args.runs} runs, seconds)")
    print(f"{'job':<8} {'dgxvm Prolog':>13} {'no-op Prolog':>13} {'VM overhead':>12} "
          f"{'raw guest boot':>15}")
    raw_med = statistics.median(raw)
    for g in (1, 8):
        print(f"{g}-GPU   {med[(g, False)]:13.2f} {med[(g, True)]:13.2f} "
              f"{med[(g, False)] - med[(g, True)]:12.2f} {raw_med:15.2f}")
    print(f"\n20-job mix (1/2/4/8 GPUs x 5, {args.hold:g}s each, {sum(sizes)} GPU-jobs on 16 "
          f"GPUs): makespan {makespan:.1f}s; job states {sorted(states)}")
    if locks:
        print(f"ledger lock held by a Prolog: longest {max(locks) * 1000:.2f} ms, median "
              f"{statistics.median(locks) * 1000:.2f} ms over {len(locks)} Prologs "
              f"(target < 10 ms)")
    return 0 if states == {"COMPLETED"} else 1


if __name__ == "__main__":
    sys.exit(main())
