"""Run by hand, not in CI (its name is not test_*.py, so a plain `pytest tests` never collects
it, and nothing is skipped): the attacks of test_network_isolation.py,
run once with every protection stripped from the running pair (nft table deleted, bridge ports
un-isolated, nwfilter's ebtables jumps flushed), must all SUCCEED. So when they fail
in the real test, it is the protections that stop them, not a broken probe.

Run: flock /tmp/dgxvm-libvirt.lock .venv/bin/python -m pytest
tests/integration/probe_sensitivity.py -q -s -p no:cacheprovider
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET

import pytest

from test_network_isolation import (ALLOWED_TCP, CLOSED_TCP, GATEWAY, SPOOF_MAC, UNUSED,  # noqa: F401
                                    banner, guest_exec, listeners, netns, pair, udp_send)
from test_vm_lifecycle import ssh

pytestmark = pytest.mark.integration


def strip_protections(vmenv, pair) -> list[str]:
    done = []
    r = netns(vmenv, "nft", "delete", "table", "inet", f"dgxvm-{vmenv.network}", check=False)
    done.append(f"nft delete table: rc {r.returncode} {r.stderr.strip()}")
    for name, (dom, _rec) in pair.items():
        tap = ET.fromstring(dom.XMLDesc(0)).find("./devices/interface/target").get("dev")
        r = netns(vmenv, "sh", "-c", f"ebtables -t nat -L 2>&1 | grep -c {tap} || true")
        done.append(f"{name}: ebtables nat rules naming {tap} (nwfilter's): {r.stdout.strip()}")
        r = netns(vmenv, "bridge", "link", "set", "dev", tap, "isolated", "off", check=False)
        done.append(f"{name}: {tap} isolated off: rc {r.returncode} {r.stderr.strip()}")
    # nwfilter's jumps into its per-tap chains (libvirt cannot drop a filter live here:
    # "cannot modify virtio network device driver options")
    r = netns(vmenv, "sh", "-c", "ebtables -t nat -F PREROUTING && ebtables -t nat -F POSTROUTING",
              check=False)
    done.append(f"ebtables -t nat -F PREROUTING/POSTROUTING: rc {r.returncode} {r.stderr.strip()}")
    return done


def test_every_attack_succeeds_without_the_protections(vmenv, pair, listeners):
    dom_a, rec_a = pair["na"]
    _, rec_b = pair["nb"]
    a, b = rec_a["address"], rec_b["address"]
    # with the protections, the attacks fail (sanity: same probes as the real test)
    assert "SSH-" not in banner(dom_a, b, 22)
    for line in strip_protections(vmenv, pair):
        print("strip:", line)
    results = {}
    results["A -> B sshd"] = "SSH-" in banner(dom_a, b, 22)
    results["A -> gateway tcp/8000 (not listed)"] = "HTTP" in banner(dom_a, GATEWAY, CLOSED_TCP)
    guest_exec(dom_a, f"ip route add {b}/32 via {GATEWAY} dev eth0")
    guest_exec(dom_a, "ip neigh flush dev eth0")
    results["A -> B via gateway route"] = "SSH-" in banner(dom_a, b, 22)
    guest_exec(dom_a, f"ip route del {b}/32")
    guest_exec(dom_a, "kill $(cat /run/udhcpc.eth0.pid); "
                      f"ip -4 addr flush dev eth0 && ip addr add {UNUSED}/24 dev eth0 "
                      f"&& {udp_send('spoof-unused')}; "
                      f"ip -4 addr flush dev eth0 && ip addr add {b}/24 dev eth0 "
                      f"&& {udp_send('spoof-b-ip')}; "
                      f"ip -4 addr flush dev eth0 && ip addr add {a}/24 dev eth0")
    assert ssh(vmenv, "nb", "true").returncode == 0
    time.sleep(1.5)
    _, out = guest_exec(dom_a, f"ip -4 addr flush dev eth0 && ip addr add {b}/24 dev eth0 "
                               f"&& arping -U -c 3 -w 4 -I eth0 -s {b} {b}; ")
    neigh = netns(vmenv, "ip", "neigh", "show", b).stdout
    results["gratuitous ARP moves B to A's MAC"] = rec_a["mac"] in neigh
    print("arping:", out.strip().splitlines()[-1:] if out.strip() else out, "neigh:", neigh.strip())
    guest_exec(dom_a, f"ip -4 addr flush dev eth0 && ip addr add {a}/24 dev eth0; "
                      f"ip link set eth0 down && ip link set eth0 address {SPOOF_MAC} "
                      f"&& ip link set eth0 up && sleep 1 && {udp_send('spoof-mac')}")
    seen = listeners.received()
    print("recorder:", seen)
    results["UDP from an unused address"] = (UNUSED, "spoof-unused") in seen
    results["UDP from B's address"] = (b, "spoof-b-ip") in seen
    results["UDP from a made-up MAC"] = (a, "spoof-mac") in seen
    for k, v in results.items():
        print(f"unprotected: {k}: {'SUCCEEDS' if v else 'fails'}")
    assert all(results.values()), results
