"""The job fabric made and removed on this node: ``ip``, ``bridge`` and ``nft``, one process
each (``ip -batch -``, ``bridge -batch -``, ``nft -f -``), through :func:`~slurm_dgxvm.tools.run_tool`.

:func:`apply` makes, for a :class:`~.plan.JobFabric`:

* ``vxj<vni>``: VXLAN id VNI, local = this node's underlay address, the fabric's UDP port,
  ``nolearning`` (no source address is ever learnt from a packet), MTU underlay - 50;
* ``brj<vni>``: a bridge with that MTU and no address: IPv6 is off on it (``disable_ipv6``,
  and no link-local address is generated), so the host has no presence on the job's network;
  the VXLAN device its port; both up and tagged ``alias dgxvm-job=<job id>``;
* one all-zero forwarding entry per peer (``bridge fdb append 00:00:00:00:00:00 dev vxjN dst
  PEER``): every frame the bridge floods goes to each of the job's other nodes, unicast; and
  one entry per peer for its VM's MAC, so a frame to that VM goes to its node alone;
* the job's part of the nft guard (:func:`guard_script`).

**The guard.** VXLAN carries no authentication (RFC 7348 §7): anyone who can send UDP to a
node's VXLAN port can put frames into any segment. The table ``inet dgxvm-jobnet`` holds

* ``input``: a packet to the VXLAN port goes through the verdict map ``vnis`` (the VNI, read as
  the raw 24 bits at ``@th,96,24`` of the UDP header + VXLAN header) to the VNI's chain
  ``job-<vni>``, which accepts it from the job's peers' underlay addresses only and drops it
  otherwise; a VNI with no chain, and anything else to the port (IPv6 included), is dropped.
  Anything arriving on a ``brj*`` bridge is dropped (the host takes nothing from a job's VMs);
* ``forward``: UDP to the VXLAN port routed through this node is dropped: a guest behind
  libvirt's NAT network cannot reach another node's VXLAN port with this node's address, which
  its peers accept;
* and a table ``arp dgxvm-jobnet`` drops ARP arriving on ``brj*``, so the host does not answer
  for its own addresses on a job's network.

The tables and base chains are created by the first :func:`apply` (each apply writes them
again, identically, in its transaction) and kept when the last job goes: with no job they drop
only VXLAN-port traffic, which nothing else may use on a GPU node (docs/admin/jobnet.md).
:func:`teardown` removes the VNI's chain and map element. Changing ``[jobnet] port`` needs a
node with no multi-node job on it.

On a failure :func:`apply` removes what it made and raises JobFabricError naming the step and
the tool's output. The scripts are rendered by pure functions (``*_script``), unit-tested.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
from pathlib import Path

from ..errors import JobFabricError
from ..tools import run_tool
from .plan import BRIDGE_PREFIX, VNI_MAX, VXLAN_PREFIX, JobFabric, device_names, mac_for

IP = "ip"
BRIDGE = "bridge"
NFT = "nft"
TOOL_TIMEOUT_S = 20.0
TABLE = "dgxvm-jobnet"
MAP = "vnis"
#: ``ip link set ... alias`` of our devices: ``dgxvm-job=<job id>``
ALIAS_PREFIX = "dgxvm-job="
_DEVICE = re.compile(rf"({VXLAN_PREFIX}|{BRIDGE_PREFIX})([1-9][0-9]{{0,7}})")
_CHAIN = re.compile(r"job-([1-9][0-9]{0,7})")
# /proc/sys/net is the network namespace of the process that opens it (unlike /sys/class/net,
# which is the namespace of whoever mounted sysfs): the right one wherever this runs.
IPV6_CONF = "/proc/sys/net/ipv6/conf/{dev}/disable_ipv6"


def job_chain(vni: int) -> str:
    return f"job-{vni}"


def _check_vni(vni: int) -> None:
    if isinstance(vni, bool) or not isinstance(vni, int) or not 1 <= vni <= VNI_MAX:
        raise ValueError(f"VNI {vni!r} is not 1-{VNI_MAX}")


# -- rendering (pure) ------------------------------------------------------------------------------
def ip_script(fab: JobFabric) -> str:
    """The ``ip -batch -`` input that makes the VXLAN device and the bridge (down until the
    last two lines: nothing flows before both are complete)."""
    ipaddress.IPv4Address(fab.local)
    alias = f"{ALIAS_PREFIX}{fab.job_id}"
    return "\n".join([
        f"link add {fab.bridge} mtu {fab.mtu} type bridge",
        f"link set {fab.bridge} addrgenmode none alias {alias}",
        f"link add {fab.vxlan} mtu {fab.mtu} type vxlan id {fab.vni} local {fab.local} "
        f"dstport {fab.port} nolearning",
        f"link set {fab.vxlan} master {fab.bridge} addrgenmode none alias {alias}",
        f"link set {fab.vxlan} up",
        f"link set {fab.bridge} up",
    ]) + "\n"


def fdb_script(fab: JobFabric) -> str:
    """The ``bridge -batch -`` input: per peer, one all-zero entry (broadcast, multicast and
    unknown unicast go to every peer: head-end replication) and one for the MAC its VM has
    (:func:`~.plan.mac_for`), so unicast to it goes to that peer alone."""
    lines = []
    for p in fab.peers:
        ipaddress.IPv4Address(p.underlay)
        lines.append(f"fdb append 00:00:00:00:00:00 dev {fab.vxlan} dst {p.underlay}")
    for p in fab.peers:
        mac = mac_for(fab.vni, fab.nodes.index(p.node))
        lines.append(f"fdb add {mac} dev {fab.vxlan} dst {p.underlay}")
    return "\n".join(lines) + "\n" if lines else ""


def _base_lines(port: int) -> list[str]:
    t = f"inet {TABLE}"
    return [
        f"add table {t}",
        f"add map {t} {MAP} {{ typeof @th,96,24 : verdict; }}",
        f"add chain {t} input {{ type filter hook input priority filter; policy accept; }}",
        f"add chain {t} forward {{ type filter hook forward priority filter; policy accept; }}",
        f"flush chain {t} input",
        f"flush chain {t} forward",
        f'add rule {t} input iifname "{BRIDGE_PREFIX}*" drop '
        f'comment "the host takes nothing from a job fabric"',
        f"add rule {t} input udp dport {port} @th,96,24 vmap @{MAP} "
        f'comment "VXLAN: the VNI\'s job chain"',
        f'add rule {t} input udp dport {port} drop comment "VXLAN of no job here"',
        f'add rule {t} forward iifname != "{BRIDGE_PREFIX}*" udp dport {port} drop '
        f'comment "VXLAN routed through this node (a guest behind NAT)"',
        f"add table arp {TABLE}",
        f"add chain arp {TABLE} input {{ type filter hook input priority filter; "
        f"policy accept; }}",
        f"flush chain arp {TABLE} input",
        f'add rule arp {TABLE} input iifname "{BRIDGE_PREFIX}*" drop '
        f'comment "the host answers no ARP on a job fabric"',
    ]


def _removal_lines(vni: int) -> list[str]:
    """Remove VNI ``vni``'s element and chain whether or not they exist (``add`` then
    ``delete`` in one transaction: nft 1.0.6 has no ``destroy``)."""
    t, chain = f"inet {TABLE}", job_chain(vni)
    return [
        f"add table {t}",
        f"add map {t} {MAP} {{ typeof @th,96,24 : verdict; }}",
        f"add chain {t} {chain}",
        f"add element {t} {MAP} {{ {vni} : jump {chain} }}",
        f"delete element {t} {MAP} {{ {vni} }}",
        f"flush chain {t} {chain}",
        f"delete chain {t} {chain}",
    ]


def guard_script(fab: JobFabric) -> str:
    """The ``nft -f -`` input of :func:`apply`: the tables and base chains (again), then the
    job's chain in place of whatever VNI ``fab.vni`` had (one transaction)."""
    chain = job_chain(fab.vni)
    peers = ", ".join(str(ipaddress.IPv4Address(p.underlay)) for p in fab.peers)
    lines = [f"# dgxvm jobnet: job {fab.job_id}, VNI {fab.vni}, node {fab.node}",
             *_base_lines(fab.port), *_removal_lines(fab.vni),
             f"table inet {TABLE} {{",
             f"  chain {chain} {{",
             f'    comment "{ALIAS_PREFIX}{fab.job_id}"',
             f"    ip saddr {{ {peers} }} accept" if peers else "",
             "    drop",
             "  }",
             "}",
             f"add element inet {TABLE} {MAP} {{ {fab.vni} : jump {chain} }}"]
    return "\n".join(line for line in lines if line) + "\n"


def removal_script(vni: int) -> str:
    """The ``nft -f -`` input that removes VNI ``vni``'s part of the guard, present or not."""
    _check_vni(vni)
    return "\n".join([f"# dgxvm jobnet: VNI {vni} removed", *_removal_lines(vni)]) + "\n"


def delete_script(names: list[str]) -> str:
    """The ``ip -batch -`` input that deletes ``names`` (the bridge's ports and forwarding
    entries go with them)."""
    return "".join(f"link del {n}\n" for n in names)


# -- on the host -----------------------------------------------------------------------------------
def _links() -> set[str]:
    """The names of this network namespace's interfaces (netlink, no process)."""
    return {name for _, name in socket.if_nameindex()}


def _run(argv: list[str], script: str, error) -> None:
    run_tool(argv, timeout=TOOL_TIMEOUT_S, error=error, input=script)


def _alias_job(alias: str | None) -> int | None:
    if alias and alias.startswith(ALIAS_PREFIX) and alias[len(ALIAS_PREFIX):].isdigit():
        return int(alias[len(ALIAS_PREFIX):])
    return None


def _device_jobs(names: list[str], error) -> dict[str, int | None]:
    """name -> the job id its alias names (None: no dgxvm alias), for existing ``names``."""
    result = run_tool([IP, "-j", "link", "show"], timeout=TOOL_TIMEOUT_S, error=error)
    try:
        links = json.loads(result.stdout or "[]")
    except ValueError:
        links = []
    return {link.get("ifname"): _alias_job(link.get("ifalias")) for link in links
            if link.get("ifname") in names}


def _is_local(address: str) -> bool:
    """Whether ``address`` is an address of this network namespace (a UDP socket binds to it;
    no process, no packet)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind((address, 0))
        except OSError:
            return False
    return True


def _disable_ipv6(dev: str) -> None:
    path = Path(IPV6_CONF.format(dev=dev))
    if path.parent.is_dir():         # no IPv6 in this kernel: nothing to disable
        path.write_text("1\n")


def apply(fab: JobFabric) -> None:
    """Make job ``fab.job_id``'s fabric on this node (see the module).

    Devices of the VNI that already exist for the same job are made again (a Prolog run twice).
    Raises JobFabricError (``step`` "check") when ``fab.local`` is not an address of this host
    (``[jobnet] nodes`` is wrong), or the devices exist for another job, naming the device and
    that job (VNIs wrap: :func:`~.plan.vni_for`), or not as dgxvm's; and, after removing
    what it made, JobFabricError naming the step that failed and the tool's output."""
    def error(step: str):
        return lambda reason: JobFabricError(job=fab.job_id, vni=fab.vni, step=step,
                                             reason=reason)

    if not _is_local(fab.local):
        raise error("check")(f"the underlay address {fab.local} of node {fab.node} "
                             f"([jobnet] nodes) is not an address of this host")
    ours = [n for n in device_names(fab.vni) if n in _links()]
    if ours:
        owners = _device_jobs(ours, error("check"))
        for name in ours:
            other = owners.get(name)
            if other != fab.job_id:
                held = (f"job {other}" if other is not None
                        else "something that is not a dgxvm job fabric")
                raise error("check")(f"device {name} exists for {held}"
                                     + (f" (VNI {fab.vni} is job {fab.job_id}'s and "
                                        f"job {other}'s: job ids wrap at {VNI_MAX})"
                                        if other is not None else ""))
        teardown(fab.vni)
    # NOTE: the check and the making are not one atomic step: two Prologs of jobs 16777215 ids
    # apart starting on one node in the same milliseconds could both pass the check; the
    # second's `link add` then fails ("File exists") and its undo removes the VNI's devices.
    step = "devices (ip)"
    try:
        _run([IP, "-batch", "-"], ip_script(fab), error(step))
        step = "IPv6 off"
        try:
            for dev in (fab.bridge, fab.vxlan):
                _disable_ipv6(dev)
        except OSError as exc:
            raise error(step)(f"{exc.filename}: {exc.strerror}") from None
        step = "forwarding entries (bridge fdb)"
        if fab.peers:
            _run([BRIDGE, "-batch", "-"], fdb_script(fab), error(step))
        step = "guard (nft)"
        _run([NFT, "-f", "-"], guard_script(fab), error(step))
    except BaseException as exc:
        try:
            teardown(fab.vni)
        except JobFabricError as undo:
            if isinstance(exc, JobFabricError):
                raise JobFabricError(job=fab.job_id, vni=fab.vni, step=exc.step,
                                     reason=f"{exc.reason}; removing what was made failed "
                                            f"too: {undo.reason}") from exc
        raise


def teardown(vni: int) -> bool:
    """Remove VNI ``vni``'s fabric from this node: its devices (with their forwarding
    entries) and its part of the nft guard. Idempotent; True when something was removed.
    Raises JobFabricError when ip or nft fails."""
    _check_vni(vni)

    def error(step: str):
        return lambda reason: JobFabricError(job="?", vni=vni, step=step, reason=reason)

    present = [n for n in device_names(vni) if n in _links()]
    if present:
        # the VXLAN device first: the bridge then has no port left to flood to
        _run([IP, "-force", "-batch", "-"], delete_script(sorted(present, reverse=True)),
             error("remove devices (ip)"))
    guarded = vni in _guard_vnis(error("read the guard (nft)"))
    if guarded:
        _run([NFT, "-f", "-"], removal_script(vni), error("remove the guard (nft)"))
    return bool(present) or guarded


def _guard_vnis(error) -> dict[int, int | None]:
    """VNI -> job id (the chain's comment) of every job chain in the guard table."""
    result = run_tool([NFT, "-j", "list", "table", "inet", TABLE], timeout=TOOL_TIMEOUT_S,
                      error=error, check=False)
    if result.returncode != 0:
        if "No such file or directory" in (result.stderr or ""):
            return {}          # no table: no job has had a fabric here since boot
        raise error(f"nft -j list table inet {TABLE} failed (exit {result.returncode}): "
                    f"{(result.stderr or '').strip()[-300:]}")
    try:
        items = json.loads(result.stdout or "{}").get("nftables", [])
    except ValueError as exc:
        raise error(f"nft's JSON does not parse: {exc}") from None
    out: dict[int, int | None] = {}
    for item in items:
        chain = item.get("chain") if isinstance(item, dict) else None
        m = _CHAIN.fullmatch(chain.get("name", "")) if isinstance(chain, dict) else None
        if m:
            out[int(m.group(1))] = _alias_job(chain.get("comment"))
    return out


def present() -> dict[int, int | None]:
    """VNI -> job id of every job fabric on this node: each ``vxj*``/``brj*`` device (the job
    from its alias; None: no dgxvm alias) and each job chain of the guard (the job from its
    comment), for reconcile to compare with the jobs Slurm has here. Raises JobFabricError
    when ip or nft fails."""
    def error(step: str):
        return lambda reason: JobFabricError(job="?", vni="?", step=step, reason=reason)

    out = _guard_vnis(error("read the guard (nft)"))
    names = [n for n in _links() if _DEVICE.fullmatch(n)]
    if names:
        for name, job in _device_jobs(names, error("read the devices (ip)")).items():
            vni = int(_DEVICE.fullmatch(name).group(2))
            if vni <= VNI_MAX and (job is not None or vni not in out):
                out[vni] = job
    return out


__all__ = ["ALIAS_PREFIX", "MAP", "TABLE", "apply", "delete_script", "fdb_script",
           "guard_script", "ip_script", "job_chain", "present", "removal_script", "teardown"]
