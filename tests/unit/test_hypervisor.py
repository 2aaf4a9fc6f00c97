"""hypervisor's network lock: concurrent dgxvm processes serialise network changes through
``<state_dir>/network.lock``; one held too long is a named state error (exit 5), never a
traceback. A domain's start that lost libvirt's firewall race is tried again; nothing else is."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import filelock
import libvirt
import pytest

from slurm_dgxvm.virt import hypervisor
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


def test_a_reservation_leases_its_address_for_minutes_not_dnsmasqs_hour(tmp_path, monkeypatch):
    """dnsmasq gives a reserved address to a new MAC only once the old VM's lease expired; with
    its default hour, a node that starts more VMs an hour than it has reserved addresses left
    the next guests without one (the soak bench, at its 127th job). The reservation carries a
    short lease, and its release still finds it."""
    monkeypatch.setenv("DGXVM_RUN_DIR", str(tmp_path / "run"))
    conn = libvirt.open("test:///default")
    net = conn.networkLookupByName("default")
    mac = "52:54:00:0d:0e:0f"
    try:
        ip = hypervisor.reserve_address(conn, net, str(tmp_path), mac, "leased",
                                        "192.168.122.0/24")
        assert hypervisor.reservations(conn, "default")[mac] == (ip, "leased")
        root = ET.fromstring(net.XMLDesc(0))
        [host] = [h for h in root.iterfind("./ip/dhcp/host") if h.get("mac") == mac]
        lease = host.find("lease")
        assert lease is not None, ET.tostring(host)
        assert (lease.get("expiry"), lease.get("unit")) == \
            (str(hypervisor.RESERVED_LEASE_MIN), "minutes")
        assert 2 <= hypervisor.RESERVED_LEASE_MIN <= 30     # libvirt's minimum; renewals cheap
        hypervisor.release_address(conn, "default", str(tmp_path), mac)
        assert mac not in hypervisor.reservations(conn, "default")
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
