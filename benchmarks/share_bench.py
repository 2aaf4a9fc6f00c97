"""Work dir share benchmark: the share served as the job's user (dgxvm's virtiofsd wrapper: user
namespace, seccomp filter) beside libvirt's own root virtiofsd, on the same guest, in one run.

In the guest, as the job's user, on the share: sequential write of 1 GiB (dd, conv=fsync),
sequential read of it after dropping the guest's page cache, and creating 10,000 small files.
Times are taken in the guest (/proc/uptime), so ssh's own cost is not counted.

How the baseline is made: the same VM (`dgxvm create --workdir`) is destroyed and started again
with `virsh create` of its own domain XML minus the <binary> element, i.e. served by libvirt's
default virtiofsd as root (the design this issue replaced); same disks, seed, address and share.

Run as root on a machine without a running libvirtd: python benchmarks/share_bench.py [--runs N]
It starts libvirtd/virtlogd in a network namespace (harness/libvirt.py) and stops them by PID.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import libvirt
from _node import DGXVM, BenchNode, guest_image

from harness.guest_agent import guest_exec
from harness.node import ensure_user
from harness.ssh import ssh_argv
from slurm_dgxvm.virt import hypervisor

NETWORK, CIDR, USER = "dgxvmshare", "10.216.0.0/24", "dgxvmbench"
NETNS = "dgxvm-sharebench"

WORKLOADS = {
    "write 1 GiB (dd bs=1M, fsync)":
        "dd if=/dev/zero of=big bs=1M count=1024 conv=fsync 2>/dev/null",
    "read 1 GiB (guest cache dropped)": "dd if=big of=/dev/null bs=1M 2>/dev/null",
    "create 10,000 small files":
        "mkdir small && cd small && i=0; while [ $i -lt 10000 ]; do : > f$i; i=$((i+1)); done",
}


def timed_in_guest(base: Path, name: str, wd: Path, script: str) -> float:
    """Seconds ``script`` took in the guest, run as the VM's user in ``wd`` over ssh."""
    vmdir = base / "state" / "vms" / name
    rec_addr = (vmdir / "known_hosts").read_text().split()[0]
    body = (f"cd '{wd}' && a=$(cut -d' ' -f1 /proc/uptime) && {{ {script}; }} && "
            f"b=$(cut -d' ' -f1 /proc/uptime) && echo elapsed=$a,$b")
    r = subprocess.run(["ip", "netns", "exec", NETNS, "runuser", "-u", USER, "--",
                        *ssh_argv(vmdir / "id_ed25519", vmdir / "known_hosts",
                                  f"{USER}@{rec_addr}", body, connect_timeout=30)],
                       capture_output=True, text=True, timeout=3600)
    m = re.search(r"elapsed=([\d.]+),([\d.]+)", r.stdout)
    if r.returncode or not m:
        raise SystemExit(f"workload {script!r} failed ({r.returncode}): {r.stderr[-500:]}")
    return float(m.group(2)) - float(m.group(1))


def run_workloads(base, name, dom, wd) -> list[float]:
    out = []
    for title, script in WORKLOADS.items():
        if "read" in title:
            guest_exec(dom, "sync; echo 3 > /proc/sys/vm/drop_caches")
        out.append(timed_in_guest(base, name, wd, script))
    subprocess.run(["rm", "-rf", str(wd / "big"), str(wd / "small")], check=True)
    return out


def _wait_agent(dom) -> None:
    deadline = time.monotonic() + 300
    while not hypervisor.agent_ping(dom):
        if time.monotonic() > deadline:
            raise SystemExit("share_bench: the guest agent never answered")
        time.sleep(0.25)


def measure(node: BenchNode, wd: Path, runs: int, rows: dict[str, list[list[float]]]) -> None:
    """Both servers of the same VM's share, alternating who goes first."""
    base = node.base
    conn = libvirt.open("qemu:///system")
    node.dgxvm("create", "--gpu-count", "1", "--domain", "sb", "--user", USER, "--workdir", wd)
    xml = conn.lookupByName("sb").XMLDesc(0)
    root_xml = re.sub(r"\s*<binary path=[^>]*/>", "", xml)
    assert "<binary" in xml and "<binary" not in root_xml

    def as_user():
        return run_workloads(base, "sb", conn.lookupByName("sb"), wd)

    def as_root():
        hypervisor.destroy(conn.lookupByName("sb"))   # the same VM, root virtiofsd
        dom = conn.createXML(root_xml, 0)
        _wait_agent(dom)
        out = run_workloads(base, "sb", dom, wd)
        hypervisor.destroy(dom)
        dom = conn.lookupByName("sb")
        dom.create()
        _wait_agent(dom)
        return out

    for i in range(runs):
        order = (("user", as_user), ("root", as_root))
        got = dict((k, f()) for k, f in (order if i % 2 == 0 else order[::-1]))
        rows["as the job's user (dgxvm)"].append(got["user"])
        rows["root virtiofsd"].append(got["root"])
        print(f"run {i}: user {[f'{x:.2f}' for x in got['user']]}  "
              f"root {[f'{x:.2f}' for x in got['root']]}", flush=True)
    node.dgxvm("delete", "--domain", "sb")
    conn.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    if os.geteuid():
        raise SystemExit("share_bench: run as root (it starts libvirtd)")
    image_dir, _manifest = guest_image()
    import pwd
    try:
        pwd.getpwnam(USER)
        created_user = False
    except KeyError:
        created_user = True
    uid, gid, _home = ensure_user(USER)
    rows: dict[str, list[list[float]]] = {"as the job's user (dgxvm)": [], "root virtiofsd": []}
    vm = 'share = "virtiofs"\nshare_roots = ["{base}"]\nfit_vcpus = 1\nfit_memory_mib = 512\n'
    try:
        with BenchNode("sharebench", network=NETWORK, cidr=CIDR, vm=vm, image_dir=image_dir,
                       dirs=("work",)) as node:
            wd = node.base / "work"
            os.chown(wd, uid, gid)
            try:
                measure(node, wd, args.runs, rows)
            finally:                      # whatever measure left, before the node goes
                subprocess.run([str(DGXVM), "delete", "--domain", "sb"], env=node.env,
                               capture_output=True)
    finally:
        if created_user:
            subprocess.run(["userdel", "--remove", USER], capture_output=True)
    print()
    print(f"guest: dgxvm-test-guest under TCG, 1 vCPU, 512 MiB; {args.runs} run(s), medians, "
          f"seconds in the guest")
    print(f"{'workload':<36} {'as user':>9} {'root':>9} {'ratio':>7}")
    med = {k: [statistics.median(c) for c in zip(*v)] for k, v in rows.items()}
    for i, title in enumerate(WORKLOADS):
        u, r = med["as the job's user (dgxvm)"][i], med["root virtiofsd"][i]
        print(f"{title:<36} {u:8.2f}s {r:8.2f}s {u / r:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
