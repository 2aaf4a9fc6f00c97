"""Warm stream: one stream of 1/2/4/8-GPU jobs (harness/soak.py `job_mix`) through the local
Slurm cluster (harness/node.py: real Slurm 22.05, libvirt, TCG guests, a simulated DGX-2) twice
in one run, on one node: first in a partition without warm VMs (the baseline), then in
partition ``warm`` with ``[partitions.warm] warm_recent = --recent`` (docs/admin/warm.md: after
each job its Epilog starts a refill that keeps one warm VM of each GPU count among the
partition's last N jobs; a job whose block is one claims it).

For each stream, printed side by side: jobs/hour; each job's start, the Prolog's VM time
(AdminComment ``claim_s`` for a claimed warm VM, else ``boot_s``): mean, p50, p95. For the warm
stream: the hit rate; the jobs whose Prolog deleted a warm VM in its way, and what that cost them
(the Prolog's `no warm VM claimed in Ns` line). A full queue (``--gap 0``) is the hard case: a
job ends, its refill and the next job's Prolog start together, and the next job comes before
the warm VM is up; ``--gap`` spaces the jobs as a node that is not always full sees them.
Then the warm VMs the idle node keeps: how many, QEMU resident memory and CPU over 10 s.
Checks as the soak's (harness/soak.py `Soak`, no faults): every job COMPLETED in its VM, 0 leaks
once the warm VMs are stopped, 0 double assignments, daemons flat.

Run as root, with no libvirtd running (it starts its own in a network namespace):
    flock /tmp/dgxvm-libvirt.lock .venv/bin/python benchmarks/warm_stream_bench.py \\
        [--jobs 100] [--recent 4] [--hold 2] [--queue 6] [--gap 0]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness.node import LocalNode  # noqa: E402
from harness.soak import Node, Soak, exit_on_sigterm, print_checks  # noqa: E402
from slurm_dgxvm.slurm.accounting import decode  # noqa: E402

from warm_bench import held_by, qemu_of  # noqa: E402

COLD_LINE = re.compile(r"job (\d+) \(.*no warm VM claimed in ([0-9.]+)s \((.*)\); starting cold")


def starts(soak: Soak) -> dict[int, tuple[float, bool]]:
    """job -> (its VM's time in the Prolog, whether it claimed a warm VM)."""
    out = {}
    for jid, row in soak.figures["rows"].items():
        rec = decode(row.get("AdminComment")) or {}
        if rec.get("warm") == "claimed" and rec.get("claim_s"):
            out[jid] = (float(rec["claim_s"]), True)
        elif rec.get("boot_s"):
            out[jid] = (float(rec["boot_s"]), False)
    return out


def in_the_way(local: LocalNode, jobs) -> dict[int, float]:
    """job -> seconds its Prolog spent on warm VMs it deleted (jobs that deleted none: absent)."""
    out = {}
    for line in local.cluster.slurmd_log.read_text(errors="replace").splitlines():
        m = COLD_LINE.search(line)
        if m and int(m.group(1)) in jobs and "in the way" in m.group(3):
            out[int(m.group(1))] = float(m.group(2))
    return out


def p95(v) -> float:
    """Nearest rank, as harness/soak.py quantiles and `dgxvm report`."""
    v = sorted(v)
    return v[max(0, math.ceil(0.95 * len(v)) - 1)]


def mean(v) -> str:
    return f"{statistics.fmean(v):.2f}s" if v else "-"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=100, help="jobs in each stream")
    ap.add_argument("--recent", type=int, default=4, help="[partitions.warm] warm_recent")
    ap.add_argument("--hold", type=float, default=2.0, help="seconds each job holds its VM")
    ap.add_argument("--queue", type=int, default=6, help="jobs queued or running at most")
    ap.add_argument("--gap", type=float, default=0.0,
                    help="seconds at least between two submissions (0: keep the queue full)")
    args = ap.parse_args()
    if os.geteuid():
        raise SystemExit("warm_stream_bench: run as root (it starts libvirtd and Slurm)")
    exit_on_sigterm()
    say = lambda s: print(s, flush=True)   # noqa: E731
    idle: dict = {}
    ok = True
    with LocalNode(netns="dgxvm-wstream", user="dgxvmwarm", network="dgxvmwarm",
                   cidr="10.219.0.0/24",
                   config_extra=f"\n[partitions.warm]\nwarm_recent = {args.recent}\n",
                   slurm_extra="PartitionName=warm Nodes=dgx01 MaxTime=INFINITE State=UP\n"
                   ) as local:
        node = Node.of_local(local)
        say(f"local node up in {local.timings['start_s']:.1f}s; {args.jobs} jobs per stream, "
            f"warm_recent = {args.recent}")

        def settle_and_stop() -> None:
            """The warm VMs the idle node keeps (after the last refill), measured, then
            stopped: they are the policy's, not leaks."""
            import fcntl
            time.sleep(5)                           # the last Epilog's refill has started
            deadline = time.monotonic() + 600
            lock = local.state_dir / "warm.lock"
            while time.monotonic() < deadline:      # the last refill done: its lock free
                with open(lock, "a") as f:
                    try:
                        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        time.sleep(1)
            listed = local.dgxvm_cmd("warm", "list", "--json").stdout.splitlines()
            vms = [json.loads(line) for line in listed]
            held = [held_by(pid) for pid in (qemu_of(v["name"]) for v in vms) if pid]
            idle.update(count=len(vms), sizes=sorted(len(v["gpus"]) for v in vms),
                        rss=sum(h[0] for h in held), cpu=sum(h[1] for h in held),
                        policy=local.dgxvm_cmd("warm", "list").stdout.strip().splitlines()[-1])
            local.dgxvm_cmd("warm", "stop")
            local.dgxvm_cmd("warm", "start")

        results = {}
        for label, partition, hook in (("cold", None, None), ("warm", "warm", settle_and_stop)):
            say(f"\n-- {label} stream --")
            before = local.dgxvm_cmd("metrics", "--textfile", "-").stdout
            soak = Soak(node, jobs=args.jobs, fault_every=0, hold=args.hold, queue=args.queue,
                        say=say, partition=partition, before_checks=hook, gap=args.gap)
            checks = soak.run()
            after = local.dgxvm_cmd("metrics", "--textfile", "-").stdout
            ok &= print_checks(f"{label} stream: {args.jobs} jobs (TCG guests, "
                               f"{os.cpu_count()} host CPUs)", checks)
            results[label] = (soak, starts(soak), in_the_way(local, soak.jobs), before, after)

    def counter(text: str, outcome: str) -> int:
        m = re.search(rf'^dgxvm_warm_claims_total\{{outcome="{outcome}"\}} (\d+)', text, re.M)
        return int(m.group(1)) if m else 0

    say(f"\n{'':34}{'cold':>14}{'warm':>14}")
    rows = {}
    for label, (soak, st, _way, _b, _a) in results.items():
        v = [s for s, _ in st.values()]
        rows[label] = {"jobs/hour": f"{3600 * len(soak.jobs) / soak.wall_s:.0f}",
                       "start mean": mean(v),
                       "start p50": f"{statistics.median(v):.2f}s" if v else "-",
                       "start p95": f"{p95(v):.2f}s" if v else "-"}
    for key in rows["cold"]:
        say(f"  {key:32}{rows['cold'][key]:>14}{rows['warm'][key]:>14}")
    soak, st, way, before, after = results["warm"]
    hits = sum(1 for _, h in st.values() if h)
    claimed = [s for s, h in st.values() if h]
    cold = [s for s, h in st.values() if not h]
    say(f"\nwarm stream: {hits} of {len(st)} jobs claimed a warm VM "
        f"({100 * hits / max(1, len(st)):.0f}%); claim mean {mean(claimed)}, cold starts mean "
        f"{mean(cold)}")
    say(f"  metrics: hit +{counter(after, 'hit') - counter(before, 'hit')}, "
        f"miss +{counter(after, 'miss') - counter(before, 'miss')}, "
        f"destroyed +{counter(after, 'destroyed') - counter(before, 'destroyed')}")
    say(f"  jobs delayed by a warm VM in their way (their Prolog deleted one first): {len(way)}"
        + (f"; what the attempt cost them: mean {mean(list(way.values()))}, p95 "
           f"{p95(list(way.values())):.2f}s, max {max(way.values()):.2f}s" if way else ""))
    if idle:
        say(f"  idle node afterwards: {idle['count']} warm VM(s) of {idle['sizes']} GPU(s); "
            f"QEMU resident {idle['rss']:.0f} MiB, CPU {idle['cpu']:.1f}% of one core "
            f"(10 s); {idle['policy']}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
