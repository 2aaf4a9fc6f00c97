"""VM lifecycle benchmark: `dgxvm create` to guest-ready next to a raw `virsh create` of the very
domain dgxvm defined, to the same readiness point, in one run; then `dgxvm delete`.

Target (DESIGN.md): create/raw ratio <= 1.10; delete < 2 s plus the guest's own shutdown.

The baseline is the same guest, so the ratio is dgxvm's own overhead: after each `dgxvm create`,
and before its `dgxvm delete`, the benchmark takes the domain XML dgxvm wrote into the VM's
directory (records.DOMAIN_XML, exactly what it defined) and makes its raw twin, untimed: a copy of
dgxvm's own NoCloud seed, a fresh OS overlay made as dgxvm made its own (images.create_overlay:
the same backing image, format and size; a data disk likewise, when the VM has one), and a DHCP
reservation on dgxvm's network as dgxvm makes one. In the XML only what must differ for a second
domain changes: the name, the UUID (dropped: libvirt makes one), the MAC, the reserved address in
the interface's filter, and the paths of those files; dgxvm's <metadata> stays (libvirt ignores
it, and dgxvm's libvirt hook goes by the VM record, which the twin has none of). After the
delete, `virsh create` of that XML is timed to the readiness dgxvm's create waits for (the same
function: guest.wait_ready, with the image profile's readiness), so dgxvm pays for every step it
adds (placement, ledger, keys, seed, overlay, design, define, reservation) and raw for none.

Run as root on a machine without a running libvirtd: python benchmarks/vm_bench.py [--runs N]
It starts libvirtd/virtlogd in a network namespace (harness/libvirt.py) and stops them by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
from _node import REPO, BenchNode, guest_image, sh

from slurm_dgxvm.virt import hypervisor
from slurm_dgxvm import seed
from slurm_dgxvm.design.spec import XMLNS
from slurm_dgxvm.virt.guest import wait_ready
from slurm_dgxvm.images import ImageStore, create_disk, create_overlay
from slurm_dgxvm.records import CONSOLE_LOG, DATA_DISK, DOMAIN_XML, OS_DISK, SEED, VmStore

NETWORK = "dgxvmbench"
CIDR = "10.215.0.0/24"
GIB = 1024 ** 3


class RawTwin:
    """The raw baseline of dgxvm VM ``name``: made from its VM directory while it exists
    (:meth:`make`, untimed), booted with ``virsh create`` after dgxvm deleted it (:meth:`boot`)."""

    def __init__(self, node: BenchNode, conn, name: str, i: int):
        self.node, self.conn, self.src = node, conn, name
        self.name, self.mac = f"raw{i}", ""          # its address slot's, from make()
        self.dir = node.base / self.name
        self.xml_file = self.dir / "domain.xml"
        self.readiness = "auto"
        self.network = NETWORK
        self.start_s = 0.0                           # virsh create alone, from boot()

    def make(self) -> RawTwin:
        state = self.node.base / "state"
        vmdir = VmStore(state).dir(self.src)
        rec = VmStore(state).load(self.src)
        image = ImageStore(self.node.base / "images").get(rec.image)
        self.readiness = image.readiness
        self.dir.mkdir(mode=0o711)
        os.chmod(self.dir, 0o711)                   # as VmStore.make_dir: QEMU opens by path
        ET.register_namespace("dgxvm", XMLNS)
        root = ET.fromstring((vmdir / DOMAIN_XML).read_text())
        made: dict[str, str] = {}

        def own_file(filename: str) -> str:
            """The twin's copy of the VM's file ``filename``, made as dgxvm made the VM's."""
            if filename not in made:
                dst = self.dir / filename
                if filename == OS_DISK:
                    create_overlay(image, dst, rec.placement.disk_gib)
                elif filename == DATA_DISK:
                    info = json.loads(sh("qemu-img", "info", "-U", "--output=json",
                                         vmdir / DATA_DISK).stdout)
                    create_disk(dst, info["virtual-size"] // GIB)
                elif filename == SEED:
                    shutil.copy2(vmdir / SEED, dst)  # dgxvm's own seed, read-only in the guest
                elif filename != CONSOLE_LOG:
                    raise SystemExit(f"vm_bench: {self.src}'s domain XML uses {vmdir / filename}, "
                                     "which the raw twin does not know how to make")
                made[filename] = str(dst)
            return made[filename]

        prefix = f"{vmdir}/"
        for el in root.iter():
            for attr, value in el.attrib.items():
                if value.startswith(prefix):
                    el.set(attr, own_file(value[len(prefix):]))
            if el.text and el.text.startswith(prefix):
                el.text = own_file(el.text[len(prefix):])
        if OS_DISK not in made:
            raise SystemExit(f"vm_bench: {self.src}'s domain XML has no {OS_DISK} in {vmdir}")
        root.find("name").text = self.name
        root.remove(root.find("uuid"))
        iface = root.find("devices/interface")
        self.network = iface.find("source").get("network")
        net = self.conn.networkLookupByName(self.network)
        self.mac, address = hypervisor.take_address(self.conn, net, str(state), self.name, CIDR)
        iface.find("mac").set("address", self.mac)
        for param in iface.iterfind("filterref/parameter[@name='IP']"):
            param.set("value", address)
        self.xml_file.write_text(ET.tostring(root, encoding="unicode") + "\n")
        return self

    def boot(self) -> tuple[float, float]:
        """Time ``virsh create`` -> ready as dgxvm's create waits for it, then the shutdown; the
        twin is gone afterwards."""
        try:
            t0 = time.monotonic()
            sh("virsh", "-c", "qemu:///system", "create", self.xml_file)
            self.start_s = time.monotonic() - t0
            dom = self.conn.lookupByName(self.name)
            wait_ready(dom, name=self.name, timeout_s=300, console_log=self.dir / CONSOLE_LOG,
                       readiness=self.readiness)
            ready = time.monotonic() - t0
            t1 = time.monotonic()
            hypervisor.shutdown(dom, 60)
            return ready, time.monotonic() - t1
        finally:
            self.remove()

    def remove(self) -> None:
        hypervisor.give_back_address(self.conn, self.network, str(self.node.base / "state"),
                                     self.name, self.mac)
        shutil.rmtree(self.dir, ignore_errors=True)


def raw_boot(conn, base: Path, manifest: dict, image_dir: Path, i: int) -> tuple[float, float]:
    """The hand-written baseline (benchmarks/raw_domain.xml), which benchmarks/slurm_bench.py
    still uses; vm_bench itself boots dgxvm's own domain (:class:`RawTwin`). Overlay and seed
    beforehand (untimed); time virsh create -> agent answers, then the destroy."""
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


def dgxvm_and_raw(node: BenchNode, conn, name: str, i: int,
                  stages: list[dict] | None = None) -> tuple[float, float, float, float]:
    """dgxvm create NAME, its raw twin made, dgxvm delete NAME, the twin booted: (create, raw
    ready, delete, raw shutdown) in seconds; the create's stage times appended to ``stages``."""
    t_create, r = node.dgxvm("create", "--gpu-count", "1", "--domain", name, "--user", "root",
                             "--json")
    if stages is not None:
        stages.append(json.loads(r.stdout)["create_stages"])
    twin = RawTwin(node, conn, name, i)
    try:
        twin.make()
    except BaseException:
        twin.remove()
        raise
    t_delete, _ = node.dgxvm("delete", "--domain", name)
    raw_ready, raw_down = twin.boot()
    if stages is not None:
        stages[-1] = {**stages[-1], "raw start": twin.start_s,
                      "raw ready": raw_ready - twin.start_s}
    return t_create, raw_ready, t_delete, raw_down


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    if os.geteuid():
        raise SystemExit("vm_bench: run as root (it starts libvirtd)")
    image_dir, manifest = guest_image()
    rows, stages = [], []
    vm = 'share = "none"\nfit_vcpus = 1\nfit_memory_mib = 384\n'
    with BenchNode("bench", network=NETWORK, cidr=CIDR, vm=vm, image_dir=image_dir) as node:
        conn = libvirt.open("qemu:///system")
        hypervisor.ensure_network(conn, NETWORK, CIDR, str(node.base / "state"))
        # one unmeasured round warms the page cache and libvirt's capability cache
        dgxvm_and_raw(node, conn, "warm", 99)
        for i in range(args.runs):                    # interleaved, so drift hits both alike
            rows.append(dgxvm_and_raw(node, conn, f"b{i}", i, stages))
            t_create, raw_ready, t_delete, raw_down = rows[-1]
            print(f"run {i}: dgxvm create {t_create:6.2f}s  raw virsh create {raw_ready:6.2f}s  "
                  f"dgxvm delete {t_delete:5.2f}s  (raw shutdown {raw_down:5.2f}s)", flush=True)
        conn.close()

    med = [statistics.median(c) for c in zip(*rows)]
    print()
    print(f"guest: dgxvm-test-guest {manifest['version']} under TCG; the raw baseline boots the "
          f"domain XML dgxvm defined; {args.runs} runs, medians")
    print(f"{'measure':<44} {'dgxvm':>8} {'raw virsh':>10} {'ratio':>7} {'target':>8}")
    print(f"{'create -> guest ready':<44} {med[0]:7.2f}s {med[1]:9.2f}s "
          f"{med[0] / med[1]:7.3f} {'<= 1.10':>8}  {'OK' if med[0] / med[1] <= 1.10 else 'MISSED'}")
    print(f"{'delete (incl. the guest shutdown)':<44} {med[2]:7.2f}s {med[3]:9.2f}s "
          f"{'':>7} {'':>8}")
    print(f"{'delete minus the guest shutdown':<44} {max(med[2] - med[3], 0):7.2f}s "
          f"{'':>10} {'':>7} {'< 2 s':>8}  {'OK' if med[2] - med[3] < 2 else 'MISSED'}")
    # where dgxvm's own part goes: its create stages (the record's), medians; "ready" is
    # the guest's boot after start, which the raw twin pays too: beside them, the twin's
    # virsh create ("raw start") and its wait for the guest ("raw ready")
    print("\ndgxvm create's stages (medians): " + ", ".join(
        f"{k} {statistics.median(s.get(k, 0.0) for s in stages):.3f}s" for k in stages[0]
        if not k.startswith("raw ")))
    print("the raw twin (medians): " + ", ".join(
        f"{k[4:]} {statistics.median(s[k] for s in stages):.3f}s"
        for k in ("raw start", "raw ready")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
