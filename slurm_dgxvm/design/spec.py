"""The frozen description of one VM's libvirt domain. Built by :mod:`.designer`, changed only by
:mod:`.fit`, serialised by :mod:`.domain_xml`. Nothing here decides anything.

CPU sets are kept as tuples of host CPU ids; the templates print them through ``cpuset``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

XMLNS = "https://slurm-dgxvm.invalid/xmlns/vm/1"   # the <metadata> namespace of our domains


@dataclass(frozen=True)
class GuestCell:
    """One guest NUMA cell: which vCPUs and how much memory; the host node it is bound to."""

    id: int
    host_node: int | None          # None once fitted to a host without that node
    vcpus: tuple[int, ...]
    memory_mib: int


@dataclass(frozen=True)
class VcpuPin:
    vcpu: int
    cpus: tuple[int, ...]


@dataclass(frozen=True)
class Expander:
    """A pxb-pcie host bridge bound to one guest NUMA cell: the GPUs of that cell sit behind it,
    so the guest sees the same GPU-to-NUMA layout as the host."""

    index: int
    bus_nr: int
    cell: int
    slot: int                       # its slot on pcie-root


@dataclass(frozen=True)
class RootPort:
    index: int
    bus: int                        # the controller index it plugs into (an expander)
    slot: int
    chassis: int


@dataclass(frozen=True)
class SwitchPort:
    """A port of an emulated PCIe switch behind a root port: the upstream port (on the root
    port) or a downstream port (on the upstream port) holding one passed-through device."""

    index: int
    bus: int                        # the controller index it plugs into
    slot: int
    upstream: bool
    chassis: int | None             # downstream ports only


@dataclass(frozen=True)
class HostDev:
    pci: str                        # host address, 0000:34:00.0
    kind: str                       # gpu | nvswitch | ib-vf | ib-port
    alias: str                      # ua-gpu4, ua-nvswitch-e5, ua-ib-vf-0c-00-1
    bus: int                        # guest bus = the index of its root port

    @property
    def address(self) -> dict[str, str]:
        dom, bus, rest = self.pci.split(":")
        slot, func = rest.split(".")
        return {"domain": f"0x{dom}", "bus": f"0x{bus}", "slot": f"0x{slot}",
                "function": f"0x{func}"}


@dataclass(frozen=True)
class Disk:
    target: str                     # vda, vdb, ...
    path: str
    format: str                     # qcow2 | raw
    serial: str
    readonly: bool = False
    cache: str | None = None        # none (O_DIRECT) for OS/data disks
    io: str | None = None           # native
    discard: str | None = None
    queues: int | None = None
    iothread: int | None = None


@dataclass(frozen=True)
class Interface:
    network: str
    mac: str
    queues: int
    isolated: bool = True           # <port isolated>: no traffic to other isolated ports
    filter: str | None = None       # nwfilter (clean-traffic): anti-spoofing of MAC and IP
    filter_ip: str | None = None    # the filter's IP parameter: the VM's reserved address
    bridge: str | None = None       # set: a NIC on this host bridge (the job fabric's), not on
                                    # the libvirt network ``network``
    mtu: int | None = None          # the NIC's MTU (host tap and the guest's virtio-net)


@dataclass(frozen=True)
class Filesystem:
    driver: str                     # virtiofs
    source: str
    tag: str
    binary: str | None = None       # the virtiofsd libvirt runs (dgxvm's per-VM wrapper)


@dataclass(frozen=True)
class Boot:
    """Direct kernel boot when ``kernel`` is set, else firmware boots the first disk."""

    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None


@dataclass(frozen=True)
class Metadata:
    """What dgxvm writes into the domain's <metadata>, so `virsh dumpxml` says who owns it."""

    owner: str                      # job | domain
    job_id: int | None
    user: str | None
    machine: str
    gpus: tuple[int, ...]
    slurm_gpus: tuple[int, ...] | None
    image: str
    image_version: str
    fitted: tuple[str, ...] = ()    # what fit-to-host changed; () on real hardware


@dataclass(frozen=True)
class DomainSpec:
    name: str
    uuid: str
    title: str
    domain_type: str                # kvm | qemu
    machine_type: str               # q35
    vcpus: int
    sockets: int
    cores: int
    threads: int
    cpu_mode: str | None            # host-passthrough under KVM; None = the hypervisor's default
    cells: tuple[GuestCell, ...]
    memory_mib: int
    vcpupins: tuple[VcpuPin, ...]
    emulator_cpus: tuple[int, ...]
    iothreads: int
    iothread_cpus: tuple[int, ...]
    numa_nodes: tuple[int, ...]     # numatune strict on these host nodes; () = no numatune
    hugepage_kib: int | None
    memory_shared: bool             # virtiofs needs guest memory shared with virtiofsd
    memory_source: str | None       # memfd when shared without hugepages
    prealloc_threads: int | None    # parallel preallocation of large guests
    pcihole64_gib: int | None       # 64-bit MMIO window for the GPUs' BARs
    expanders: tuple[Expander, ...]
    root_ports: tuple[RootPort, ...]
    hostdevs: tuple[HostDev, ...]
    boot: Boot
    disks: tuple[Disk, ...]
    interfaces: tuple[Interface, ...]
    filesystems: tuple[Filesystem, ...]
    console_log: str
    metadata: Metadata
    xmlns: str = field(default=XMLNS)
    switch_ports: tuple[SwitchPort, ...] = ()   # GPUs with InfiniBand functions beside them
    spare_root_ports: int = 0       # empty root ports (libvirt places them): a warm VM's shares
