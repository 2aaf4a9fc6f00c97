#!/usr/bin/env python3
"""A two-node job on the local cluster (harness/cluster.py: two simulated DGX H100 nodes, each
its own libvirt and slurmd, the job fabric on), measured through Slurm (root; about 3 minutes):

    python3 benchmarks/multinode_bench.py [--runs N] [--mib M]

Prints, each beside its baseline:
  * the fabric's cost in each node's Prolog (the ``jobnet`` create stage of both VM records in
    the job's AdminComment) against the 50 ms goal, and its share of the Prolog;
  * submit-to-start (sbatch returns -> the batch script's first line) of a two-node job beside a
    one-node job's, median over N of each;
  * VM -> VM across the nodes over the job fabric against node -> node over the same underlay:
    TCP throughput (M MiB through busybox nc) and round-trip time (ping), as ratios; and, to
    tell the fabric's cost from the guest's, the first VM -> the second node over the VM's NAT
    path (the same TCG guest, no fabric).
The VMs are TCG guests here: their own CPU, not the fabric, bounds what they move; the netns
figures of benchmarks/jobnet_bench.py isolate the fabric's data path. Figures depend on the
machine; run it, do not trust old numbers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.cluster import LocalCluster  # noqa: E402
from harness.guest_agent import domain, guest_exec  # noqa: E402
from slurm_dgxvm.slurm.accounting import decode_all, parse_stages  # noqa: E402

GOAL_MS = 50.0
STAMP = '#!/bin/sh\ndate +%s.%N > "start-$SLURM_JOB_ID"\n{rest}\n'


def squeue(c, job: int) -> str:
    return c.cluster.run(["squeue", "-h", "-j", str(job), "-o", "%T|%r"],
                         check=False).stdout.strip()


def submit_to_start(c, nodes: int) -> float:
    """Seconds from sbatch returning to the batch script's first line (its own clock)."""
    t0 = time.time()
    job = c.jobs.sbatch(STAMP.format(rest=""), gpus=1, nodes=nodes)
    while squeue(c, job):
        time.sleep(0.2)
    return float((c.workdir / f"start-{job}").read_text()) - t0


def root(c, node: str, job: int, script: str, timeout: float = 300) -> str:
    conn, dom = domain(c.node(node).stack.uri, f"job-{job}")
    try:
        r = guest_exec(dom, script, timeout=timeout)
    finally:
        conn.close()
    if r.code != 0:
        raise RuntimeError(f"{node}: {script}: exit {r.code}: {r.err.strip()}")
    return r.out


#: a receiver that reads exactly $1 bytes, then closes (so the sender's nc ends): busybox sh
SINK = '#!/bin/sh\nhead -c {n} > /dev/null\necho done\n'
#: the sender's side: its own clock around dd | nc (/proc/uptime: busybox date has no %N);
#: prints microseconds
SEND = ("s=$(cut -d' ' -f1 /proc/uptime); dd if=/dev/zero bs=65536 count={blocks} 2>/dev/null "
        "| {nc} {dst} {port} >/dev/null; e=$(cut -d' ' -f1 /proc/uptime); "
        "awk -v s=$s -v e=$e 'BEGIN {{ print int((e - s) * 1e6) }}'")


def guest_sink(c, node: str, job: int, port: int, mib: int) -> None:
    root(c, node, job, f"printf '{SINK.format(n=mib << 20)}' > /tmp/sink; chmod +x /tmp/sink; "
                       f"(nc -l -p {port} -e /tmp/sink >/dev/null 2>&1 &); sleep 0.3")


def host_sink(c, node: str, port: int, mib: int) -> None:
    path = c.base / f"sink-{port}"
    path.write_text(SINK.format(n=mib << 20))
    path.chmod(0o755)
    c.node(node).run(["sh", "-c", f"busybox nc -l -p {port} -e {path} >/dev/null 2>&1 &"],
                     check=True)
    time.sleep(0.3)


def throughput(us: str, mib: int) -> float:
    return mib / (int(us.split()[-1]) / 1e6)


def rtt(out: str) -> float:
    """The average of ping's summary line (ms)."""
    line = [x for x in out.splitlines() if "min/avg/max" in x][0]
    return float(line.split("=")[1].split("/")[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mib", type=int, default=32)
    args = ap.parse_args()
    with LocalCluster(nodes=("dgxa", "dgxb"), machine="dgx-h100", user="dgxvmbench",
                      jobnet=True) as c:
        one = [submit_to_start(c, 1) for _ in range(args.runs)]
        two = [submit_to_start(c, 2) for _ in range(args.runs)]
        job = c.jobs.sbatch(STAMP.format(rest="sleep 900"), gpus=1, nodes=2)
        while squeue(c, job) != "RUNNING|None":
            time.sleep(0.3)
        try:
            records = decode_all(c.cluster.run(["scontrol", "-o", "show", "job", str(job)],
                                               check=True).stdout.split("AdminComment=", 1)[1])
            stages = {r["node"]: parse_stages(r.get("create_stages")) for r in records}
            guest_sink(c, "dgxb", job, 5201, args.mib)
            fab_tp = throughput(root(c, "dgxa", job, SEND.format(
                blocks=args.mib * 16, nc="nc", dst="10.64.0.11", port=5201)), args.mib)
            host_sink(c, "dgxb", 5202, args.mib)
            nat_tp = throughput(root(c, "dgxa", job, SEND.format(
                blocks=args.mib * 16, nc="nc", dst=c.node("dgxb").addr, port=5202)), args.mib)
            host_sink(c, "dgxb", 5203, args.mib)
            host_tp = throughput(c.node("dgxa").run(["sh", "-c", SEND.format(
                blocks=args.mib * 16, nc="busybox nc", dst=c.node("dgxb").addr, port=5203)],
                check=True).stdout, args.mib)
            fab_rtt = rtt(root(c, "dgxa", job, "ping -c 20 -i 0.2 10.64.0.11"))
            nat_rtt = rtt(root(c, "dgxa", job, f"ping -c 20 -i 0.2 {c.node('dgxb').addr}"))
            host_rtt = rtt(c.node("dgxa").run(["busybox", "ping", "-c", "20", "-i", "0.2",
                                               c.node("dgxb").addr], check=True).stdout)
        finally:
            c.cluster.run(["scancel", str(job)], check=False)
            while squeue(c, job):
                time.sleep(0.3)

    print("the job fabric in each node's Prolog (create stage jobnet), goal <= 50 ms")
    for node, st in sorted(stages.items()):
        total = sum(st.values())
        print(f"  {node}: {st.get('jobnet', 0) * 1e3:7.1f} ms   of a {total:.2f} s create "
              f"({st.get('jobnet', 0) / total * 100:.2f} %)")
    print(f"submit-to-start, median of {args.runs}: two-node job {statistics.median(two):.2f} s "
          f"beside one-node job {statistics.median(one):.2f} s "
          f"(x{statistics.median(two) / statistics.median(one):.2f})")
    print(f"TCP throughput, {args.mib} MiB through busybox nc:")
    print(f"  VM -> VM over the fabric   {fab_tp:8.1f} MiB/s   x{fab_tp / host_tp:.3f} of "
          f"node -> node {host_tp:.1f} MiB/s; x{fab_tp / nat_tp:.3f} of the same VM over its "
          f"NAT path ({nat_tp:.1f} MiB/s)")
    print("round trip (ping, 20):")
    print(f"  VM -> VM over the fabric   {fab_rtt:8.3f} ms   x{fab_rtt / host_rtt:.2f} of node "
          f"-> node {host_rtt:.3f} ms; x{fab_rtt / nat_rtt:.2f} of the same VM over its NAT "
          f"path ({nat_rtt:.3f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
