"""Stand-ins for a multi-node job fabric on one machine, in network namespaces (no libvirt, no
Slurm): an underlay bridge, "nodes" on it, and "VMs" attached to a node's job bridge.

    underlay netns  (bridge ul)
      | veth            | veth            | veth
    node n1           node n2           node n3        192.168.214.11-13/24 on eth0
      brj<vni> <- veth -> VM netns (eth0: the job's fabric address and MAC, MTU)
      nat<i>   <- veth -> the same VM netns (nat0: 172.31.<i>.2/24, default route via the node,
                          masqueraded out of eth0, as libvirt's NAT network does)

Every namespace is named ``<prefix>-<name>`` (default prefix ``dgxvm-jn``) and deleted by
:meth:`Rig.close`, with every process it started (stopped by PID). The job fabric itself is
made by the code under test, run inside a node's namespace (:meth:`Rig.py`), never here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

UNDERLAY_NET = "192.168.214"
NODE_ADDR = {f"n{i}": f"{UNDERLAY_NET}.{10 + i}" for i in (1, 2, 3)}

#: Run by ``python3 - CMD ARGS`` inside a VM's or a node's namespace: small network probes.
AGENT = r'''
import os, socket, struct, sys, time
cmd, args = sys.argv[1], sys.argv[2:]

def csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF

if cmd == "ping":                      # ping ADDR [COUNT]: how many echo replies came back
    addr, count = args[0], int(args[1]) if len(args) > 1 else 1
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.settimeout(0.3)
    got = 0
    for seq in range(count):
        body = struct.pack("!BBHHH", 8, 0, 0, os.getpid() & 0xFFFF, seq) + b"dgxvm-jn"
        body = body[:2] + struct.pack("!H", csum(body)) + body[4:]
        s.sendto(body, (addr, 0))
        end = time.monotonic() + 0.6
        while time.monotonic() < end:
            try:
                data, src = s.recvfrom(2048)
            except (TimeoutError, socket.timeout):
                continue
            ihl = (data[0] & 0xF) * 4
            typ, _, _, ident, sq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
            if src[0] == addr and typ == 0 and ident == os.getpid() & 0xFFFF and sq == seq:
                got += 1
                break
    print(got)
elif cmd == "tcp":                     # tcp ADDR PORT: what the server there says, or ERR
    try:
        with socket.create_connection((args[0], int(args[1])), timeout=1.5) as c:
            c.sendall(b"hello\n")
            print(c.recv(100).decode().strip())
    except OSError as exc:
        print(f"ERR {exc.__class__.__name__}")
elif cmd == "serve-tcp":               # serve-tcp PORT TAG: answer every connection with TAG
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", int(args[0])))
    srv.listen(16)
    print("ready", flush=True)
    while True:
        c, _ = srv.accept()
        c.recv(100)
        c.sendall(args[1].encode() + b"\n")
        c.close()
elif cmd == "serve-udp":               # serve-udp PORT FILE: append every datagram to FILE
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", int(args[0])))
    print("ready", flush=True)
    while True:
        data, src = s.recvfrom(4096)
        with open(args[1], "a") as f:
            f.write(f"{src[0]} {data.decode(errors='replace')}\n")
elif cmd == "send-udp":                # send-udp ADDR PORT HEX: one datagram
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(bytes.fromhex(args[2]), (args[0], int(args[1])))
    print("sent")
elif cmd == "tcp-bulk-serve":          # tcp-bulk-serve PORT: sink, then report bytes/s
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", int(args[0])))
    srv.listen(4)
    print("ready", flush=True)
    while True:
        c, _ = srv.accept()
        mode = c.recv(1)
        if mode == b"b":
            while c.recv(1 << 20):
                pass
        else:                          # "r": echo 1-byte round trips
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while (d := c.recv(64)):
                c.sendall(d)
        c.close()
elif cmd == "tcp-bulk":                # tcp-bulk ADDR PORT SECONDS: MB/s sent
    c = socket.create_connection((args[0], int(args[1])), timeout=5)
    c.sendall(b"b")
    buf = b"x" * (1 << 18)
    sent, end = 0, time.monotonic() + float(args[2])
    start = time.monotonic()
    while time.monotonic() < end:
        c.sendall(buf)
        sent += len(buf)
    c.shutdown(socket.SHUT_WR)
    c.recv(1)
    print(sent / (time.monotonic() - start) / 1e6)
elif cmd == "tcp-rtt":                 # tcp-rtt ADDR PORT N: median round trip in microseconds
    c = socket.create_connection((args[0], int(args[1])), timeout=5)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c.sendall(b"r")
    times = []
    for _ in range(int(args[2])):
        t = time.perf_counter()
        c.sendall(b"p")
        c.recv(64)
        times.append((time.perf_counter() - t) * 1e6)
    times.sort()
    print(times[len(times) // 2])
'''


def vxlan_frame(vni: int, dst_mac: str, src_ip: str, dst_ip: str, dport: int,
                payload: bytes, src_mac: str = "02:de:ad:be:ef:01") -> bytes:
    """A VXLAN UDP payload (VXLAN header + Ethernet + IPv4 + UDP) as a forger would send it to
    a node's VXLAN port: the inner datagram goes to ``dst_ip``:``dport`` at ``dst_mac``."""
    import ipaddress
    import struct

    def csum(data: bytes) -> int:
        s = sum(struct.unpack(f"!{len(data) // 2}H", data))
        s = (s >> 16) + (s & 0xFFFF)
        s += s >> 16
        return ~s & 0xFFFF

    udp = struct.pack("!HHHH", 40000, dport, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                     ipaddress.IPv4Address(src_ip).packed, ipaddress.IPv4Address(dst_ip).packed)
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    eth = bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(src_mac.replace(":", "")) \
        + b"\x08\x00"
    return struct.pack("!II", 0x08000000, vni << 8) + eth + ip + udp


class Rig:
    """The namespaces; ``close()`` removes all of them and stops every process started."""

    def __init__(self, workdir: Path, prefix: str = "dgxvm-jn", nodes=("n1", "n2", "n3")):
        self.workdir, self.prefix = Path(workdir), prefix
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.agent = self.workdir / "jobnet-agent.py"
        self.agent.write_text(AGENT)
        import slurm_dgxvm
        self.pythonpath = str(Path(slurm_dgxvm.__file__).resolve().parents[1])
        self.nodes = tuple(nodes)
        self.vm_count = 0

    # -- plumbing --------------------------------------------------------------------------------
    def ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def sh(self, *argv: str, check: bool = True, input: str | None = None):
        r = subprocess.run(list(argv), capture_output=True, text=True, timeout=60, input=input)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def ip(self, ns: str, *args: str, check: bool = True):
        return self.sh("ip", "-n", self.ns(ns), *args, check=check)

    def run(self, ns: str, *argv: str, check: bool = True, input: str | None = None):
        """``argv`` run inside namespace ``ns`` (``ip netns exec``: /sys is that namespace's)."""
        return self.sh("ip", "netns", "exec", self.ns(ns), *argv, check=check, input=input)

    def add_ns(self, name: str) -> None:
        full = self.ns(name)
        self.sh("ip", "netns", "del", full, check=False)        # a crashed run's leftover
        self.sh("ip", "netns", "add", full)
        self.namespaces.append(full)
        self.ip(name, "link", "set", "lo", "up")

    def py(self, ns: str, code: str, *args: str, check: bool = False):
        """Python ``code`` run in namespace ``ns`` with the package under test importable."""
        return self.sh("ip", "netns", "exec", self.ns(ns), "env",
                       f"PYTHONPATH={self.pythonpath}", sys.executable, "-c", code, *args,
                       check=check)

    def agent_run(self, ns: str, *args: str) -> str:
        return self.sh("ip", "netns", "exec", self.ns(ns), sys.executable, str(self.agent),
                       *args).stdout.strip()

    def agent_start(self, ns: str, *args: str) -> subprocess.Popen:
        p = subprocess.Popen(["ip", "netns", "exec", self.ns(ns), sys.executable,
                              str(self.agent), *args], stdout=subprocess.PIPE, text=True)
        self.procs.append(p)
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError(f"agent {args} in {ns} did not start")
        return p

    # -- the topology ----------------------------------------------------------------------------
    def build(self) -> None:
        self.add_ns("ul")
        self.ip("ul", "link", "add", "ul", "type", "bridge")
        self.ip("ul", "link", "set", "ul", "up")
        for node in self.nodes:
            self.add_ns(node)
            self.ip("ul", "link", "add", f"p{node}", "type", "veth", "peer", "name", "eth0",
                    "netns", self.ns(node))
            self.ip("ul", "link", "set", f"p{node}", "master", "ul", "up")
            self.ip(node, "addr", "add", f"{NODE_ADDR[node]}/24", "dev", "eth0")
            self.ip(node, "link", "set", "eth0", "up")

    def add_vm(self, name: str, node: str, bridge: str, address: str, mac: str, mtu: int,
               nat: bool = False) -> None:
        """A "VM" namespace ``name`` with eth0 in ``node``'s ``bridge``; with ``nat``, a second
        veth routed and masqueraded through the node (libvirt's NAT network)."""
        self.add_ns(name)
        self.ip(node, "link", "add", f"v{name}", "mtu", str(mtu), "type", "veth", "peer",
                "name", "eth0", "netns", self.ns(name))
        self.ip(node, "link", "set", f"v{name}", "master", bridge, "up")
        self.ip(name, "link", "set", "eth0", "address", mac, "mtu", str(mtu), "up")
        self.ip(name, "addr", "add", address, "dev", "eth0")
        if nat:
            self.vm_count += 1
            net = f"172.31.{self.vm_count}"
            self.ip(node, "link", "add", f"nat{self.vm_count}", "type", "veth", "peer", "name",
                    "nat0", "netns", self.ns(name))
            self.ip(node, "addr", "add", f"{net}.1/24", "dev", f"nat{self.vm_count}")
            self.ip(node, "link", "set", f"nat{self.vm_count}", "up")
            self.ip(name, "addr", "add", f"{net}.2/24", "dev", "nat0")
            self.ip(name, "link", "set", "nat0", "up")
            self.ip(name, "route", "add", "default", "via", f"{net}.1")
            self.run(node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            self.run(node, "nft", "-f", "-", input=(
                "table ip rig-nat {\n chain post {\n  type nat hook postrouting priority "
                "srcnat; policy accept;\n  oifname \"eth0\" masquerade\n }\n}\n"))

    # -- the code under test, in a node ----------------------------------------------------------
    def jobnet(self, node: str, call: str, arg) -> tuple[int, str]:
        """``apply`` (arg: a JobFabric dict), ``teardown`` (arg: a VNI) or ``present``, run by
        the package in ``node``'s namespace: (exit status, JSON result or the error)."""
        code = ("import json, sys\n"
                "from slurm_dgxvm.errors import DgxvmError\n"
                "from slurm_dgxvm.jobnet import apply as jn\n"
                "from slurm_dgxvm.jobnet.plan import JobFabric\n"
                "call, arg = sys.argv[1], json.loads(sys.argv[2])\n"
                "try:\n"
                "    if call == 'apply':\n"
                "        out = jn.apply(JobFabric.from_dict(arg))\n"
                "    elif call == 'teardown':\n"
                "        out = jn.teardown(arg)\n"
                "    else:\n"
                "        out = jn.present()\n"
                "except DgxvmError as exc:\n"
                "    print(f'{type(exc).__name__}: {exc}')\n"
                "    sys.exit(exc.exit_code)\n"
                "print(json.dumps(out))\n")
        r = self.py(node, code, call, json.dumps(arg))
        return r.returncode, (r.stdout.strip() or r.stderr.strip())

    def close(self) -> None:
        # `ip netns exec` execs its command: each PID is the agent itself
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            if p.stdout:
                p.stdout.close()
        for full in reversed(self.namespaces):
            self.sh("ip", "netns", "del", full, check=False)
        self.namespaces.clear()


__all__ = ["AGENT", "NODE_ADDR", "Rig", "vxlan_frame"]
