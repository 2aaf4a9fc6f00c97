"""Tenants on dgxvm's network, for real: two VMs of the test guest on the harness's libvirt
stack, the attacker's root reached through its QEMU guest agent (guest-exec runs as root in the
guest), probes against the other VM and the host inside the stack's network namespace.

Every attack must fail; every control must work, and each attack has a control showing that
the same probe does see the thing when it is allowed (so a probe cannot "fail" by being broken):

| probe (from VM A, as root)                          | must | control that it can succeed     |
|-----------------------------------------------------|------|---------------------------------|
| TCP to B's sshd                                     | fail | the host reads B's ssh banner    |
| TCP to a service on the gateway address             | fail | the listed service answers A     |
| /32 route to B via the gateway, TCP to B's sshd     | fail | (same as the first)             |
| UDP from B's address / an unused address            | fail | the same datagram from A's own  |
| UDP with B's MAC (own IP, then B's MAC and IP)      | fail | (same)                          |
| gratuitous ARP "B's address is at A's MAC"          | fail | the gateway's entry stays B's    |

Controls: each guest got its reserved address by DHCP; DNS to the gateway answers; a service in
``allow_host_services`` answers; the host reaches each VM's sshd. The nft table is in place
while the network runs and gone when it is destroyed; a running network whose hook left no
marker is refused.

One pair of VMs serves every case (TCG boots take ~10 s each).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time

import libvirt
import pytest

from harness.guest_agent import guest_exec as agent_exec
from test_vm_lifecycle import assert_nothing_left, record, ssh

pytestmark = pytest.mark.integration

GATEWAY = "10.213.0.1"
ALLOWED_TCP, ALLOWED_UDP, CLOSED_TCP = 5000, 5001, 8000      # see conftest's allow_host_services
UNUSED = "10.213.0.99"
SPOOF_MAC = "52:54:00:de:ad:01"


def guest_exec(dom, script: str, timeout: float = 60.0) -> tuple[int, str]:
    """Run ``script`` with /bin/sh as root in the guest; exit code and stdout+stderr."""
    r = agent_exec(dom, f"({script}) 2>&1", timeout=timeout)
    return r.code, r.out


def udp_send(tag: str) -> str:
    """A guest command sending one UDP datagram holding ``tag`` to the allowed udp/5001 on the
    gateway (busybox's nc has no -u: a TFTP read request names ``tag`` as its file)."""
    return f"timeout 2 tftp -g -r {tag} -l /tmp/tftp.out {GATEWAY} {ALLOWED_UDP}; true"


def netns(vmenv, *argv, check=True, **kw):
    return subprocess.run(["ip", "netns", "exec", vmenv.netns, *argv], capture_output=True,
                          text=True, timeout=60, check=check, **kw)


def banner(dom, address: str, port: int) -> str:
    """What a TCP client in the guest reads from address:port within 3 s ('' = nothing)."""
    _, out = guest_exec(dom, f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {address} {port}")
    return out


class UdpRecorder:
    """A UDP listener in the namespace on the gateway's allowed port, recording (source, data)
    of every datagram that reaches it: what gets through the firewall, and from whom."""

    def __init__(self, vmenv):
        self.log = vmenv.base / "udp-recorder.log"
        self.log.write_text("")
        code = ("import re,socket\n"
                "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
                f"s.bind(('{GATEWAY}',{ALLOWED_UDP}))\n"
                f"f=open('{self.log}','a')\n"
                "print('ready',file=f,flush=True)\n"
                "while True:\n"
                "    d,a=s.recvfrom(2048)\n"
                "    m=re.search(rb'(from-a|own-again|spoof-[a-z-]+)',d)\n"
                "    print(a[0],m.group(1).decode() if m else repr(d),file=f,flush=True)\n")
        self.proc = subprocess.Popen(["ip", "netns", "exec", vmenv.netns, "python3", "-u", "-c",
                                      code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while "ready" not in self.log.read_text():
            assert self.proc.poll() is None and time.monotonic() < deadline, "no UDP recorder"
            time.sleep(0.1)

    def received(self) -> list[tuple[str, str]]:
        time.sleep(0.5)
        lines = self.log.read_text().splitlines()[1:]
        return [tuple(line.split(" ", 1)) for line in lines]

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def pair(vmenv):
    """VMs nb (the victim) and na (the attacker), booted in parallel; deleted at the end."""
    from concurrent.futures import ThreadPoolExecutor
    names = ("na", "nb")
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda n: vmenv.dgxvm("create", "--gpu-count", "1", "--domain",
                                                      n, "--user", vmenv.user), names))
    conn = libvirt.open(vmenv.uri)
    try:
        for r in results:
            assert r.returncode == 0, r.stderr
        yield {n: (conn.lookupByName(n), record(vmenv, n)) for n in names}
    finally:
        conn.close()
        for n in names:
            vmenv.dgxvm("delete", "--domain", n)


@pytest.fixture(scope="module")
def listeners(vmenv, pair):
    """Host services in the namespace on the gateway address: one the config allows (tcp/5000),
    one it does not (tcp/8000), and the UDP recorder on the allowed udp/5001. Stopped by PID."""
    procs = []
    for port in (ALLOWED_TCP, CLOSED_TCP):
        procs.append(subprocess.Popen(["ip", "netns", "exec", vmenv.netns, "python3", "-m",
                                       "http.server", "--bind", GATEWAY, str(port)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      cwd=vmenv.base))
    udp = UdpRecorder(vmenv)
    deadline = time.monotonic() + 20
    for port in (ALLOWED_TCP, CLOSED_TCP):
        while netns(vmenv, "python3", "-c", f"import socket; socket.create_connection("
                    f"('{GATEWAY}', {port}), 1)", check=False).returncode != 0:
            assert time.monotonic() < deadline, f"listener on {port} did not start"
            time.sleep(0.2)
    try:
        yield udp
    finally:
        udp.stop()
        for p in procs:
            p.send_signal(signal.SIGTERM)
            p.wait(10)


def test_controls_dhcp_dns_the_listed_service_and_the_host_reaching_each_vm(vmenv, pair,
                                                                            listeners):
    for name, (dom, rec) in pair.items():
        rc, out = guest_exec(dom, "ip -4 -o addr show dev eth0")
        assert f"inet {rec['address']}/24" in out, out              # DHCP gave the reservation
        out = ssh(vmenv, name, "hostname")                           # the host reaches its sshd
        assert out.returncode == 0 and out.stdout.strip() == name, out.stderr
    dom_a, rec_a = pair["na"]
    rc, out = guest_exec(dom_a, f"nslookup nb {GATEWAY}")
    assert "Server:" in out and "timed out" not in out and "no servers" not in out, out
    assert "HTTP/1.0 200" in banner(dom_a, GATEWAY, ALLOWED_TCP)     # allow_host_services
    _, out = guest_exec(dom_a, udp_send("from-a"))
    assert (rec_a["address"], "from-a") in listeners.received(), out


def test_a_guest_reaches_no_other_guest_and_no_other_host_service(vmenv, pair, listeners):
    dom_a, _ = pair["na"]
    _, rec_b = pair["nb"]
    b = rec_b["address"]
    # control: the probe sees B's sshd when it is reachable (from the host)
    seen = netns(vmenv, "python3", "-c", f"import socket; s = socket.create_connection(('{b}', "
                 f"22), 5); s.settimeout(5); print(s.recv(64).decode(errors='replace'))", check=False)
    assert seen.stdout.startswith("SSH-2.0-"), seen.stdout + seen.stderr
    assert "SSH-" not in banner(dom_a, b, 22)                         # A -> B: port isolation
    assert "HTTP" not in banner(dom_a, GATEWAY, CLOSED_TCP)           # A -> a host service
    # routed through the gateway: a /32 route to B via .1 makes A send to the gateway's MAC
    rc, out = guest_exec(dom_a, f"ip route add {b}/32 via {GATEWAY} dev eth0 && ip route get {b}")
    assert rc == 0 and f"via {GATEWAY}" in out, out
    try:
        assert "SSH-" not in banner(dom_a, b, 22)
    finally:
        guest_exec(dom_a, f"ip route del {b}/32")


def test_a_guest_cannot_spoof_another_guests_or_an_unused_address_or_mac(vmenv, pair,
                                                                          listeners):
    """Runs last: it readdresses A (its DHCP client is stopped first so it cannot undo that)."""
    dom_a, rec_a = pair["na"]
    dom_b, rec_b = pair["nb"]
    a, b = rec_a["address"], rec_b["address"]
    rc, out = guest_exec(dom_a, "kill $(cat /run/udhcpc.eth0.pid); "
                                f"ip -4 addr flush dev eth0 && ip addr add {UNUSED}/24 dev eth0 "
                                f"&& {udp_send('spoof-unused')}; "
                                f"ip -4 addr flush dev eth0 && ip addr add {b}/24 dev eth0 "
                                f"&& {udp_send('spoof-b-ip')}; "
                                f"ip -4 addr flush dev eth0 && ip addr add {a}/24 dev eth0 "
                                f"&& {udp_send('own-again')}")
    # the gateway's ARP entry for B exists (the host talks to B) before A lies about it
    assert ssh(vmenv, "nb", "true").returncode == 0
    time.sleep(1.5)                     # past the kernel's ARP locktime (1 s)
    # as B (its address, then its MAC too): announce B's address at A's MAC, then send
    rc, out = guest_exec(dom_a, f"ip -4 addr flush dev eth0 && ip addr add {b}/24 dev eth0 "
                                f"&& arping -U -c 3 -w 4 -I eth0 -s {b} {b}; "
                                f"ip -4 addr flush dev eth0 && ip addr add {a}/24 dev eth0; "
                                f"ip link set eth0 down && ip link set eth0 address {SPOOF_MAC} "
                                f"&& ip link set eth0 up && sleep 1 && {udp_send('spoof-mac')}; "
                                f"ip link set eth0 down && ip link set eth0 address "
                                f"{rec_b['mac']} && ip link set eth0 up && ip -4 addr flush "
                                f"dev eth0 && ip addr add {b}/24 dev eth0 && sleep 1 "
                                f"&& {udp_send('spoof-b-mac-ip')}; ip -o link show eth0")
    assert rec_b["mac"] in out, out     # the guest did take B's MAC: the filter is what stops it
    seen = listeners.received()
    assert (a, "own-again") in seen, seen        # control: the same datagram from A's own address
    spoofed = [s for s in seen if s[1].startswith("spoof")]
    assert spoofed == [], f"spoofed datagrams reached the host: {spoofed}"
    neigh = netns(vmenv, "ip", "neigh", "show", b).stdout
    assert rec_a["mac"] not in neigh and SPOOF_MAC not in neigh, neigh
    # B is still B to the host (its pinned host key; it did not move to A)
    out = ssh(vmenv, "nb", "hostname")
    assert out.returncode == 0 and out.stdout.strip() == "nb", out.stderr


def test_rules_go_with_the_network_and_a_network_without_them_is_refused(vmenv, pair,
                                                                         listeners):
    table = f"dgxvm-{vmenv.network}"
    listed = netns(vmenv, "nft", "list", "table", "inet", table).stdout
    assert f"tcp dport {ALLOWED_TCP} accept" in listed and "oifname" in listed
    from slurm_dgxvm.netfilter import marker_path
    marker = marker_path(vmenv.network)          # /run/dgxvm/networks/, where the hook wrote it
    assert json.loads(marker.read_text())["table"] == f"inet {table}"
    for n in ("na", "nb"):
        assert vmenv.dgxvm("delete", "--domain", n).returncode == 0
    # the marker is the hook's word that the table is there: without it dgxvm creates nothing
    marker.unlink()
    r = vmenv.dgxvm("create", "--gpu-count", "1", "--domain", "nc", "--user", vmenv.user)
    assert r.returncode == 6, r.stderr
    assert "runs without dgxvm's firewall" in r.stderr and "network hook" in r.stderr
    assert_nothing_left(vmenv, ["na", "nb", "nc"])
    vmenv.virsh("net-destroy", vmenv.network)
    gone = netns(vmenv, "nft", "list", "table", "inet", table, check=False)
    assert gone.returncode != 0, gone.stdout
    assert not marker.exists()
    # the next VM starts the network again, and the hook puts the table back
    conn = libvirt.open(vmenv.uri)
    try:
        from slurm_dgxvm.virt import hypervisor
        hypervisor.ensure_network(conn, vmenv.network, "10.213.0.0/24", str(vmenv.state_dir))
    finally:
        conn.close()
    assert netns(vmenv, "nft", "list", "table", "inet", table).returncode == 0
    assert marker.exists()
