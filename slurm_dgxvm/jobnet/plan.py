"""The job fabric of one multi-node job on one node, planned: pure, no I/O.

A job that spans nodes gets, on each of them, a VXLAN device ``vxj<vni>`` (its segment, VNI =
:func:`vni_for` the job id) in a bridge ``brj<vni>`` that the job's VM there joins with a second
NIC; static forwarding entries send the segment's frames to the job's other nodes' underlay
addresses (``[jobnet] nodes``), and nothing else (no multicast, no learning). Every job uses the
same subnet (``[jobnet] subnet``): the VM on the job's i-th node (nodelist order) has address i
(:func:`slurm_dgxvm.config.jobnet_address`) and MAC :attr:`JobFabric.mac`, whatever node it is
on, so each Prolog computes the whole job's picture alone; jobs are kept apart by their VNI.

:func:`plan` is what the Prolog calls with ``SLURM_NODELIST`` (a value the job's user may
influence: a refusal is :class:`~slurm_dgxvm.errors.JobInputError`); :mod:`.apply` makes it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ..config import JobnetConfig, jobnet_address
from ..errors import ConfigError, JobInputError
from .hostlist import expand

#: What VXLAN over IPv4 adds to each frame: outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14.
VXLAN_OVERHEAD = 50
#: VNIs are 24 bits; 0 is left out.
VNI_MAX = 2 ** 24 - 1
VXLAN_PREFIX = "vxj"
BRIDGE_PREFIX = "brj"
#: What the nodelist is called in a refusal.
NODELIST = "SLURM_NODELIST"          # what slurmd 22.05 gives the Prolog


def vni_for(job_id: int) -> int:
    """The VNI of job ``job_id``: 1 .. 2**24-1, the same on every node.

    Job ids 1 .. 16777215 are their own VNI; past that it wraps (16777216 -> 1): two jobs
    whose ids differ by a multiple of 16777215 share a VNI. Slurm's default MaxJobId is
    67043328, so that happens once ids wrap past 16777215; :func:`.apply.apply` refuses a
    VNI whose devices exist on the node for another job, so two such jobs never share a node's
    segment (their VMs on disjoint nodes never meet: each node sends and accepts a VNI only to
    and from its own job's nodes)."""
    if isinstance(job_id, bool) or not isinstance(job_id, int) or job_id < 1:
        raise ValueError(f"job id {job_id!r} is not a positive integer")
    return (job_id - 1) % VNI_MAX + 1


@dataclass(frozen=True)
class Peer:
    """Another node of the job: its Slurm name and underlay IPv4 address."""

    node: str
    underlay: str


@dataclass(frozen=True)
class JobFabric:
    """Job ``job_id``'s fabric as node ``node`` (the job's ``index``-th, 0-based) makes it."""

    job_id: int
    vni: int
    node: str
    index: int
    nodes: tuple[str, ...]
    local: str                       # this node's underlay IPv4 address
    peers: tuple[Peer, ...]          # the job's other nodes, nodelist order
    vxlan: str                       # vxj<vni>
    bridge: str                      # brj<vni>
    mtu: int                         # underlay_mtu - 50: vxlan, bridge and the guest NIC
    port: int                        # VXLAN's UDP port
    subnet: ipaddress.IPv4Network

    def address(self, index: int) -> ipaddress.IPv4Interface:
        """The fabric address (with the subnet's prefix) of the VM on the job's
        ``index``-th node."""
        if not 0 <= index < len(self.nodes):
            raise ValueError(f"node index {index} is not one of the job's {len(self.nodes)}")
        ip = jobnet_address(self.subnet, index)
        if ip is None:     # config validation keeps max_nodes inside the subnet
            raise ValueError(f"node index {index} has no address in {self.subnet}")
        return ipaddress.IPv4Interface(f"{ip}/{self.subnet.prefixlen}")

    @property
    def vm_address(self) -> ipaddress.IPv4Interface:
        """This node's VM's fabric address."""
        return self.address(self.index)

    @property
    def hosts(self) -> tuple[tuple[str, str], ...]:
        """(node name, fabric address) for every node of the job: the guest's /etc/hosts, so
        ``SLURM_JOB_NODELIST`` names and ``MASTER_ADDR=<first node>`` reach the fabric."""
        return tuple((n, str(self.address(i).ip)) for i, n in enumerate(self.nodes))

    @property
    def mac(self) -> str:
        """This node's VM's fabric NIC MAC: ``02`` (locally administered, unicast), the VNI in
        three bytes, the node index in two (``02:00:30:39:00:01`` for VNI 12345, index 1)."""
        return mac_for(self.vni, self.index)

    def to_dict(self) -> dict:
        """JSON-able; :meth:`from_dict` reads it back. ``vm_address``, ``hosts`` and ``mac``
        are included for readers of the record; from_dict derives them again."""
        return {"job_id": self.job_id, "vni": self.vni, "node": self.node, "index": self.index,
                "nodes": list(self.nodes), "local": self.local,
                "peers": [{"node": p.node, "underlay": p.underlay} for p in self.peers],
                "vxlan": self.vxlan, "bridge": self.bridge, "mtu": self.mtu, "port": self.port,
                "subnet": str(self.subnet), "vm_address": str(self.vm_address),
                "hosts": [list(h) for h in self.hosts], "mac": self.mac}

    @classmethod
    def from_dict(cls, data: dict) -> JobFabric:
        """The fabric :meth:`to_dict` wrote. Raises ValueError (KeyError, TypeError as
        ValueError) when ``data`` is not one."""
        try:
            return cls(job_id=int(data["job_id"]), vni=int(data["vni"]), node=str(data["node"]),
                       index=int(data["index"]), nodes=tuple(str(n) for n in data["nodes"]),
                       local=str(data["local"]),
                       peers=tuple(Peer(str(p["node"]), str(p["underlay"]))
                                   for p in data["peers"]),
                       vxlan=str(data["vxlan"]), bridge=str(data["bridge"]),
                       mtu=int(data["mtu"]), port=int(data["port"]),
                       subnet=ipaddress.IPv4Network(data["subnet"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a job fabric: {exc!r}") from None


def mac_for(vni: int, index: int) -> str:
    """The fabric MAC of the VM on a job's ``index``-th node (see :attr:`JobFabric.mac`)."""
    if not 1 <= vni <= VNI_MAX or not 0 <= index <= 0xFFFF:
        raise ValueError(f"VNI {vni} / node index {index} out of range")
    octets = (0x02, vni >> 16, (vni >> 8) & 0xFF, vni & 0xFF, index >> 8, index & 0xFF)
    return ":".join(f"{o:02x}" for o in octets)


def device_names(vni: int) -> tuple[str, str]:
    """(VXLAN device, bridge) of VNI ``vni``: ``vxj<vni>``, ``brj<vni>`` (at most 11 bytes)."""
    return f"{VXLAN_PREFIX}{vni}", f"{BRIDGE_PREFIX}{vni}"


def plan(cfg: JobnetConfig, job_id: int, nodelist: str, node: str) -> JobFabric | None:
    """Job ``job_id``'s fabric on node ``node``, from the job's ``nodelist`` (Slurm hostlist).

    None when ``[jobnet] enabled`` is false, or when the job has one node (it needs no fabric).
    Raises ConfigError when ``node`` is not in ``[jobnet] nodes`` (this node's configuration,
    not the job, is at fault); JobInputError (``what`` SLURM_NODELIST, ``value`` the
    nodelist) when the nodelist does not parse, lists a node twice, names a node not in
    ``[jobnet] nodes``, does not contain ``node``, or has more than ``max_nodes`` nodes.

    A job on ``dgx[01-02]`` planned on dgx02 (nodes dgx01 = 192.168.50.11, dgx02 = .12, job
    12345): VNI 12345, index 1, vxj12345 in brj12345, local 192.168.50.12, one peer dgx01 at
    192.168.50.11, VM address 10.64.0.11/16, MAC 02:00:30:39:00:01, MTU 1450."""
    if not cfg.enabled:
        return None
    if node not in cfg.nodes:
        raise ConfigError(path="jobnet.nodes", reason=f"this node {node!r} has no underlay "
                                                      f"address in [jobnet] nodes")

    def refuse(reason: str) -> JobInputError:
        return JobInputError(what=NODELIST, value=nodelist, reason=reason)

    try:
        nodes = expand(nodelist)
    except ValueError as exc:
        raise refuse(f"not a Slurm hostlist: {exc}") from None
    if len(nodes) > cfg.max_nodes:
        raise refuse(f"{len(nodes)} nodes, more than [jobnet] max_nodes {cfg.max_nodes}")
    seen: set[str] = set()
    for name in nodes:
        if name in seen:
            raise refuse(f"node {name!r} is listed twice")
        seen.add(name)
        if name not in cfg.nodes:
            raise refuse(f"node {name!r} is not in [jobnet] nodes")
    if node not in seen:
        raise refuse(f"this node {node!r} is not in it")
    if len(nodes) == 1:
        return None
    vni = vni_for(job_id)
    vxlan, bridge = device_names(vni)
    return JobFabric(job_id=job_id, vni=vni, node=node, index=nodes.index(node), nodes=nodes,
                     local=cfg.nodes[node],
                     peers=tuple(Peer(n, cfg.nodes[n]) for n in nodes if n != node),
                     vxlan=vxlan, bridge=bridge, mtu=cfg.underlay_mtu - VXLAN_OVERHEAD,
                     port=cfg.port, subnet=ipaddress.IPv4Network(cfg.subnet))


__all__ = ["BRIDGE_PREFIX", "NODELIST", "VNI_MAX", "VXLAN_OVERHEAD", "VXLAN_PREFIX", "JobFabric",
           "Peer", "device_names", "mac_for", "plan", "vni_for"]
