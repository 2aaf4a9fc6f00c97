#!/usr/bin/env python3
"""Boot time of the Debian cloud guest (guest-image/debian-cloud: systemd, cloud-init, OpenSSH,
podman, extlinux) beside the test guest, in one run on this machine (TCG): define to ready as
dgxvm's create measures it, then the cloud guest's own breakdown from its own tools
(systemd-analyze: firmware+loader, kernel, userspace; the critical chain to qemu-guest-agent,
which is dgxvm's readiness; cloud-init analyze: its stages and slowest modules).

Run as root (it starts its own libvirtd in a network namespace, benchmarks/_node.py):
    .venv/bin/python benchmarks/boot_bench.py [--runs 2]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _node import REPO, BenchNode, guest_image, sh  # noqa: E402

from harness.slurm import ensure_user  # noqa: E402

USER = "dgxvmbench"
NETWORK, CIDR = "dgxvmbootb", "10.213.78.0/24"
JOB = 880101


def cloud_image() -> Path:
    out = sh(REPO / "guest-image/debian-cloud/build", timeout=1800).stdout
    return Path(out.strip().splitlines()[-1])


def guest_exec(dom, *argv: str, timeout: float = 120) -> str:
    """``argv`` run as root in the guest through its agent (guest-exec); its stdout."""
    import libvirt_qemu

    def call(execute, **arguments):
        return json.loads(libvirt_qemu.qemuAgentCommand(
            dom, json.dumps({"execute": execute, "arguments": arguments}), 30, 0))["return"]

    pid = call("guest-exec", path=argv[0], arg=list(argv[1:]), **{"capture-output": True})["pid"]
    deadline = time.monotonic() + timeout
    while True:
        st = call("guest-exec-status", pid=pid)
        if st.get("exited"):
            return base64.b64decode(st.get("out-data", "")).decode(errors="replace")
        if time.monotonic() > deadline:
            return "(timed out)"
        time.sleep(0.5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2, help="VMs of each image, one after another")
    args = ap.parse_args()
    if os.geteuid():
        raise SystemExit("boot_bench: run as root (it starts libvirtd)")
    test_dir, _ = guest_image()
    cloud_dir = cloud_image()
    uid, gid, _home = ensure_user(USER)
    vm = ('share = "virtiofs"\nshare_roots = ["{base}"]\nfit_vcpus = 1\nfit_memory_mib = 1024\n')
    results: dict[str, list[float]] = {"test guest": [], "debian-cloud": []}
    breakdown = ""
    with BenchNode("bootbench", network=NETWORK, cidr=CIDR, vm=vm, image_dir=test_dir,
                   dirs=("work",)) as node:
        node.dgxvm("image", "install", cloud_dir / "manifest.json", "--name", "cloud")
        from slurm_dgxvm import config as config_mod
        from slurm_dgxvm import lifecycle
        from slurm_dgxvm.placement import Request
        from slurm_dgxvm.slurm.job import domain_for
        env = lifecycle.Env(config_mod.load(str(node.config)))
        name = domain_for(env.cfg, JOB)
        wd = node.base / "work"
        os.chown(wd, uid, gid)
        for run in range(args.runs):
            for label, image in (("test guest", "bench"), ("debian-cloud", "cloud")):
                t0 = time.monotonic()
                lifecycle.create(env, lifecycle.CreateRequest(
                    name=name, placement=Request(count=1), owner="job", job_id=JOB, user=USER,
                    uid=uid, gid=gid, home=f"/home/{USER}", workdir=str(wd), image=image))
                results[label].append(time.monotonic() - t0)
                try:
                    if label == "debian-cloud" and run == args.runs - 1:
                        conn = env.connect()
                        dom = conn.lookupByName(name)
                        # systemd-analyze answers once the boot is over (cloud-init's config
                        # and final stages run on after dgxvm's readiness)
                        guest_exec(dom, "/bin/sh", "-c", "systemctl is-system-running --wait",
                                   timeout=300)
                        breakdown = "\n".join(
                            guest_exec(dom, "/bin/sh", "-c", cmd + " 2>&1") for cmd in (
                                "systemd-analyze time",
                                "systemd-analyze critical-chain qemu-guest-agent.service "
                                "--no-pager | tail -n +3",
                                "cloud-init analyze show | grep -E 'Finished stage|Total Time'",
                                "cloud-init analyze blame | head -8"))
                finally:
                    lifecycle.delete(env, name)
    print()
    print(f"define -> ready (dgxvm create, TCG, 1 vCPU, 1024 MiB), {args.runs} VM(s) each:")
    for label, secs in results.items():
        print(f"  {label:<14} median {statistics.median(secs):6.1f}s   "
              f"({', '.join(f'{s:.1f}' for s in secs)})")
    print("\ndebian-cloud, its own view of its last boot:")
    print(breakdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
