"""hypervisor's network lock: concurrent dgxvm processes serialise network changes through
``<state_dir>/network.lock``; one held too long is a named state error (exit 5), never a
traceback. A domain's start that lost libvirt's firewall race is tried again; nothing else is."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

import filelock
import libvirt
import pytest

from slurm_dgxvm.virt import addresses, hypervisor
from slurm_dgxvm.errors import EXIT_STATE, HypervisorError, LockError, LockTimeout


def test_a_network_lock_held_too_long_is_a_lock_timeout(tmp_path, monkeypatch):
    monkeypatch.setattr(hypervisor, "NETWORK_LOCK_TIMEOUT_S", 0.2)
    conn = libvirt.open("test:///default")
    try:
        with filelock.FileLock(str(tmp_path / "network.lock")), \
                pytest.raises(LockTimeout) as info:
            hypervisor.release_address(conn, "default", str(tmp_path), "52:54:00:00:00:01")
        assert str(info.value) == f"lock {tmp_path}/network.lock: not acquired within 0.2s"
        assert info.value.exit_code == EXIT_STATE
        with hypervisor._network_lock(str(tmp_path)):       # free again
            pass
    finally:
        conn.close()


def test_a_network_lock_that_cannot_be_made_is_a_lock_error(tmp_path):
    not_a_dir = tmp_path / "state"
    not_a_dir.write_text("")
    with pytest.raises(LockError, match=r"network.lock: cannot lock") as info, \
            hypervisor._network_lock(str(not_a_dir)):
        pass
    assert info.value.exit_code == EXIT_STATE


def test_reservations_are_read_and_released_by_mac(tmp_path):
    """What dgxvm reconcile compares: the network's <host> entries. libvirt's test driver has
    "default" (and no inactive definition apart from the live one)."""
    conn = libvirt.open("test:///default")
    net = conn.networkLookupByName("default")
    try:
        assert hypervisor.reservations(conn, "no-such-network") is None
        before = hypervisor.reservations(conn, "default")
        net.update(libvirt.VIR_NETWORK_UPDATE_COMMAND_ADD_LAST,
                   libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST, -1,
                   "<host mac='52:54:00:0a:0b:0c' name='ghost' ip='192.168.122.77'/>",
                   libvirt.VIR_NETWORK_UPDATE_AFFECT_LIVE | libvirt.VIR_NETWORK_UPDATE_AFFECT_CONFIG)
        got = hypervisor.reservations(conn, "default")
        assert got == {**before, "52:54:00:0a:0b:0c": ("192.168.122.77", "ghost")}
        hypervisor.release_address(conn, "default", str(tmp_path), "52:54:00:0A:0B:0C")
        assert hypervisor.reservations(conn, "default") == before
        hypervisor.release_address(conn, "default", str(tmp_path), "52:54:00:0a:0b:0c")  # gone
    finally:
        conn.close()


def test_a_slots_reservation_leases_its_address_for_minutes_not_dnsmasqs_hour(tmp_path):
    """A guest that powers off never releases its lease; the reservation carries a short one, so
    a lease of a VM made before slots (another MAC) holds its address back for minutes only."""
    conn = libvirt.open("test:///default")
    net = conn.networkLookupByName("default")
    try:
        mac, ip = hypervisor.take_address(conn, net, str(tmp_path), "leased", "192.168.122.0/24")
        assert (mac, ip) == (addresses.slot_mac(ip), "192.168.122.2")
        assert hypervisor.reservations(conn, "default")[mac] == (ip, "dgxvm-192-168-122-2")
        root = ET.fromstring(net.XMLDesc(0))
        [host] = [h for h in root.iterfind("./ip/dhcp/host") if h.get("mac") == mac]
        lease = host.find("lease")
        assert lease is not None, ET.tostring(host)
        assert (lease.get("expiry"), lease.get("unit")) == \
            (str(hypervisor.RESERVED_LEASE_MIN), "minutes")
        assert 2 <= hypervisor.RESERVED_LEASE_MIN <= 30     # libvirt's minimum; renewals cheap
    finally:
        hypervisor.release_address(conn, "default", str(tmp_path), addresses.slot_mac(
            "192.168.122.2"))
        conn.close()


class _Counted:
    """A network whose updates are counted (and whose leases are ``leases``)."""

    def __init__(self, net, leases=()):
        self.net, self.updates, self.leases = net, 0, list(leases)

    def update(self, *args):
        self.updates += 1
        return self.net.update(*args)

    def DHCPLeases(self):
        return self.leases

    def __getattr__(self, name):
        return getattr(self.net, name)


@pytest.fixture
def small_net(tmp_path):
    """libvirt's test network "default", with dgxvm's layout of a /28 in it: slots .2 to .7."""
    conn = libvirt.open("test:///default")
    net = _Counted(conn.networkLookupByName("default"))
    try:
        yield conn, net, str(tmp_path), "192.168.122.0/28"
    finally:
        for mac in hypervisor.reservations(conn, "default"):
            if addresses.is_slot_mac(mac):
                hypervisor.release_address(conn, "default", str(tmp_path), mac)
        conn.close()


def take(small_net, name):
    conn, net, state, cidr = small_net
    return hypervisor.take_address(conn, net, state, name, cidr)[1]


def test_each_vm_holds_its_own_slot_and_the_same_name_gets_the_same_one(small_net):
    conn, net, state, _ = small_net
    got = [take(small_net, f"vm{i}") for i in range(6)]
    assert got == [f"192.168.122.{i}" for i in range(2, 8)]
    assert take(small_net, "vm3") == "192.168.122.5"            # already its own
    assert addresses.held(state) == {f"192.168.122.{i + 2}": f"vm{i}" for i in range(6)}
    with pytest.raises(HypervisorError, match=r"no address left in 192.168.122.0/28 for vm6"):
        take(small_net, "vm6")
    assert net.updates == 6                                     # a slot's reservation, once


def test_a_slot_given_back_keeps_its_reservation_and_is_taken_again_without_a_network_update(
        small_net):
    """Every create after a slot's first use: no libvirt network update (libvirt 9.0 reloads
    every firewall rule of a NAT network for one: 0.4 s)."""
    conn, net, state, _ = small_net
    for i in range(6):
        take(small_net, f"vm{i}")
    hypervisor.give_back_address(conn, "default", state, "vm3", addresses.slot_mac(
        "192.168.122.5"))
    assert "192.168.122.5" not in addresses.held(state)
    assert addresses.slot_mac("192.168.122.5") in hypervisor.reservations(conn, "default")
    before = net.updates
    assert take(small_net, "new") == "192.168.122.5"
    assert net.updates == before


def test_the_slot_given_back_longest_ago_is_taken_and_a_never_used_one_before_any(small_net,
                                                                                   monkeypatch):
    """An address goes round every slot before it comes back: stale state about it (a neighbour
    cache, a connection tracked for the VM before) is the oldest there is."""
    conn, net, state, _ = small_net
    for i in range(3):
        take(small_net, f"vm{i}")                           # .2 .3 .4
    clock = iter([100.0, 200.0])
    real = addresses.atomic_write

    def dated(path, data, **kw):
        real(path, data, **kw)
        if data == "":
            t = next(clock)
            os.utime(path, (t, t))
    monkeypatch.setattr(addresses, "atomic_write", dated)
    hypervisor.give_back_address(conn, "default", state, "vm2", None)     # .4 at 100
    hypervisor.give_back_address(conn, "default", state, "vm0", None)     # .2 at 200
    assert [take(small_net, n) for n in ("a", "b", "c", "d", "e")] == [
        "192.168.122.5", "192.168.122.6", "192.168.122.7",                   # never used
        "192.168.122.4", "192.168.122.2"]                                    # then oldest


def test_a_slot_whose_address_another_mac_still_leases_is_passed_over(small_net):
    """dnsmasq holds an address back for an unexpired lease of another MAC (a VM made before
    slots, whose reservation was released): its guest would get no address."""
    conn, net, state, _ = small_net
    net.leases = [{"ipaddr": "192.168.122.2", "mac": "52:54:00:aa:bb:cc", "expirytime": 50},
                  {"ipaddr": "192.168.122.3", "mac": addresses.slot_mac("192.168.122.3"),
                   "expirytime": 60}]
    assert take(small_net, "a") == "192.168.122.3"              # its own slot's lease: fine
    for n in "bcde":
        take(small_net, n)
    assert take(small_net, "f") == "192.168.122.2"              # the only one left


def test_a_vm_made_before_slots_has_its_own_reservation_released(small_net):
    conn, net, state, _ = small_net
    mac = "52:54:00:0a:0b:0c"
    net.update(libvirt.VIR_NETWORK_UPDATE_COMMAND_ADD_LAST,
               libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST, -1,
               f"<host mac='{mac}' name='old' ip='192.168.122.2'/>",
               libvirt.VIR_NETWORK_UPDATE_AFFECT_LIVE | libvirt.VIR_NETWORK_UPDATE_AFFECT_CONFIG)
    assert take(small_net, "new") == "192.168.122.3"            # .2 is the old VM's
    hypervisor.give_back_address(conn, "default", state, "old", mac)
    assert mac not in hypervisor.reservations(conn, "default")
    assert addresses.held(state) == {"192.168.122.3": "new"}


def test_a_network_dgxvm_defines_declares_every_slots_reservation(tmp_path, monkeypatch):
    monkeypatch.setenv("DGXVM_RUN_DIR", str(tmp_path / "run"))
    conn = libvirt.open("test:///default")
    try:
        net = hypervisor._ensure_network(conn, "slotted", "10.9.0.0/24")
        hosts = hypervisor.reservations(conn, "slotted")
        assert len(hosts) == 126
        assert hosts[addresses.slot_mac("10.9.0.2")] == ("10.9.0.2", "dgxvm-10-9-0-2")
        assert hosts[addresses.slot_mac("10.9.0.127")] == ("10.9.0.127", "dgxvm-10-9-0-127")
        counted = _Counted(net)
        mac, ip = hypervisor.take_address(conn, counted, str(tmp_path), "first", "10.9.0.0/24")
        assert (mac, ip, counted.updates) == ("52:54:01:09:00:02", "10.9.0.2", 0)
    finally:
        conn.close()


class _Racing:
    """A test-driver domain whose first ``fails`` starts fail the way libvirt fails a start whose
    nwfilter rules lost a race with another nftables change (``message``)."""

    def __init__(self, dom, fails: int, message: str):
        self.dom, self.fails, self.message, self.tries = dom, fails, message, 0

    def create(self):
        self.tries += 1
        if self.tries <= self.fails:
            raise libvirt.libvirtError(self.message)
        return self.dom.create()

    def isActive(self):
        return self.dom.isActive()


RACE = ("internal error: Failed to apply firewall rules /usr/sbin/ebtables --concurrent -t nat "
        "-A libvirt-P-vnet6 -p 0x0800 -j P-vnet6-ipv4: ebtables v1.8.9 (nf_tables):  "
        "RULE_DELETE failed (No such file or directory): rule in chain P-vnet6-ipv4")


@pytest.fixture
def test_domain():
    """libvirt's test domain "test", shut off; as it was afterwards (the test driver's state
    is shared by every connection of the process)."""
    conn = libvirt.open("test:///default")
    dom = conn.lookupByName("test")
    was = dom.isActive()
    if was:
        dom.destroy()
    try:
        yield dom
    finally:
        if dom.isActive() != was:
            (dom.create if was else dom.destroy)()
        conn.close()


def test_a_start_whose_firewall_rules_lost_a_race_is_tried_again_and_runs(test_domain):
    dom = _Racing(test_domain, fails=2, message=RACE)
    hypervisor.start(dom, "test:///default", "start domain job-5", pause_s=0)
    assert dom.tries == 3 and test_domain.isActive()


def test_a_start_that_loses_the_race_every_time_fails_naming_the_domain(test_domain):
    dom = _Racing(test_domain, fails=3, message=RACE)
    with pytest.raises(HypervisorError, match=r"start domain job-5: .*Failed to apply firewall"):
        hypervisor.start(dom, "test:///default", "start domain job-5", pause_s=0)
    assert dom.tries == 3 and not test_domain.isActive()


def test_any_other_start_failure_is_not_tried_again(test_domain):
    dom = _Racing(test_domain, fails=1, message="internal error: process exited while connecting")
    with pytest.raises(HypervisorError, match=r"start domain job-5: internal error: process"):
        hypervisor.start(dom, "test:///default", "start domain job-5", pause_s=0)
    assert dom.tries == 1 and not test_domain.isActive()
