"""The host firewall of dgxvm's libvirt network: what a guest may reach on the host.

Guests are tenants (the job's user is root inside its VM), so the network's bridge is a hostile
edge. libvirt isolates the guests' ports from each other on the bridge (``<port
isolated='yes'/>``) and nwfilter's ``clean-traffic`` pins each guest to its MAC and reserved
address; what is left is the host itself and the host's routing between guests. An nftables
table owned by the network, ``inet dgxvm-<network>``, closes those:

* input from the bridge: DHCP (udp 67) and DNS (udp/tcp 53 to the gateway, dnsmasq), the
  services the admin lists in ``[libvirt] allow_host_services``, and replies to connections the
  host opened (established/related) are accepted; everything else is dropped (slurmd, sshd,
  anything listening on any host address, IPv6 included);
* forward from the bridge back into the bridge (guest -> gateway -> another guest) is dropped.

Outbound NAT to the world is libvirt's and stays. The table is applied by libvirt's network hook
(``/etc/libvirt/hooks/network`` -> ``dgxvm hook network NAME started begin -``) and removed when
the network stops, so it lives in libvirtd's network namespace and goes with the network. The
hook leaves a marker under /run/dgxvm/networks; ``hypervisor.ensure_network`` refuses a running network
without one, so a node whose hook is missing fails closed instead of running VMs on a flat net.

The parsing and rendering here are pure; :func:`network_hook` runs ``nft``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from .errors import FirewallError
from .fsutil import atomic_write_json
from .tools import output_tail, run_tool

PROTOCOLS = ("tcp", "udp")
TABLE_PREFIX = "dgxvm-"
# The hook's markers are runtime state of the network, not of a dgxvm state dir: they live as
# long as the network and its table can (a reboot clears /run and both), and every dgxvm config
# on the node sees the same one.
RUN_DIR = "/run/dgxvm"
ENV_RUN_DIR = "DGXVM_RUN_DIR"         # tests only
NFT = "nft"
NFT_TIMEOUT_S = 20.0
# Names that go into nft rules unquoted (table) or quoted (interface); both are checked.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,47}")
_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")
_SERVICE = re.compile(r"(?:(?P<addr>[^:/\s]+):)?(?P<proto>[a-z]+)/(?P<ports>\d{1,5}(?:-\d{1,5})?)")

SERVICE_SYNTAX = ('"PROTO/PORT" (on the network\'s gateway address) or "ADDRESS:PROTO/PORT" '
                  '(an IPv4 address of this host); PROTO tcp or udp, PORT a number or a range '
                  'LOW-HIGH, e.g. "tcp/5000", "10.0.0.5:tcp/3128", "udp/7000-7010"')


@dataclass(frozen=True)
class HostService:
    """One host service guests may reach: ``proto`` port(s) on ``address`` (None: the gateway)."""

    proto: str
    port_lo: int
    port_hi: int
    address: str | None = None

    @property
    def ports(self) -> str:
        return str(self.port_lo) if self.port_lo == self.port_hi else f"{self.port_lo}-{self.port_hi}"

    def __str__(self) -> str:
        where = f"{self.address}:" if self.address else ""
        return f"{where}{self.proto}/{self.ports}"


def parse_service(text: str) -> HostService:
    """``"tcp/5000"``, ``"10.0.0.5:tcp/3128"``, ``"udp/7000-7010"`` -> HostService.

    Raises ValueError saying what is wrong with ``text`` (the config turns it into ConfigError).
    """
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a string; use {SERVICE_SYNTAX}")
    m = _SERVICE.fullmatch(text)
    if not m:
        raise ValueError(f"{text!r} is not a service; use {SERVICE_SYNTAX}")
    proto = m["proto"]
    if proto not in PROTOCOLS:
        raise ValueError(f"{text!r}: protocol {proto!r} is not one of {', '.join(PROTOCOLS)}")
    lo, _, hi = m["ports"].partition("-")
    port_lo, port_hi = int(lo), int(hi or lo)
    if not (1 <= port_lo <= 65535 and 1 <= port_hi <= 65535):
        raise ValueError(f"{text!r}: ports are 1-65535")
    if port_hi < port_lo:
        raise ValueError(f"{text!r}: the range {m['ports']} is empty")
    address = m["addr"]
    if address is not None:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            raise ValueError(f"{text!r}: {address!r} is not an IPv4 address (names are not "
                             f"resolved)") from None
        if ip.version != 4:
            raise ValueError(f"{text!r}: {address!r} is not an IPv4 address")
        if ip.is_unspecified or ip.is_multicast or ip.is_loopback:
            raise ValueError(f"{text!r}: {address} cannot be a host service's address")
        address = str(ip)
    return HostService(proto=proto, port_lo=port_lo, port_hi=port_hi, address=address)


def table_name(network: str) -> str:
    """The nft table (family inet) of ``network``: ``dgxvm-<network>``."""
    if not _NAME.fullmatch(network):
        raise ValueError(f"network name {network!r}: use letters, digits, '.', '_', '-' "
                         f"(at most 48, starting with a letter or digit)")
    return TABLE_PREFIX + network


def ruleset(network: str, bridge: str, gateway: str,
            services: tuple[HostService, ...] = ()) -> str:
    """The nft script that (re)creates ``inet dgxvm-<network>`` for ``bridge``, atomically
    (one ``nft -f`` transaction: an old table of that name is replaced, never merged)."""
    table = table_name(network)
    if not _IFNAME.fullmatch(bridge):
        raise ValueError(f"bridge name {bridge!r} is not an interface name")
    gw = ipaddress.ip_address(gateway)
    if gw.version != 4:
        raise ValueError(f"gateway {gateway!r} is not an IPv4 address")
    br = f'iifname "{bridge}"'
    lines = [
        f"# dgxvm: the firewall of libvirt network {network} (bridge {bridge}); applied by",
        "# libvirt's network hook (dgxvm hook network), removed when the network stops.",
        f"add table inet {table}",
        f"delete table inet {table}",
        f"table inet {table} {{",
        "  chain input {",
        "    type filter hook input priority filter; policy accept;",
        f"    {br} ct state established,related accept",
        f"    {br} ip daddr {{ 255.255.255.255, {gw} }} udp dport 67 accept comment \"DHCP\"",
        f"    {br} ip daddr {gw} udp dport 53 accept comment \"DNS\"",
        f"    {br} ip daddr {gw} tcp dport 53 accept comment \"DNS\"",
    ]
    for s in services:
        lines.append(f"    {br} ip daddr {s.address or gw} {s.proto} dport {s.ports} accept "
                     f"comment \"allow_host_services {s}\"")
    lines += [
        f"    {br} drop comment \"every other host service\"",
        "  }",
        "  chain forward {",
        "    type filter hook forward priority filter; policy accept;",
        f"    {br} oifname \"{bridge}\" drop comment \"guest to guest through the gateway\"",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def removal(network: str) -> str:
    """The nft script that removes the table, whether or not it exists."""
    table = table_name(network)
    return f"add table inet {table}\ndelete table inet {table}\n"


# -- the network as libvirt's hook sees it -----------------------------------------------------------
@dataclass(frozen=True)
class NetworkInfo:
    name: str
    uuid: str | None
    bridge: str
    gateway: str


def network_info(xml: str) -> NetworkInfo:
    """Name, uuid, bridge and IPv4 gateway from the XML libvirt gives a network hook on stdin
    (``<hookData><network>...</network></hookData>``) or a network's own XML."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise ValueError(f"the network XML does not parse: {exc}") from None
    net = root if root.tag == "network" else root.find("network")
    if net is None:
        raise ValueError(f"no <network> in the XML given (root <{root.tag}>)")
    bridge = net.find("bridge")
    ip = next((i for i in net.iterfind("ip")
               if i.get("family", "ipv4") == "ipv4" and i.get("address")), None)
    if bridge is None or not bridge.get("name") or ip is None:
        raise ValueError(f"network {net.findtext('name')}: no bridge name or IPv4 address in "
                         f"its XML")
    return NetworkInfo(name=net.findtext("name") or "", uuid=net.findtext("uuid"),
                       bridge=bridge.get("name"), gateway=ip.get("address"))


# -- the marker: the hook's proof that the table is in place -----------------------------------------
def marker_path(network: str) -> Path:
    """``/run/dgxvm/networks/<network>.firewall.json`` ($DGXVM_RUN_DIR instead of /run/dgxvm)."""
    return Path(os.environ.get(ENV_RUN_DIR) or RUN_DIR) / "networks" / f"{network}.firewall.json"


def read_marker(network: str) -> dict | None:
    try:
        return json.loads(marker_path(network).read_text())
    except (OSError, ValueError):
        return None


def drop_marker(network: str) -> None:
    marker_path(network).unlink(missing_ok=True)


def _write_marker(info: NetworkInfo, services) -> None:
    path = marker_path(info.name)
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    atomic_write_json(path, {"network": info.name, "uuid": info.uuid, "bridge": info.bridge,
                             "gateway": info.gateway, "table": f"inet {table_name(info.name)}",
                             "allow_host_services": [str(s) for s in services],
                             "applied": time.time()}, mode=0o644, indent=2)


def _nft(script: str, network: str) -> None:
    r = run_tool([NFT, "-f", "-"], input=script, timeout=NFT_TIMEOUT_S, what=f"{NFT} -f -",
                 hint=" (Debian: apt-get install nftables)", check=False,
                 error=lambda reason: FirewallError(network=network, reason=reason))
    if r.returncode != 0:
        raise FirewallError(network=network, reason=f"{NFT} -f - exited {r.returncode}: "
                                                    f"{output_tail(r)}")


def network_hook(network: str, op: str, sub_op: str, read_xml, *, own_network: str,
                 services: tuple[HostService, ...]) -> str | None:
    """What ``dgxvm hook network NAME OP SUBOP -`` does; runs inside libvirtd's namespace.

    Only ``own_network`` (``[libvirt] network``) is touched. ``start begin``: forget any marker
    (the network is not up yet). ``started begin``: apply the table, then write the marker; a
    failure raises, and libvirt then does not keep the network running. ``stopped end``: remove
    the table and the marker. ``read_xml()`` gives the network XML libvirtd writes on the
    hook's stdin (read only when needed). Returns a line saying what was done, or None.
    """
    if network != own_network:
        return None
    if (op, sub_op) == ("start", "begin"):
        drop_marker(network)
        return None
    if (op, sub_op) == ("started", "begin"):
        drop_marker(network)
        try:
            info = network_info(read_xml())
            script = ruleset(network, info.bridge, info.gateway, services)
        except ValueError as exc:
            raise FirewallError(network=network, reason=str(exc)) from None
        _nft(script, network)
        _write_marker(info, services)
        allowed = ", ".join(str(s) for s in services) or "none"
        return (f"network {network}: firewall inet {table_name(network)} on {info.bridge} "
                f"(allowed host services besides DHCP/DNS: {allowed})")
    if (op, sub_op) == ("stopped", "end"):
        drop_marker(network)
        _nft(removal(network), network)
        return f"network {network}: firewall inet {table_name(network)} removed"
    return None


NETWORK_HOOK_OPS = ("start", "started", "stopped")


def network_hook_script(dgxvm: str = "/usr/local/bin/dgxvm", config: str | None = None) -> str:
    """The text of /etc/libvirt/hooks/network (etc/libvirt/hooks/network is this with the
    defaults). libvirtd reads hooks when it starts. The network's XML arrives on stdin."""
    env = f"DGXVM_CONFIG={shlex.quote(config)} " if config else ""
    return (
        "#!/bin/sh\n"
        "# libvirt network hook installed for slurm-dgxvm: when dgxvm's network starts, applies\n"
        "# the nftables table inet dgxvm-<network> that keeps guests off each other and off host\n"
        "# services (DHCP, DNS and [libvirt] allow_host_services only); removes it when the\n"
        "# network stops. A failure keeps the network down. Other networks are left alone.\n"
        "# Install: install -m 0755 THIS /etc/libvirt/hooks/network, then restart libvirtd.\n"
        f"case \"$2\" in {'|'.join(NETWORK_HOOK_OPS)}) ;; *) exit 0 ;; esac\n"
        f"exec env {env}{shlex.quote(dgxvm)} hook network \"$@\"\n"
    )


def check_marker(network: str, uuid: str | None, bridge: str | None) -> str | None:
    """Why the running ``network`` is not known to have its firewall, or None when it has."""
    marker = read_marker(network)
    fix = (f"install dgxvm's libvirt network hook (etc/libvirt/hooks/network -> "
           f"/etc/libvirt/hooks/network, with this config), restart libvirtd, then restart the "
           f"network: virsh net-destroy {network}; virsh net-start {network}")
    if marker is None:
        return (f"network {network} runs without dgxvm's firewall (no "
                f"{marker_path(network)}: libvirt's network hook did not apply "
                f"inet {TABLE_PREFIX}{network}); guests would reach each other and the host's "
                f"services. Fix: {fix}")
    if (uuid and marker.get("uuid") != uuid) or (bridge and marker.get("bridge") != bridge):
        return (f"network {network}: the firewall marker {marker_path(network)} is for "
                f"another instance (uuid {marker.get('uuid')}, bridge {marker.get('bridge')}; "
                f"running: uuid {uuid}, bridge {bridge}). Fix: {fix}")
    return None


__all__ = ["HostService", "parse_service", "ruleset", "removal", "table_name", "network_info",
           "network_hook", "network_hook_script", "check_marker"]
