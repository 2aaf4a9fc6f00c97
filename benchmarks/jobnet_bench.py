#!/usr/bin/env python3
"""The job fabric's cost on a node and its data path, in network namespaces (root; no libvirt,
no Slurm): harness/jobnet_rig.py's underlay bridge, nodes and veth "VMs".

    python3 benchmarks/jobnet_bench.py [--runs N] [--seconds S]

Prints, each beside its baseline:
  * apply() and teardown() of a 2-node job on one node, median and p95 over N runs (the
    package's own functions, timed inside the node's namespace), against the 50 ms goal;
  * apply() with 2, 16, 64 and 256 peers (addresses that need not exist);
  * TCP throughput and round-trip time VM -> VM across two nodes over the fabric, against node
    -> node over the same underlay, as ratios (plain Python sockets, one stream, S seconds).
Figures depend on the machine; run it, do not trust old numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.jobnet_rig import NODE_ADDR, Rig  # noqa: E402
from slurm_dgxvm.config import JobnetConfig  # noqa: E402
from slurm_dgxvm.jobnet.plan import plan  # noqa: E402

APPLY_GOAL_MS = 50.0

#: Timed inside a node's namespace: apply + teardown of the fabric in argv[1], argv[2] times.
TIMER = r'''
import json, sys, time
from slurm_dgxvm.jobnet import apply as jn
from slurm_dgxvm.jobnet.plan import JobFabric
fab, runs = JobFabric.from_dict(json.loads(sys.argv[1])), int(sys.argv[2])
ups, downs = [], []
for _ in range(runs):
    t = time.perf_counter(); jn.apply(fab); ups.append((time.perf_counter() - t) * 1e3)
    t = time.perf_counter(); jn.teardown(fab.vni); downs.append((time.perf_counter() - t) * 1e3)
print(json.dumps({"apply": ups, "teardown": downs}))
'''


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def timed(rig: Rig, node: str, fab, runs: int) -> dict:
    r = rig.py(node, TIMER, json.dumps(fab.to_dict()), str(runs), check=True)
    return json.loads(r.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("jobnet_bench: needs root (network namespaces)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="jobnet-bench-") as tmp:
        rig = Rig(Path(tmp), prefix="dgxvm-jnb", nodes=("n1", "n2"))
        try:
            return run(rig, args)
        finally:
            rig.close()


def run(rig: Rig, args) -> int:
    rig.build()
    cfg = JobnetConfig(enabled=True, nodes={k: v for k, v in NODE_ADDR.items() if k != "n3"})
    print(f"dgxvm jobnet benchmark: kernel {os.uname().release}, {args.runs} runs, "
          f"{os.cpu_count()} CPUs")
    print(f"{'measure (ms)':<40}{'n':>5}{'p50':>9}{'p95':>9}{'max':>9}{'baseline':>12}")
    two = timed(rig, "n1", plan(cfg, 4001, "n[1-2]", "n1"), args.runs)
    for key in ("apply", "teardown"):
        vals = two[key]
        base = f"goal {APPLY_GOAL_MS:g}" if key == "apply" else "-"
        print(f"  {key + ' (2-node job)':<38}{len(vals):>5}{pct(vals, 50):>9.1f}"
              f"{pct(vals, 95):>9.1f}{max(vals):>9.1f}{base:>12}")
    base_p50 = pct(two["apply"], 50)
    for peers in (2, 16, 64, 256):
        nodes = {"n1": NODE_ADDR["n1"]}
        nodes.update({f"f{i}": f"10.200.{i // 200}.{i % 200 + 1}" for i in range(peers)})
        big = JobnetConfig(enabled=True, nodes=nodes, max_nodes=1024)
        fab = plan(big, 5000 + peers, f"n1,f[0-{peers - 1}]", "n1")
        vals = timed(rig, "n1", fab, max(5, args.runs // 3))["apply"]
        print(f"  {f'apply, {peers} peers':<38}{len(vals):>5}{pct(vals, 50):>9.1f}"
              f"{pct(vals, 95):>9.1f}{max(vals):>9.1f}{f'x{pct(vals, 50) / base_p50:.2f}':>12}")
    # the data path: a 2-node job's VMs against their nodes
    fabs = {n: plan(cfg, 4002, "n[1-2]", n) for n in ("n1", "n2")}
    for node, fab in fabs.items():
        rc, out = rig.jobnet(node, "apply", fab.to_dict())
        if rc:
            raise SystemExit(f"apply on {node}: {out}")
        vm = f"vm{node[1]}"
        rig.add_vm(vm, node, fab.bridge, str(fab.vm_address), fab.mac, fab.mtu)
    for ns in ("vm2", "n2"):
        rig.agent_start(ns, "tcp-bulk-serve", "7100")
    fabric_to = str(fabs["n2"].vm_address.ip)
    secs = str(args.seconds)
    print(f"{'data path':<40}{'fabric':>12}{'underlay':>12}{'ratio':>9}")
    f_bw = float(rig.agent_run("vm1", "tcp-bulk", fabric_to, "7100", secs))
    u_bw = float(rig.agent_run("n1", "tcp-bulk", NODE_ADDR["n2"], "7100", secs))
    print(f"  {'TCP throughput (MB/s), one stream':<38}{f_bw:>12.0f}{u_bw:>12.0f}"
          f"{f_bw / u_bw:>9.2f}")
    f_rtt = float(rig.agent_run("vm1", "tcp-rtt", fabric_to, "7100", "2000"))
    u_rtt = float(rig.agent_run("n1", "tcp-rtt", NODE_ADDR["n2"], "7100", "2000"))
    print(f"  {'TCP round trip (us), median of 2000':<38}{f_rtt:>12.1f}{u_rtt:>12.1f}"
          f"{f_rtt / u_rtt:>9.2f}")
    print(f"  (fabric MTU {fabs['n1'].mtu}, underlay 1500; VM = veth namespace in brj, node = "
          f"namespace on the underlay bridge)")
    for node, fab in fabs.items():
        rig.jobnet(node, "teardown", fab.vni)
    return 0


if __name__ == "__main__":
    sys.exit(main())
