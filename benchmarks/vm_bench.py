"""VM lifecycle benchmark: `dgxvm create` to guest-ready next to a raw `virsh create` of an
equivalent hand-written domain (benchmarks/raw_domain.xml) to the same readiness point (the QEMU
guest agent answers guest-ping), on the same guest, in one run; then `dgxvm delete`.

Target (DESIGN.md): create/raw ratio <= 1.10; delete < 2 s plus the guest's own shutdown.
The raw baseline gets its overlay and seed made beforehand, untimed, so dgxvm pays for every step
it adds (placement, ledger, keys, seed, overlay, design, define, reservation) and raw for none.

Run as root on a machine without a running libvirtd: python benchmarks/vm_bench.py [--runs N]
It starts libvirtd/virtlogd in a network namespace (harness/libvirt.py) and stops them by PID.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import libvirt
from _node import REPO, BenchNode, guest_image, sh

from slurm_dgxvm import hypervisor, seed

NETWORK = "dgxvmbench"


def raw_boot(conn, base: Path, manifest: dict, image_dir: Path, i: int) -> tuple[float, float]:
    """Overlay and seed beforehand (untimed); time virsh create -> agent answers, then the
    destroy."""
    d = base / f"raw{i}"
    d.mkdir(mode=0o755)
    overlay = d / "os.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
       image_dir / manifest["disk"], overlay, "64G")
    hk = d / "hk"
    pub = seed.generate_keypair(hk, "bench")
    seed.write_seed(seed.SeedSpec(instance_id=f"raw{i}", hostname=f"raw{i}", user_name="root",
                                  uid=0, gid=0, home="/root", authorized_keys=(pub,),
                                  host_key_private=hk.read_text(), host_key_public=pub),
                    d / "seed.iso", name=f"raw{i}")
    xml = (REPO / "benchmarks/raw_domain.xml").read_text().format(
        name=f"raw{i}", kernel=image_dir / manifest["kernel"],
        initrd=image_dir / manifest["initrd"],
        cmdline=manifest["cmdline"], overlay=overlay, seed=d / "seed.iso", network=NETWORK,
        mac=f"52:54:00:be:00:{i:02x}", console=d / "console.log")
    xml_file = d / "dom.xml"
    xml_file.write_text(xml)
    t0 = time.monotonic()
    sh("virsh", "-c", "qemu:///system", "create", xml_file)
    dom = conn.lookupByName(f"raw{i}")
    while not hypervisor.agent_ping(dom):
        time.sleep(0.25)
    ready = time.monotonic() - t0
    t1 = time.monotonic()
    hypervisor.shutdown(dom, 60)
    down = time.monotonic() - t1
    shutil.rmtree(d)
    return ready, down


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    if os.geteuid():
        raise SystemExit("vm_bench: run as root (it starts libvirtd)")
    image_dir, manifest = guest_image()
    rows = []
    vm = 'share = "none"\nfit_vcpus = 1\nfit_memory_mib = 384\n'
    with BenchNode("bench", network=NETWORK, cidr="10.215.0.0/24", vm=vm,
                   image_dir=image_dir) as node:
        base = node.base
        conn = libvirt.open("qemu:///system")
        hypervisor.ensure_network(conn, NETWORK, "10.215.0.0/24", str(base / "state"))
        # one unmeasured round of each warms the page cache and libvirt's capability cache
        node.dgxvm("create", "--gpu-count", "1", "--domain", "warm", "--user", "root")
        node.dgxvm("delete", "--domain", "warm")
        raw_boot(conn, base, manifest, image_dir, 99)
        for i in range(args.runs):                    # interleaved, so drift hits both alike
            t_create, _ = node.dgxvm("create", "--gpu-count", "1", "--domain", f"b{i}",
                                     "--user", "root")
            t_delete, _ = node.dgxvm("delete", "--domain", f"b{i}")
            raw_ready, raw_down = raw_boot(conn, base, manifest, image_dir, i)
            rows.append((t_create, raw_ready, t_delete, raw_down))
            print(f"run {i}: dgxvm create {t_create:6.2f}s  raw virsh create {raw_ready:6.2f}s  "
                  f"dgxvm delete {t_delete:5.2f}s  (raw shutdown {raw_down:5.2f}s)", flush=True)
        conn.close()

    med = [statistics.median(c) for c in zip(*rows)]
    print()
    print(f"guest: dgxvm-test-guest {manifest['version']} under TCG; {args.runs} runs, medians")
    print(f"{'measure':<44} {'dgxvm':>8} {'raw virsh':>10} {'ratio':>7} {'target':>8}")
    print(f"{'create -> guest agent answers':<44} {med[0]:7.2f}s {med[1]:9.2f}s "
          f"{med[0] / med[1]:7.3f} {'<= 1.10':>8}  {'OK' if med[0] / med[1] <= 1.10 else 'MISSED'}")
    print(f"{'delete (incl. the guest shutdown)':<44} {med[2]:7.2f}s {med[3]:9.2f}s "
          f"{'':>7} {'':>8}")
    print(f"{'delete minus the guest shutdown':<44} {max(med[2] - med[3], 0):7.2f}s "
          f"{'':>10} {'':>7} {'< 2 s':>8}  {'OK' if med[2] - med[3] < 2 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
