"""Design: turn a placement, an image profile and a VM's identity into a frozen DomainSpec.

Every decision about the domain's shape lives here (Nova's ``designer.py`` is the model); the
templates only serialise. Worked example: 4 GPUs on a DGX-2 placed on NUMA node 0, CPUs
1-11,49-59 -> 22 vCPUs in one guest cell (sockets=1, cores=11, threads=2, each vCPU pair pinned
to one host core's two threads), numatune strict on node 0, 1 GiB hugepages, the 4 GPUs and
their 3 NVSwitches each on a root port behind one pxb-pcie bound to guest cell 0, emulator and
I/O threads on the node's host-reserved core. With a partition's ``ib = "vf"`` a 2-GPU VM on a
DGX H100 also gets an SR-IOV VF of each GPU's own HCA: each GPU's root port holds a PCIe switch
with the GPU and its VF on two downstream ports, behind the cell's pxb-pcie, so the guest sees
GPU and HCA under one switch in one NUMA cell, as GPUDirect RDMA wants.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ..placement.model import Placement
from ..ranges import format_index_list
from ..topology.model import Host
from .spec import (Boot, Disk, DomainSpec, Expander, Filesystem, GuestCell, HostDev, Interface,
                   Metadata, RootPort, SwitchPort, VcpuPin)

# 64-bit MMIO window per GPU, GiB: the GPU's BAR1 rounded up with room for the rest. V100 32 GB
# has a 32 GiB BAR1, A100 80 GB and H100 80 GB have 128 GiB BAR1 [DOC: nvidia-smi -q "BAR1
# Memory Usage"]. Too small a window and the guest driver cannot map the GPU.
MMIO_GIB_PER_GPU = {"dgx2": 64, "dgx-a100": 256, "dgx-h100": 256}
DEFAULT_MMIO_GIB_PER_GPU = 256
PREALLOC_MIN_MIB = 16 * 1024       # preallocate bigger guests with parallel threads
MAX_QUEUES = 8                     # virtio-net / virtio-blk queues
IOTHREADS = 1
ROOT_PORTS_FIRST_SLOT = 0
# libvirt's stock filter: no MAC, IP or ARP spoofing, only IPv4 and ARP, nothing else at layer 2
# (/etc/libvirt/nwfilter/clean-traffic.xml). With IP set it allows exactly the reserved address.
ANTI_SPOOFING_FILTER = "clean-traffic"


#: Root ports declared without a device for a warm VM, whose work dir and image cache shares are
#: plugged at the claim. libvirt puts the devices it addresses itself (disks, NIC, serial, USB,
#: balloon, RNG: 6 to 8) on the first free ports and adds ports only when none is free, so a
#: warm VM declares enough for those and for its 2 shares.
SPARE_ROOT_PORTS = 12


@dataclass(frozen=True)
class VmInputs:
    """Who the VM is and where its files are (decided by the lifecycle)."""

    name: str
    uuid: str
    owner: str                 # job | domain
    job_id: int | None
    user: str | None
    os_disk: str
    seed: str
    data_disk: str | None
    console_log: str
    network: str
    mac: str
    share: str                 # virtiofs | none
    workdir: str | None
    share_binary: str | None = None   # the virtiofsd wrapper serving workdir as the job's user
    address: str | None = None        # reserved on ``network``: the anti-spoofing filter's IP
    image_cache: str | None = None    # the user's container image cache (read-only in the guest)
    image_cache_binary: str | None = None  # the virtiofsd wrapper serving it as the job's user
    fabric: FabricNic | None = None   # a multi-node job's second NIC, on its job fabric
    shares_later: bool = False        # a warm VM: its shares are plugged at the claim


@dataclass(frozen=True)
class FabricNic:
    """The VM's NIC on its job's fabric (slurm_dgxvm.jobnet): on the job's bridge, with the MAC,
    MTU and address the job's plan gives this node."""

    bridge: str
    mac: str
    mtu: int
    address: str                      # the VM's fabric address, without the prefix length


def mac_for(name: str) -> str:
    """A stable locally-administered MAC for a domain name (QEMU's 52:54:00 prefix)."""
    h = hashlib.sha256(name.encode()).digest()
    return f"52:54:00:{h[0]:02x}:{h[1]:02x}:{h[2]:02x}"


def share_tag(path: str) -> str:
    """The virtiofs tag of a shared directory: short (<= 36 chars) and free of odd bytes."""
    return "dgxvm-" + hashlib.sha256(path.encode()).hexdigest()[:16]


def image_cache_tag(path: str) -> str:
    """The virtiofs tag of the user's container image cache: never a work dir's tag."""
    return "dgxvm-img-" + hashlib.sha256(path.encode()).hexdigest()[:16]


def design(host: Host, placement: Placement, image, vm: VmInputs, *, domain_type: str,
           machine_type: str = "q35") -> DomainSpec:
    """The domain for ``placement`` booting ``image`` as ``vm``.

    ``image`` is an :class:`slurm_dgxvm.images.Image` (name, version, path, format, kernel,
    initrd, cmdline). Raises nothing: the placement is already valid for ``host``.
    """
    threads = host.threads_per_core
    if any(len(c.cpus) % threads for c in placement.cells):
        threads = 1
    vcpus = placement.vcpus
    even = len({len(c.cpus) for c in placement.cells}) == 1
    sockets = len(placement.cells) if even else 1
    cores = vcpus // (sockets * threads)

    cells = tuple(GuestCell(id=i, host_node=c.host_node, vcpus=c.vcpus, memory_mib=c.memory_mib)
                  for i, c in enumerate(placement.cells))
    pins = tuple(VcpuPin(vcpu=v, cpus=(cpu,))
                 for c in placement.cells for v, cpu in zip(c.vcpus, c.cpus))

    expanders, ports, switch_ports, hostdevs = _pcie_layout(host, placement)
    gpu_count = len(placement.gpus)
    mmio = MMIO_GIB_PER_GPU.get(host.machine, DEFAULT_MMIO_GIB_PER_GPU)
    shared = vm.share == "virtiofs" and (vm.workdir is not None or vm.image_cache is not None
                                         or vm.shares_later)
    queues = max(1, min(vcpus, MAX_QUEUES))

    disks = [Disk(target="vda", path=vm.os_disk, format="qcow2", serial="dgxvm-os",
                  cache="none", io="native", discard="unmap", queues=queues, iothread=1)]
    disks.append(Disk(target="vdb", path=vm.seed, format="raw", serial="cidata", readonly=True))
    if vm.data_disk:
        disks.append(Disk(target="vdc", path=vm.data_disk, format="qcow2", serial="dgxvm-data",
                          cache="none", io="native", discard="unmap", queues=queues, iothread=1))
    filesystems: list[Filesystem] = []
    if vm.workdir and vm.share != "none":
        filesystems.append(Filesystem(driver=vm.share, source=vm.workdir,
                                      tag=share_tag(vm.workdir), binary=vm.share_binary))
    if vm.image_cache and vm.share != "none":
        filesystems.append(Filesystem(driver=vm.share, source=vm.image_cache,
                                      tag=image_cache_tag(vm.image_cache),
                                      binary=vm.image_cache_binary))

    boot = Boot(kernel=image.kernel, initrd=image.initrd, cmdline=image.cmdline)
    who = f"job {vm.job_id}" if vm.job_id is not None else "admin"
    return DomainSpec(
        name=vm.name,
        uuid=vm.uuid,
        title=f"dgxvm: {gpu_count} GPU(s) {format_index_list(placement.gpus)} on {host.display_name}, {who}",
        domain_type=domain_type,
        machine_type=machine_type,
        vcpus=vcpus, sockets=sockets, cores=cores, threads=threads,
        cpu_mode="host-passthrough" if domain_type == "kvm" else None,
        cells=cells,
        memory_mib=placement.memory_mib,
        vcpupins=pins,
        emulator_cpus=placement.emulator_cpus,
        iothreads=IOTHREADS,
        iothread_cpus=placement.emulator_cpus,
        numa_nodes=placement.numa_nodes,
        hugepage_kib=placement.hugepage_kib,
        memory_shared=shared,
        memory_source="memfd" if shared and placement.hugepage_kib is None else None,
        prealloc_threads=(min(16, max(1, vcpus // 2))
                          if placement.memory_mib >= PREALLOC_MIN_MIB else None),
        pcihole64_gib=_pow2(mmio * gpu_count) if gpu_count else None,
        expanders=expanders,
        root_ports=ports,
        spare_root_ports=SPARE_ROOT_PORTS if vm.shares_later else 0,
        switch_ports=switch_ports,
        hostdevs=hostdevs,
        boot=boot,
        disks=tuple(disks),
        interfaces=(_interface(vm, queues),) + _fabric_interface(vm, queues),
        filesystems=tuple(filesystems),
        console_log=vm.console_log,
        metadata=Metadata(owner=vm.owner, job_id=vm.job_id, user=vm.user,
                          machine=placement.machine, gpus=placement.gpus,
                          slurm_gpus=placement.slurm_gpus, image=image.name,
                          image_version=image.version),
    )


def _interface(vm: VmInputs, queues: int) -> Interface:
    """The VM's one NIC on dgxvm's network. The guest is a tenant whose user is root in it, so
    its port is isolated on the bridge (it reaches the host side only, never another guest;
    also set on the network, this keeps it for a network defined without it), and
    ``clean-traffic`` pins it to its MAC and, given the reserved address, to that IP: it cannot
    pose as another guest to the host, to the bridge's MAC learning or to ARP. Without an
    address libvirt would learn the first IP the guest uses, so the lifecycle always passes it.
    """
    return Interface(network=vm.network, mac=vm.mac, queues=queues, isolated=True,
                     filter=ANTI_SPOOFING_FILTER, filter_ip=vm.address)


def _fabric_interface(vm: VmInputs, queues: int) -> tuple[Interface, ...]:
    """The job fabric's NIC, after the management NIC (the guest's eth0 stays the management
    one): on the job's bridge, its port isolated there too, ``clean-traffic`` pinning it to its
    MAC and its fabric address (no other source address, no ARP for another, no IPv6 or other
    layer 2 protocol reaches the job's other VMs), the MTU that leaves room for VXLAN."""
    f = vm.fabric
    if f is None:
        return ()
    return (Interface(network="", bridge=f.bridge, mac=f.mac, queues=queues, isolated=True,
                      filter=ANTI_SPOOFING_FILTER, filter_ip=f.address, mtu=f.mtu),)


def _pow2(n: int) -> int:
    out = 1
    while out < n:
        out *= 2
    return out


def _pcie_layout(host: Host, p: Placement):
    """One pxb-pcie per guest cell, one root port per passed-through device behind the pxb of
    the cell its device is nearest to. NVSwitches go with the cell of their baseboard's GPUs.
    A GPU with InfiniBand functions (VFs or whole ports, :mod:`slurm_dgxvm.placement.ib`) gets
    a PCIe switch on its root port instead, the GPU and its HCA functions on its downstream
    ports: in the guest they share a switch as on the host. NCCL decides on GPUDirect RDMA by the
    PCIe distance between GPU and NIC (NCCL_NET_GDR_LEVEL: PIX, PXB, PHB, SYS) [DOC: NCCL
    environment variables]; a shared switch (PIX) is the nearest, two root ports of one host
    bridge (PHB) may fall outside its default [INF].

    Controller indices grow from 1 in parent-before-child order (libvirt requires it); each
    pxb gets a window of bus numbers high above pcie-root's own buses (0x80 and up), wide
    enough for its ports.
    """
    if not p.gpus and not p.nvswitches:
        return (), (), (), ()
    cell_of_gpu = {g: i for i, c in enumerate(p.cells) for g in c.gpus}
    # per cell: groups of (pci, kind, alias); a group of more than one shares a switch
    per_cell: dict[int, list[list[tuple[str, str, str]]]] = {i: [] for i in range(len(p.cells))}
    boards: dict[int, int] = {}
    ib_of_gpu: dict[int, list] = {}
    for f in p.ib:
        ib_of_gpu.setdefault(f.gpu, []).append(f)
    for gi, pci in zip(p.gpus, p.gpu_pcis):
        cell = cell_of_gpu.get(gi, 0)
        group = [(pci, "gpu", f"ua-gpu{gi}")]
        for f in ib_of_gpu.get(gi, ()):
            kind = "ib-port" if f.vf is None else "ib-vf"
            group.append((f.pci, kind, f"ua-{kind}-" + f.pci[5:].replace(":", "-")
                          .replace(".", "-")))
        per_cell[cell].append(group)
        boards.setdefault(host.gpu(gi).board, cell)
    board_of_switch = {s.pci: s.board for s in host.nvswitches}
    for pci in p.nvswitches:
        cell = boards.get(board_of_switch.get(pci, 0), 0)
        per_cell[cell].append([(pci, "nvswitch", "ua-nvswitch-" + pci.split(":")[1])])

    ncells = len(p.cells)
    step = 0x80 // ncells
    expanders, ports, switch_ports, devs = [], [], [], []
    index, chassis = 1, 1
    for cell in range(ncells):
        groups = per_cell[cell]
        if not groups:
            continue
        pxb = Expander(index=index, bus_nr=0x80 + cell * step, cell=cell, slot=0x10 + cell)
        expanders.append(pxb)
        index += 1
        for slot, group in enumerate(groups, start=ROOT_PORTS_FIRST_SLOT):
            port = RootPort(index=index, bus=pxb.index, slot=slot, chassis=chassis)
            ports.append(port)
            index += 1
            chassis += 1
            if len(group) == 1:
                pci, kind, alias = group[0]
                devs.append(HostDev(pci=pci, kind=kind, alias=alias, bus=port.index))
                continue
            up = SwitchPort(index=index, bus=port.index, slot=0, upstream=True, chassis=None)
            switch_ports.append(up)
            index += 1
            for down_slot, (pci, kind, alias) in enumerate(group):
                down = SwitchPort(index=index, bus=up.index, slot=down_slot, upstream=False,
                                  chassis=chassis)
                switch_ports.append(down)
                devs.append(HostDev(pci=pci, kind=kind, alias=alias, bus=down.index))
                index += 1
                chassis += 1
    return tuple(expanders), tuple(ports), tuple(switch_ports), tuple(devs)
