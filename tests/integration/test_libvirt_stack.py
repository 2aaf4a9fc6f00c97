"""The libvirt test stack (harness/libvirt.py) for real: libvirtd + virtlogd inside a network
namespace, a NAT network whose bridge and dnsmasq stay in it, a tiny TCG domain, and a stop()
that leaves nothing behind, twice in a row.

The lifecycle tests run stacks of their own (marked ``libvirt_lifecycle``: a pytest of their own,
``-m libvirt_lifecycle``); the other tests use the shared ``libvirt_stack``.
"""

from __future__ import annotations

import os
import subprocess
import time

import libvirt
import pytest

from harness.libvirt import HOOK_PATH, LOCK_PATH, NETWORK_HOOK_PATH, QEMU_CONFIG_DIR, LibvirtStack

pytestmark = pytest.mark.integration

NET_NAME, BRIDGE = "dgxvmstack", "dgxvmstack0"   # not the VM tests' network (dgxvmtest)
NET_XML = f"""<network>
  <name>{NET_NAME}</name>
  <forward mode='nat'/>
  <bridge name='{BRIDGE}'/>
  <ip address='10.250.0.1' netmask='255.255.255.0'>
    <dhcp><range start='10.250.0.10' end='10.250.0.100'/></dhcp>
  </ip>
</network>"""


def tiny_domain(name: str, network: str | None = None) -> str:
    """64 MiB, no disk, no kernel: QEMU under TCG sitting in SeaBIOS."""
    nic = (f"<interface type='network'><source network='{network}'/>"
           f"<model type='virtio'/></interface>") if network else ""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>{nic}</devices>
</domain>"""


def netns_exists(name: str) -> bool:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return name in {line.split()[0] for line in out.splitlines() if line.strip()}


def link_in(netns: str | None, dev: str) -> bool:
    cmd = ["ip", *(["-n", netns] if netns else []), "link", "show", dev]
    return subprocess.run(cmd, capture_output=True).returncode == 0


# -- the shared session stack ----------------------------------------------------------------


def test_session_stack_answers_on_qemu_system(libvirt_stack, netns_of):
    conn = libvirt.open(libvirt_stack.uri)
    try:
        assert conn.getURI() == "qemu:///system"
        assert conn.getType() == "QEMU"
    finally:
        conn.close()
    pids = libvirt_stack.pids()
    assert set(pids) == {"virtlogd", "libvirtd"}
    ns = os.stat(f"/run/netns/{libvirt_stack.netns}").st_ino
    for name, pid in pids.items():
        assert os.path.basename(os.readlink(f"/proc/{pid}/exe")) == name
        assert netns_of(pid) == ns, f"{name} is not in {libvirt_stack.netns}"


def test_nat_network_lives_in_the_namespace(libvirt_stack, alive):
    conn = libvirt.open(libvirt_stack.uri)
    others = set(libvirt_stack.dnsmasq_pids())   # the session's other networks' (VM tests)
    net = conn.networkDefineXML(NET_XML)
    try:
        net.create()
        assert link_in(libvirt_stack.netns, BRIDGE), "bridge not in the namespace"
        assert not link_in(None, BRIDGE), "bridge leaked into the root namespace"
        dnsmasq = [p for p in libvirt_stack.dnsmasq_pids() if p not in others]
        assert dnsmasq, "no dnsmasq of this network in the namespace"
    finally:
        if net.isActive():
            net.destroy()
        net.undefine()
        conn.close()
    assert not link_in(libvirt_stack.netns, BRIDGE)
    assert not any(alive(p) for p in dnsmasq)


def test_tiny_tcg_domain_runs_and_is_seen(libvirt_stack, alive, netns_of):
    conn = libvirt.open(libvirt_stack.uri)
    try:
        dom = conn.createXML(tiny_domain("dgxvmtest-tiny"))
        try:
            assert dom.isActive()
            qemu = libvirt_stack.qemu_pids()
            assert len(qemu) == 1, qemu
            assert netns_of(qemu[0]) == os.stat(f"/run/netns/{libvirt_stack.netns}").st_ino
        finally:
            dom.destroy()
    finally:
        conn.close()
    assert libvirt_stack.qemu_pids() == []
    assert not alive(qemu[0])


# -- stacks of its own: start, stop, start again -----------------------------------------------


@pytest.mark.libvirt_lifecycle
def test_stop_leaves_nothing_and_a_second_cycle_works(tmp_path, no_session_libvirt_stack,
                                                        alive):
    netns = "dgxvm-lifecycle"
    hook_before = HOOK_PATH.read_bytes() if HOOK_PATH.exists() else None
    net_hook_before = NETWORK_HOOK_PATH.read_bytes() if NETWORK_HOOK_PATH.exists() else None
    hook_log = tmp_path / "hook.log"
    hook = f'#!/bin/sh\necho "$@" >> {hook_log}\n'
    net_hook_log = tmp_path / "net-hook.log"
    net_hook = f'#!/bin/sh\necho "$@" >> {net_hook_log}\n'
    timings = []
    # what a run cut off without its stop() leaves in the host's /etc: never loaded
    planted = QEMU_CONFIG_DIR / "dgxvmtest-planted.xml"
    assert not planted.exists()
    planted.write_text(tiny_domain("dgxvmtest-planted"))
    try:
        _cycles(tmp_path, netns, hook, net_hook, timings, alive)
    finally:
        planted.unlink()
    assert (HOOK_PATH.read_bytes() if HOOK_PATH.exists() else None) == hook_before
    assert (NETWORK_HOOK_PATH.read_bytes() if NETWORK_HOOK_PATH.exists()
            else None) == net_hook_before
    # the hook was installed before libvirtd started: it saw both domains being prepared
    prepared = [line for line in hook_log.read_text().splitlines() if "prepare begin" in line]
    assert [line.split()[0] for line in prepared] == ["dgxvmtest-cycle1", "dgxvmtest-cycle2"]
    # and the network hook saw the network start (and stop) in both cycles
    net_ops = [" ".join(line.split()[1:3]) for line in net_hook_log.read_text().splitlines()]
    assert net_ops.count("started begin") == 2 and net_ops.count("stopped end") == 2, net_ops
    for i, t in enumerate(timings, 1):
        print(f"\ncycle {i}: start {t['start_s']:.2f} s, stop {t['stop_s']:.2f} s "
              f"(destroy {t['stop_destroy_s']:.2f} s, daemons {t['stop_daemons_s']:.2f} s)")
        assert t["start_s"] < 30


def _cycles(tmp_path, netns, hook, net_hook, timings, alive):
    hook_before = HOOK_PATH.read_bytes() if HOOK_PATH.exists() else None
    net_hook_before = NETWORK_HOOK_PATH.read_bytes() if NETWORK_HOOK_PATH.exists() else None
    host_config = sorted(p.name for p in QEMU_CONFIG_DIR.rglob("*"))
    for cycle in (1, 2):
        stack = LibvirtStack(tmp_path / f"run{cycle}", netns=netns, hook=hook,
                             network_hook=net_hook)
        with stack:
            conn = libvirt.open(stack.uri)
            try:
                assert conn.getType() == "QEMU"
                with pytest.raises(RuntimeError, match="already running|holds"):
                    LibvirtStack(tmp_path / "intruder", netns="dgxvm-intruder").start()
                assert not netns_exists("dgxvm-intruder")
                net = conn.networkDefineXML(NET_XML)
                net.create()
                net.undefine()  # stays active as a transient network: stop() must destroy it
                assert link_in(netns, BRIDGE) and not link_in(None, BRIDGE)
                # only this stack's own domains: none from the host's /etc or the last cycle
                assert [d.name() for d in conn.listAllDomains()] == []
                conn.defineXML(tiny_domain("dgxvmtest-persistent"))   # left defined on purpose
                dom = conn.createXML(tiny_domain(f"dgxvmtest-cycle{cycle}", NET_NAME))
                assert dom.isActive()
            finally:
                conn.close()
            assert HOOK_PATH.read_text() == hook
            assert NETWORK_HOOK_PATH.read_text() == net_hook
            daemons = list(stack.pids().values())
            qemu = stack.qemu_pids()
            dnsmasq = stack.dnsmasq_pids()
            assert len(qemu) == 1 and dnsmasq and len(daemons) == 2
        # stop() ran (domain and network still running at that point)
        timings.append(dict(stack.timings))
        assert stack.stop_problems == []
        survivors = [p for p in daemons + qemu + dnsmasq if alive(p)]
        assert survivors == [], f"still alive after stop(): {survivors}"
        assert stack.qemu_pids() == []
        assert not netns_exists(netns)
        assert not link_in(None, BRIDGE)
        assert (HOOK_PATH.read_bytes() if HOOK_PATH.exists() else None) == hook_before
        assert (NETWORK_HOOK_PATH.read_bytes() if NETWORK_HOOK_PATH.exists()
                else None) == net_hook_before
        assert LOCK_PATH.read_text() == ""  # lock released
        # the persistent definition stayed with the stack's run dir, not in the host's /etc
        assert (stack.run_dir / "etc-libvirt-qemu" / "dgxvmtest-persistent.xml").exists()
        assert sorted(p.name for p in QEMU_CONFIG_DIR.rglob("*")) == host_config
        stack.stop()  # idempotent


@pytest.mark.libvirt_lifecycle
def test_stop_cleans_up_after_a_failed_start(tmp_path, no_session_libvirt_stack):
    """libvirtd runs but is never seen answering: start() times out, raises with the log's
    tail, and has already stopped everything it started."""
    stack = LibvirtStack(tmp_path / "run", netns="dgxvm-failed", start_timeout=1.0)
    stack._libvirt_answers = lambda: False
    with pytest.raises(RuntimeError, match="did not answer within 1 s"):
        stack.start()
    assert stack.pids() == {}
    assert not netns_exists("dgxvm-failed")
    assert (tmp_path / "run" / "libvirtd.log").exists()
    stack.stop()  # idempotent after a failed start
    # and the host is free again
    t0 = time.monotonic()
    with LibvirtStack(tmp_path / "again", netns="dgxvm-failed") as again:
        conn = libvirt.open(again.uri)
        assert conn.getType() == "QEMU"
        conn.close()
    assert time.monotonic() - t0 < 30
