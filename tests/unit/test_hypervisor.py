"""hypervisor's network lock: concurrent dgxvm processes serialise network changes through
``<state_dir>/network.lock``; one held too long is a named state error (exit 5), never a
traceback."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import filelock
import libvirt
import pytest

from slurm_dgxvm.virt import hypervisor
from slurm_dgxvm.errors import EXIT_STATE, LockError, LockTimeout


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
