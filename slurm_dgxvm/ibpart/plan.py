"""The pure part: a job's InfiniBand partition key and the GUIDs of what its VM holds.

Nothing here reads a file or talks to anything; :func:`plan_for` turns the job id, the placement
and the host model into a frozen :class:`IbPlan` that the backends carry out.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import RequestError
from ..placement.model import Placement
from ..topology.model import Host

PKEY_FULL = 0x8000          # the membership bit of a P_Key: set = full member (IBA 10.9.1)
PKEY_DEFAULT = 0x7fff       # the default partition: never a job's
PKEY_MAX = 0x7ffe


def pkey_for(job_id: int, pkey_min: int, pkey_max: int) -> int:
    """The job's partition key, 15 bits: ``pkey_min + job_id mod (pkey_max - pkey_min + 1)``.

    Two jobs whose ids differ by a multiple of the range share a key; with the default range
    (4096..32766) that takes 28671 jobs in between, and the OpenSM backend refuses a key another
    running job holds. Raises RequestError for a range outside 1..0x7ffe.

    Example: job 42 with the default range -> 0x102a (4138); as a full member, 0x902a.
    """
    if not 1 <= pkey_min <= pkey_max <= PKEY_MAX:
        raise RequestError(reason=f"partition key range {pkey_min}..{pkey_max} is not within "
                                  f"1..{PKEY_MAX}")
    return pkey_min + int(job_id) % (pkey_max - pkey_min + 1)


def vf_guid(node_guid: str, vf: int) -> str:
    """The GUID dgxvm gives VF ``vf`` of the HCA whose node GUID is ``node_guid`` (its node and
    port GUID alike): ``0x02``, the HCA's GUID's low 48 bits, the VF index. [INF: dgxvm's scheme]
    The 0x02 byte marks it locally administered (EUI-64 U/L bit), so it is never a vendor's; it is
    unique while the HCAs' GUIDs differ in their low 48 bits (the vendor's serial part) and a
    port has at most 256 VFs.

    Example: node GUID 0xb8cef60300000c00, VF 3 -> 0x02f60300000c0003.
    """
    base = int(node_guid, 16)
    if not 0 <= vf <= 0xff:
        raise RequestError(reason=f"VF index {vf} is beyond 255")
    return f"0x{(0x02 << 56) | ((base & 0xFFFF_FFFF_FFFF) << 8) | vf:016x}"


def colon_guid(guid: str) -> str:
    """``0x02f60300000c0003`` -> ``02:f6:03:00:00:0c:00:03``, as ``ip link ... node_guid`` takes
    it."""
    h = f"{int(guid, 16):016x}"
    return ":".join(h[i:i + 2] for i in range(0, 16, 2))


@dataclass(frozen=True)
class Member:
    """One InfiniBand function of the VM in the job's partition."""

    pci: str                 # the VF (or, for a whole port, the HCA) passed into the VM
    hca: str                 # the HCA's physical function
    vf: int | None           # virtfnN; None for a whole port
    guid: str                # its port GUID, 0x + 16 hex digits
    netdev: str | None       # the HCA's interface, for `ip link set NETDEV vf N ...`


@dataclass(frozen=True)
class IbPlan:
    """What one job's VM on this node needs of the fabric: its members in partition ``pkey``."""

    job_id: int
    pkey: int                # 15 bits, 1..0x7ffe
    members: tuple[Member, ...]

    @property
    def pkey_hex(self) -> str:
        """``0x102a``: the key as UFM's REST API and partitions.conf write it."""
        return f"0x{self.pkey:04x}"

    @property
    def full_pkey(self) -> int:
        """The key with the full-membership bit, as a member's P_Key table holds it (0x902a)."""
        return self.pkey | PKEY_FULL

    @property
    def guids(self) -> tuple[str, ...]:
        return tuple(m.guid for m in self.members)

    def guid_commands(self) -> tuple[tuple[str, ...], ...]:
        """The ``ip link`` commands that give each VF its GUID before the VM starts (the VF's
        node and port GUID; ip-link(8) ``vf NUM node_guid ... port_guid ...``). A whole port
        keeps its own."""
        out = []
        for m in self.members:
            if m.vf is None:
                continue
            g = colon_guid(m.guid)
            out.append(("ip", "link", "set", "dev", m.netdev or "", "vf", str(m.vf),
                        "node_guid", g))
            out.append(("ip", "link", "set", "dev", m.netdev or "", "vf", str(m.vf),
                        "port_guid", g))
        return tuple(out)


def plan_for(job_id: int, placement: Placement, host: Host, *, pkey_min: int = 4096,
             pkey_max: int = PKEY_MAX) -> IbPlan:
    """The job's partition key and the GUIDs of ``placement``'s InfiniBand functions.

    A VF's GUID is :func:`vf_guid` of its HCA's node GUID; a whole port's is the HCA's node GUID
    (a single-port ConnectX HCA's port GUID [INF]). Raises RequestError when an HCA of the
    placement is not on ``host`` or has no node GUID (no RDMA device: the driver is not loaded).
    """
    members = []
    for f in placement.ib:
        nic = host.nic_by_pci.get(f.hca)
        if nic is None or not nic.node_guid:
            raise RequestError(reason=f"InfiniBand HCA {f.hca} of the placement has no node GUID "
                                      f"on this host (is mlx5_ib loaded?)")
        if f.vf is not None and not nic.netdev:
            raise RequestError(reason=f"InfiniBand HCA {f.hca} has no network interface to set "
                                      f"VF {f.vf}'s GUID through")
        guid = nic.node_guid if f.vf is None else vf_guid(nic.node_guid, f.vf)
        members.append(Member(pci=f.pci, hca=f.hca, vf=f.vf, guid=guid, netdev=nic.netdev))
    return IbPlan(job_id=int(job_id), pkey=pkey_for(job_id, pkey_min, pkey_max),
                  members=tuple(members))
