"""The VMs' addresses on dgxvm's network: fixed slots whose DHCP reservations stay.

Each address of the network's reserved half (up to :data:`MAX_SLOTS` of them) is a *slot* with a
MAC of its own (:func:`slot_mac`: ``52:54:01`` and the address's lower 24 bits) and a DHCP
reservation of that MAC for that address (:func:`slot_host`), declared with the network when
dgxvm defines it. A VM *holds* a slot while it exists: ``<state_dir>/addresses/<ip>`` names it;
giving the slot back empties the file, whose time then says when it was last given back.

So making a VM changes nothing in libvirt's network: a live DHCP-host update of a NAT network
costs 0.4 s, because libvirt 9.0 takes out and puts back every firewall rule of the network for
it (``networkUpdate`` in ``src/network/bridge_driver.c``). A network defined before slots gets a
slot's reservation the first time that address is used, once. And since one address always has
one MAC, dnsmasq never holds an address back for an older VM's unexpired lease.

A create takes the slot given back longest ago (one never used counts as oldest), so an address
goes round every slot before it comes back, as before slots. Every function here expects the
caller to hold the network lock (:func:`slurm_dgxvm.virt.hypervisor._network_lock`).
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from ..fsutil import atomic_write

#: the first three octets of every slot's MAC (locally administered, unicast; not the
#: ``52:54:00`` of the per-name MACs dgxvm gave VMs before slots)
SLOT_OUI = "52:54:01"
#: the most slots a network gets (a /24's reserved half is 126); a node never runs that many VMs
MAX_SLOTS = 254
DIRNAME = "addresses"


def slot_mac(ip: str) -> str:
    """The MAC of the slot of address ``ip``."""
    low = int(ipaddress.IPv4Address(ip)) & 0xFFFFFF
    return f"{SLOT_OUI}:{low >> 16:02x}:{(low >> 8) & 0xFF:02x}:{low & 0xFF:02x}"


def is_slot_mac(mac: str | None) -> bool:
    return bool(mac) and mac.lower().startswith(SLOT_OUI + ":")


def slot_name(ip: str) -> str:
    """The reservation's host name: ``dgxvm-10-213-0-5`` (never a VM's name)."""
    return "dgxvm-" + ip.replace(".", "-")


def slots(reserved: list[str]) -> list[str]:
    """The slots of a network whose reserved addresses are ``reserved`` (in order)."""
    return reserved[:MAX_SLOTS]


def _dir(state_dir: str) -> Path:
    return Path(state_dir) / DIRNAME


def _files(state_dir: str) -> list[os.DirEntry]:
    """The slot files (regular files, not links; a write's hidden temporary file is not one)."""
    try:
        entries = list(os.scandir(_dir(state_dir)))
    except FileNotFoundError:
        return []
    return [e for e in entries if not e.name.startswith(".") and e.is_file(follow_symlinks=False)]


def held(state_dir: str) -> dict[str, str]:
    """ip -> the name of the VM that holds it."""
    out = {}
    for e in _files(state_dir):
        name = Path(e.path).read_text().strip()
        if name:
            out[e.name] = name
    return out


def given_back(state_dir: str) -> dict[str, float]:
    """ip -> when a slot held no more was given back (its file's modification time)."""
    out = {}
    for e in _files(state_dir):
        st = e.stat(follow_symlinks=False)
        if st.st_size == 0:
            out[e.name] = st.st_mtime
    return out


def hold(state_dir: str, ip: str, name: str) -> None:
    """VM ``name`` holds the slot of ``ip`` from now on."""
    d = _dir(state_dir)
    d.mkdir(mode=0o700, exist_ok=True)
    atomic_write(d / str(ipaddress.IPv4Address(ip)), name + "\n", mode=0o644)


def give_back(state_dir: str, name: str) -> list[str]:
    """Give back every slot VM ``name`` holds; the addresses given back."""
    out = []
    for ip, holder in sorted(held(state_dir).items()):
        if holder == name:
            atomic_write(_dir(state_dir) / ip, "", mode=0o644)
            out.append(ip)
    return out
