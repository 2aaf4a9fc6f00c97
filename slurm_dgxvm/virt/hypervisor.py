"""libvirt, through libvirt-python: the connection, dgxvm's NAT network, and the domain
operations the lifecycle needs. Every libvirt failure becomes a HypervisorError naming the URI
and the operation; "libvirtd is not running" says so in words.

Nothing here decides policy; the lifecycle calls these in order and undoes them on failure.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import time
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from pathlib import Path
from xml.sax.saxutils import quoteattr

import libvirt

from .. import fsutil, netfilter
from . import addresses
from ..design.domain_xml import render_template
from ..errors import HypervisorError, LockError, LockTimeout

log = logging.getLogger("dgxvm.hypervisor")

# libvirt prints its own errors to stderr unless a handler is set; ours are raised instead.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

AGENT_TIMEOUT_S = 2
#: Every create takes network.lock once (its DHCP reservation: a libvirt network update, which
#: rewrites dnsmasq's hosts file and signals it: 1-2 s each with 16 TCG guests booting on 2
#: CPUs), every delete once; a queue of 16 Prologs must fit well inside it. Past it, something
#: holds the lock that should not: a node fault.
NETWORK_LOCK_TIMEOUT_S = 120.0


def connect(uri: str) -> libvirt.virConnect:
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        msg = str(exc)
        if "Failed to connect socket" in msg or "No such file" in msg or "Connection refused" in msg:
            msg = f"libvirtd is not running or not reachable ({msg})"
        raise HypervisorError(uri=uri, reason=msg) from exc


@contextmanager
def libvirt_errors(uri: str, what: str):
    """Turn a libvirtError inside the block into a HypervisorError saying what was being done."""
    try:
        yield
    except libvirt.libvirtError as exc:
        raise HypervisorError(uri=uri, reason=f"{what}: {exc}") from exc


# -- the network -----------------------------------------------------------------------------------
def network_layout(cidr: str) -> dict:
    """Gateway .1; reservations from .2 in the lower half, a dynamic range in the upper half."""
    net = ipaddress.ip_network(cidr)
    hosts = list(net.hosts())
    half = len(hosts) // 2
    return {"gateway": str(hosts[0]), "netmask": str(net.netmask),
            "range_start": str(hosts[half]), "range_end": str(hosts[-1]),
            "reserved": [str(h) for h in hosts[1:half]]}


def ensure_network(conn, name: str, cidr: str, state_dir: str) -> libvirt.virNetwork:
    """The network ``name``, defined (persistent, autostart, guests' ports isolated), active, and
    with its firewall in place: libvirt's network hook (``dgxvm hook network``) applied the nft
    table ``inet dgxvm-<name>`` and left its marker (/run/dgxvm/networks). A running network
    without it is refused (a node fault: the hook is not installed), never used open.

    A network that is already so (every create after the node's first) is only read, without
    the lock. Defining or starting it happens under ``<state_dir>/network.lock``: redefining a
    network that a concurrent dgxvm has just defined would replace its persistent definition,
    DHCP reservations included. (The load bench measured 16 Prologs at once on a fresh node
    queueing past the lock's timeout when each took it here too.)
    """
    net = _ready_network(conn, name, cidr)
    if net is not None:
        return net
    with _network_lock(state_dir):
        net = _ensure_network(conn, name, cidr)
        _check_firewall(net, name, conn.getURI())
        return net


def _ready_network(conn, name: str, cidr: str) -> libvirt.virNetwork | None:
    """The network when it is defined on ``cidr``, active and firewalled; None when anything
    is missing (the locked path then makes it, or says what is wrong: a network being started
    right now may not show its firewall marker yet). Another subnet is refused here already."""
    try:
        net = conn.networkLookupByName(name)
        if not net.isActive():
            return None
    except libvirt.libvirtError:
        return None
    _check_subnet(net, name, cidr, conn.getURI())
    try:
        _check_firewall(net, name, conn.getURI())
    except HypervisorError:
        return None
    return net


def _check_firewall(net, name: str, uri: str) -> None:
    with libvirt_errors(uri, f"read network {name}"):
        xml = net.XMLDesc(0)
    try:
        info = netfilter.network_info(xml)
    except ValueError as exc:
        raise HypervisorError(uri=uri, reason=str(exc)) from None
    why = netfilter.check_marker(name, info.uuid, info.bridge)
    if why:
        raise HypervisorError(uri=uri, reason=why)


def _network_lock(state_dir: str):
    """``<state_dir>/network.lock`` for the block; LockTimeout past NETWORK_LOCK_TIMEOUT_S."""
    path = str(Path(state_dir) / "network.lock")
    return fsutil.locked(path, timeout=NETWORK_LOCK_TIMEOUT_S,
                         timed_out=lambda: LockTimeout(path=path, timeout=NETWORK_LOCK_TIMEOUT_S),
                         failed=lambda e: LockError(path=path,
                                                    reason=f"cannot lock: {e.strerror or e}"))


def _ensure_network(conn, name: str, cidr: str) -> libvirt.virNetwork:
    uri = conn.getURI()
    try:
        net = conn.networkLookupByName(name)
    except libvirt.libvirtError:
        lay = network_layout(cidr)
        hosts = [{"mac": addresses.slot_mac(ip), "name": addresses.slot_name(ip), "ip": ip}
                 for ip in addresses.slots(lay["reserved"])]
        xml = render_template("network.xml.j2", name=name, gateway=lay["gateway"],
                              netmask=lay["netmask"], range_start=lay["range_start"],
                              range_end=lay["range_end"], hosts=hosts,
                              lease_min=RESERVED_LEASE_MIN)
        with libvirt_errors(uri, f"define network {name}"):
            net = conn.networkDefineXML(xml)
        with libvirt_errors(uri, f"autostart network {name}"):
            net.setAutostart(1)
    else:
        _check_subnet(net, name, cidr, uri)
    if not net.isActive():
        # the hook writes a new marker while the network starts; one left from before would
        # vouch for rules that are not there
        netfilter.drop_marker(name)
        with libvirt_errors(uri, f"start network {name}"):
            try:
                net.create()
            except libvirt.libvirtError:
                if not net.isActive():
                    raise
    return net


def _check_subnet(net, name: str, cidr: str, uri: str) -> None:
    """Refuse a network of that name on another subnet (left by another config): reservations
    from ``cidr`` would never be served and every guest would wait out its DHCP."""
    root = ET.fromstring(net.XMLDesc(0))
    ip = root.find("ip")
    if ip is None or ip.get("address") is None:
        raise HypervisorError(uri=uri, reason=f"network {name} exists without an IPv4 address; "
                                              f"it is not dgxvm's (libvirt.network_cidr {cidr})")
    prefix = ip.get("prefix") or ip.get("netmask") or "32"
    have = ipaddress.ip_interface(f"{ip.get('address')}/{prefix}").network
    if have != ipaddress.ip_network(cidr):
        raise HypervisorError(uri=uri, reason=(
            f"network {name} exists on {have}, but libvirt.network_cidr is {cidr}; remove it "
            f"(virsh net-destroy {name}; virsh net-undefine {name}) or set network_cidr = "
            f"\"{have}\""))


def reservations(conn, net_name: str) -> dict[str, tuple[str, str]] | None:
    """mac -> (ip, name) of the DHCP reservations on network ``net_name``; None when there is
    no such network."""
    try:
        net = conn.networkLookupByName(net_name)
    except libvirt.libvirtError:
        return None
    with libvirt_errors(conn.getURI(), f"read network {net_name}"):
        return _dhcp_hosts(net)


def _dhcp_hosts(net) -> dict[str, tuple[str, str]]:
    """mac -> (ip, name) of the network's DHCP reservations (persistent definition)."""
    try:
        xml = net.XMLDesc(libvirt.VIR_NETWORK_XML_INACTIVE)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_INVALID_ARG:
            raise
        xml = net.XMLDesc(0)     # a driver without the flag (libvirt's test driver): live = it
    root = ET.fromstring(xml)
    out = {}
    for h in root.iterfind("./ip/dhcp/host"):
        out[h.get("mac", "").lower()] = (h.get("ip"), h.get("name"))
    return out


#: The lease dnsmasq gives a reserved address (libvirt's ``<host><lease>``, libvirt >= 6.3.0,
#: at least 2 minutes). A guest that powers off never releases its lease, and dnsmasq hands a
#: reserved address to a new MAC only once the old lease has expired: with dnsmasq's default of
#: one hour, a node that started more VMs in an hour than it has reserved addresses (126 on a
#: /24; the soak bench reached it at its 127th job) gave the next guests no address at all or
#: one from the dynamic range, and their Prologs waited out the ready timeout. A running guest
#: renews at half of it (a few packets every 5 minutes); its reservation, not its lease, is what
#: keeps the address its own while it runs.
RESERVED_LEASE_MIN = 10


def _host_xml(mac: str, name: str, ip: str, *, lease: bool = True) -> str:
    attrs = f"mac={quoteattr(mac)} name={quoteattr(name)} ip={quoteattr(ip)}"
    if not lease:
        return f"<host {attrs}/>"
    return f"<host {attrs}><lease expiry='{RESERVED_LEASE_MIN}' unit='minutes'/></host>"


def _update_flags(net) -> int:
    flags = libvirt.VIR_NETWORK_UPDATE_AFFECT_CONFIG
    if net.isActive():
        flags |= libvirt.VIR_NETWORK_UPDATE_AFFECT_LIVE
    return flags


def take_address(conn, net, state_dir: str, name: str, cidr: str) -> tuple[str, str]:
    """(mac, address) for VM ``name``: an address slot (:mod:`.addresses`) it holds from now on;
    the one it holds already when it has one.

    The slot given back longest ago is taken; one never used counts as oldest. A slot whose
    address dnsmasq still leases to another MAC (a VM made before slots, whose lease has not
    expired) is passed over while another is free. Only a slot without its reservation yet (a
    network defined before slots) costs a libvirt network update, once. Serialised by
    ``<state_dir>/network.lock``, so concurrent creates never take the same slot.
    """
    uri = conn.getURI()
    with _network_lock(state_dir):
        held = addresses.held(state_dir)
        mine = sorted(ip for ip, holder in held.items() if holder == name)
        if mine:
            return addresses.slot_mac(mine[0]), mine[0]
        hosts = _dhcp_hosts(net)
        reserved_by = {ip: mac for mac, (ip, _) in hosts.items()}
        free = [ip for ip in addresses.slots(network_layout(cidr)["reserved"])
                if ip not in held and reserved_by.get(ip, addresses.slot_mac(ip))
                == addresses.slot_mac(ip)]
        if not free:
            raise HypervisorError(uri=uri, reason=f"network {net.name()}: no address left in "
                                                  f"{cidr} for {name}")
        leases = _leases(net)
        clear = [ip for ip in free if leases.get(ip, (addresses.slot_mac(ip),))[0]
                 == addresses.slot_mac(ip)]
        if clear:
            back = addresses.given_back(state_dir)
            ip = min(clear, key=lambda a: back.get(a, 0.0))   # never used: 0, the oldest
        else:
            ip = min(free, key=lambda a: leases[a][1])        # the lease that expires first
        mac = addresses.slot_mac(ip)
        if ip not in reserved_by:
            with libvirt_errors(uri, f"reserve {ip} for {name} on network {net.name()}"):
                net.update(libvirt.VIR_NETWORK_UPDATE_COMMAND_ADD_LAST,
                           libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST, -1,
                           _host_xml(mac, addresses.slot_name(ip), ip), _update_flags(net))
        addresses.hold(state_dir, ip, name)
        return mac, ip


def give_back_address(conn, net_name: str, state_dir: str, name: str,
                      mac: str | None) -> None:
    """Give back what VM ``name`` holds on the network: its slot (a file; libvirt is not
    asked), and, for a VM made before slots (``mac`` not a slot's), its own reservation."""
    with _network_lock(state_dir):
        addresses.give_back(state_dir, name)
    if mac and not addresses.is_slot_mac(mac):
        release_address(conn, net_name, state_dir, mac)


def _leases(net) -> dict[str, tuple[str, int]]:
    """ip -> (mac, expiry time) of dnsmasq's current leases on ``net``."""
    try:
        return {lease["ipaddr"]: (str(lease.get("mac", "")).lower(),
                                  int(lease.get("expirytime", 0)))
                for lease in net.DHCPLeases()}
    except libvirt.libvirtError:
        return {}


def release_address(conn, net_name: str, state_dir: str, mac: str) -> None:
    """Drop ``mac``'s reservation; nothing to do when the network or reservation is gone."""
    try:
        net = conn.networkLookupByName(net_name)
    except libvirt.libvirtError:
        return
    with _network_lock(state_dir):
        hosts = _dhcp_hosts(net)
        if mac.lower() not in hosts:
            return
        ip, name = hosts[mac.lower()]
        with libvirt_errors(conn.getURI(), f"release {ip} on network {net_name}"):
            net.update(libvirt.VIR_NETWORK_UPDATE_COMMAND_DELETE,
                       libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST, -1,
                       _host_xml(mac, name or "", ip, lease=False), _update_flags(net))


# -- domains ---------------------------------------------------------------------------------------
def lookup(conn, name: str):
    """The domain ``name`` or None."""
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise HypervisorError(uri=conn.getURI(), reason=f"look up domain {name}: {exc}") from exc


def state_name(dom) -> str:
    """running, paused, shutting-down, shut-off, crashed, suspended; "undefined" for a domain
    that went away since it was looked up (a `dgxvm list` during a delete)."""
    try:
        state, _reason = dom.state()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return "undefined"
        raise HypervisorError(uri=dom.connect().getURI(),
                              reason=f"state of domain {dom.name()}: {exc}") from exc
    return {libvirt.VIR_DOMAIN_RUNNING: "running", libvirt.VIR_DOMAIN_BLOCKED: "running",
            libvirt.VIR_DOMAIN_PAUSED: "paused", libvirt.VIR_DOMAIN_SHUTDOWN: "shutting-down",
            libvirt.VIR_DOMAIN_SHUTOFF: "shut-off", libvirt.VIR_DOMAIN_CRASHED: "crashed",
            libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended"}.get(state, "unknown")


def agent_ping(dom) -> bool:
    """True when the QEMU guest agent in ``dom`` answers guest-ping."""
    import libvirt_qemu
    try:
        reply = libvirt_qemu.qemuAgentCommand(dom, json.dumps({"execute": "guest-ping"}),
                                              AGENT_TIMEOUT_S, 0)
    except libvirt.libvirtError:
        return False
    return "return" in json.loads(reply or "{}")


def agent_read_file(dom, path: str, max_bytes: int = 1 << 20) -> bytes | None:
    """The content of ``path`` in the guest, read through the QEMU guest agent (guest-file-open,
    -read, -close); None when the agent does not answer or the file cannot be opened (absent,
    not readable). At most ``max_bytes``."""
    import base64

    import libvirt_qemu

    def call(execute: str, **arguments):
        reply = libvirt_qemu.qemuAgentCommand(
            dom, json.dumps({"execute": execute, "arguments": arguments}), AGENT_TIMEOUT_S, 0)
        return json.loads(reply or "{}").get("return")

    try:
        handle = call("guest-file-open", path=path, mode="r")
    except (libvirt.libvirtError, ValueError):
        return None
    if handle is None:
        return None
    data = b""
    try:
        while len(data) < max_bytes:
            chunk = call("guest-file-read", handle=handle, count=min(65536, max_bytes - len(data)))
            if not chunk:
                break
            data += base64.b64decode(chunk.get("buf-b64", ""))
            if chunk.get("eof") or not chunk.get("count"):
                break
    except (libvirt.libvirtError, ValueError):
        return None
    finally:
        try:
            call("guest-file-close", handle=handle)
        except (libvirt.libvirtError, ValueError):
            pass
    return data


AGENT_EXEC_POLL_S = 0.02


def agent_exec(dom, argv: list[str], *, stdin: bytes = b"", timeout_s: float,
               what: str) -> tuple[int, str]:
    """Run ``argv`` in the guest as root through the QEMU guest agent (guest-exec with
    ``stdin`` as its input, then guest-exec-status until it exits). Returns (exit status,
    stdout and stderr, decoded, at most the agent's capture). Raises HypervisorError naming
    ``what`` when the agent does not answer or refuses, or the command runs past ``timeout_s``
    (it is then killed by nobody: the caller destroys the VM, which is used once).

    The agent's channel is a virtio-serial port only the host reaches; in a VM that has run
    no tenant code (a warm VM before its claim), it is the image's own qemu-ga."""
    import base64

    import libvirt_qemu

    def call(execute: str, **arguments):
        try:
            reply = libvirt_qemu.qemuAgentCommand(
                dom, json.dumps({"execute": execute, "arguments": arguments}),
                max(AGENT_TIMEOUT_S, 5), 0)
            value = json.loads(reply or "{}").get("return")
        except (libvirt.libvirtError, ValueError) as exc:
            raise HypervisorError(uri="guest agent", reason=f"{what}: {execute}: {exc}") from None
        if value is None:
            raise HypervisorError(uri="guest agent", reason=f"{what}: {execute}: no answer")
        return value

    args = {"path": argv[0], "arg": list(argv[1:]), "capture-output": True}
    if stdin:
        args["input-data"] = base64.b64encode(stdin).decode("ascii")
    pid = call("guest-exec", **args)["pid"]
    deadline = time.monotonic() + timeout_s
    while True:
        status = call("guest-exec-status", pid=pid)
        if status.get("exited"):
            out = b"".join(base64.b64decode(status.get(k) or "")
                           for k in ("out-data", "err-data"))
            code = status.get("exitcode")
            if code is None:                  # killed by a signal
                code = 128 + int(status.get("signal") or 0)
            return int(code), out.decode("utf-8", "replace")
        if time.monotonic() > deadline:
            raise HypervisorError(uri="guest agent",
                                  reason=f"{what}: still running after {timeout_s:g}s")
        time.sleep(AGENT_EXEC_POLL_S)


SHUTDOWN_RETRY_S = 5.0


def shutdown(dom, timeout_s: float) -> str:
    """Stop ``dom`` gracefully within ``timeout_s``, then destroy it. Returns how it stopped:
    ``already-off``, ``agent``, ``acpi`` or ``destroyed``."""
    how = shutdown_gracefully(dom, timeout_s)
    if how is None:
        destroy(dom)
        return "destroyed"
    return how


def shutdown_gracefully(dom, timeout_s: float) -> str | None:
    """Ask ``dom`` to stop and wait at most ``timeout_s``. Returns how it stopped
    (``already-off``, ``agent``, ``acpi``), or None when it still runs at the deadline (the
    caller destroys it: a teardown times the two apart).

    The request (guest agent first, ACPI power button when the agent does not answer) is
    repeated every few seconds: a guest that is still booting has neither its agent nor its
    ACPI daemon yet, and would otherwise sit out the whole timeout.
    """
    if not is_active(dom):
        return "already-off"
    deadline = time.monotonic() + timeout_s
    how, last = "agent", -SHUTDOWN_RETRY_S
    while time.monotonic() < deadline:
        if not is_active(dom):
            return how
        if time.monotonic() - last >= SHUTDOWN_RETRY_S:
            last = time.monotonic()
            for name, flags in (("agent", libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT),
                                ("acpi", libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)):
                try:
                    dom.shutdownFlags(flags)
                    how = name
                    break
                except libvirt.libvirtError:
                    continue
        time.sleep(0.05)
    return None


#: libvirt's firewall layer (src/util/virfirewall.c) fails a domain's start with this when one
#: of nwfilter's ebtables-nft commands loses a race with another nftables change on the host
#: (another domain's filter being set up or torn down at the same moment, a job fabric's table);
#: seen in CI as ebtables-nft 1.8.9's "RULE_DELETE failed (No such file or directory)" on an
#: append. libvirt has undone the start by the time it says so: the domain is inactive, and
#: starting it again works.
FIREWALL_RACE = "Failed to apply firewall rules"
START_TRIES = 3


def start(dom, uri: str, what: str, *, tries: int = START_TRIES, pause_s: float = 0.5) -> None:
    """Start ``dom``. A start that failed only because libvirt's firewall rules lost a race
    (:data:`FIREWALL_RACE`) is tried again, ``tries`` times in all, ``pause_s`` apart (growing);
    any other failure, or the race every time, is a HypervisorError naming ``what``."""
    for attempt in range(1, tries + 1):
        try:
            dom.create()
            return
        except libvirt.libvirtError as exc:
            raced = FIREWALL_RACE in str(exc) and not is_active(dom)
            if not raced or attempt == tries:
                raise HypervisorError(uri=uri, reason=f"{what}: {exc}") from exc
            log.warning("%s: libvirt's firewall rules lost a race (try %d of %d), starting it "
                        "again: %s", what, attempt, tries, exc)
            time.sleep(pause_s * attempt)


def is_active(dom) -> bool:
    """Whether ``dom`` runs; a domain libvirt no longer knows counts as not running."""
    try:
        return bool(dom.isActive())
    except libvirt.libvirtError:
        return False


def destroy(dom) -> None:
    try:
        if dom.isActive():
            dom.destroy()
    except libvirt.libvirtError:
        if is_active(dom):
            raise


def undefine(dom) -> None:
    try:
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                          | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                          | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise
