"""A multi-node job's fabric, for real: two simulated DGX H100 nodes (harness/cluster.py), each
with its own libvirt and slurmd, the job fabric on ([jobnet]), jobs submitted through Slurm as
the ordinary user.

* A two-node job's tasks meet over TCP across the VMs (a rendezvous at the first node's name and
  an all-reduce of two numbers), in the VMs and in a container pulled on both nodes from the
  cluster's registry; its VMs reach each other over SSH as the job's user with the job's
  derived keys; each node put its VM's InfiniBand VF into the job's partition key at the
  subnet manager (the UFM stand-in) and took it out again; sacct has both nodes' VM records;
  afterwards nothing is left on either node (VM, VXLAN device, bridge, forwarding entries,
  firewall chain) nor at the subnet manager.
* Two concurrent two-node jobs, whose VMs have the same fabric addresses, cannot reach each
  other: as root in a guest, TCP and ping reach only its own job's VM at an address, ARP learns
  only its own job's MACs, a spoofed source address is dropped, and forged VXLAN packets sent
  from the guest to either node's underlay address reach nothing, while the same bytes from a
  real peer node are delivered (the probe is sensitive).
* A job whose Prolog dies on one node: Slurm drains that node and requeues the job held, and
  neither node keeps anything of it, nor does its partition key.
* A node lost mid-job (its VM killed, its slurmd stopped): the other node's Epilog cleans up
  there, and ``dgxvm reconcile`` on the lost node removes the VM, its fabric and its VF's
  membership of the job's partition key.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import struct
import subprocess
import time
from pathlib import Path

import libvirt
import pytest

from harness.cluster import CTL_ADDR, CTL_NETNS, REGISTRY
from harness.guest_agent import guest_exec
from slurm_dgxvm.ibpart import pkey_for
from slurm_dgxvm.jobnet.plan import mac_for, vni_for
from slurm_dgxvm.ledger import Ledger
from slurm_dgxvm.slurm.accounting import decode_all

pytestmark = [pytest.mark.integration, pytest.mark.multinode]

NODES = ("dgxa", "dgxb")
PROBE_SRC = Path(__file__).resolve().parent / "probes" / "udpprobe.c"
FABRIC = ipaddress.IPv4Network("10.64.0.0/16")      # [jobnet] subnet's default
ADDR = {"dgxa": "10.64.0.10", "dgxb": "10.64.0.11"}  # node index 0, 1


# -- helpers ---------------------------------------------------------------------------------------
def submit(c, script: str, *, gpus: int | None = 1, hold: bool = False) -> int:
    return c.jobs.sbatch(script, gpus=gpus, nodes=len(NODES),
                         extra=["--hold"] if hold else [])


def state(c, job: int) -> str:
    return c.cluster.run(["squeue", "-h", "-j", str(job), "-o", "%T|%r"],
                         check=False).stdout.strip()


def slurmd_logs(c) -> str:
    return "\n".join(f"{p}:\n{p.read_text(errors='replace')[-3000:]}"
                     for p in c.cluster.slurmd_logs.values())


def wait_for(what: str, cond, timeout: float = 240, c=None):
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            logs = slurmd_logs(c) if c is not None else ""
            pytest.fail(f"timed out waiting for {what}\n{logs}")
        time.sleep(0.3)


def wait_running(c, job: int) -> None:
    """Until the job's batch script runs: squeue says RUNNING with reason Prolog while the
    Prologs still run (PrologFlags=Alloc)."""
    wait_for(f"job {job} running", lambda: state(c, job) == "RUNNING|None", c=c)


def wait_ended(c, job: int, timeout: float = 300) -> str:
    def ended():
        s = state(c, job)
        if "held" in s:
            pytest.fail(f"job {job} is {s!r}")
        return not s
    wait_for(f"job {job} to end", ended, timeout, c=c)
    out = c.workdir / f"slurm-{job}.out"
    return out.read_text(errors="replace") if out.exists() else ""


def domain(node, job: int):
    conn = libvirt.open(node.stack.uri)
    return conn, conn.lookupByName(f"job-{job}")


def root(node, job: int, script: str, timeout: float = 60) -> str:
    """``script`` as root in job ``job``'s VM on ``node`` (its guest agent); its stdout."""
    conn, dom = domain(node, job)
    try:
        r = guest_exec(dom, script, timeout=timeout)
    finally:
        conn.close()
    return r.out


def fabric_left(node) -> list[str]:
    """The job fabric's pieces on ``node``: vxj*/brj* devices and nft job chains."""
    links = node.run(["ip", "-o", "link", "show"], check=True).stdout
    left = [line.split(":")[1].strip().split("@")[0] for line in links.splitlines()
            if line.split(":")[1].strip().startswith(("vxj", "brj"))]
    nft = node.run(["nft", "list", "table", "inet", "dgxvm-jobnet"]).stdout
    left += [line.strip() for line in nft.splitlines() if line.strip().startswith("chain job-")]
    return left


def nothing_left(c) -> None:
    for name in NODES:
        node = c.node(name)
        conn = libvirt.open(node.stack.uri)
        try:
            assert [d.name() for d in conn.listAllDomains()] == [], name
        finally:
            conn.close()
        state_dir = node.path("/var/lib/dgxvm")
        assert Ledger(state_dir).read().allocations == {}, name
        assert not list((state_dir / "vms").glob("*")), name
        assert fabric_left(node) == [], name


def vxlan_frame(vni: int, dst_mac: str, src_ip: str, dst_ip: str, port: int,
                payload: bytes) -> bytes:
    """A VXLAN packet's UDP payload: the header (I flag, VNI) and an inner Ethernet frame
    carrying IPv4/UDP ``payload`` to ``dst_ip``:``port`` at ``dst_mac``."""
    udp = struct.pack("!HHHH", 40000, port, 8 + len(payload), 0) + payload
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                      ipaddress.IPv4Address(src_ip).packed, ipaddress.IPv4Address(dst_ip).packed)
    total = sum(struct.unpack("!10H", hdr))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    hdr = hdr[:10] + struct.pack("!H", ~total & 0xFFFF) + hdr[12:]
    eth = bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex("02ee000000ee") + b"\x08\x00"
    return struct.pack("!B3xI", 0x08, vni << 8) + eth + hdr + udp


def pkey(job: int) -> str:
    """The job's partition key as UFM's API writes it ([ib] pkey_min and pkey_max's defaults)."""
    return f"0x{pkey_for(job, 4096, 32766):04x}"


def ib_calls(c, job: int) -> dict[str, dict[str, list[str]]]:
    """``{"add" | "remove": {node: its VF GUIDs}}``: the calls for ``job``'s key at the UFM
    stand-in, each node's known by its HCAs' GUIDs (the simulated serial, node index + 1, is
    the GUID's bytes 3-4: ``02 f603 SSSS ...``, slurm_dgxvm.ibpart.plan.vf_guid)."""
    out: dict[str, dict[str, list[str]]] = {"add": {}, "remove": {}}
    for call in c.ufm_calls():
        body = call.get("body") or {}
        if body.get("pkey") != pkey(job):
            continue
        assert call["status"] == 200 and call["user"] == "dgxvm", call
        kind = "add" if call["path"] == "/ufmRest/resources/pkeys" else "remove"
        if kind == "add":
            assert (body["membership"], body["index0"]) == ("full", True), call
        [node] = {n for i, n in enumerate(NODES) for g in body["guids"]
                  if g[2:10] == f"f603{i + 1:04x}"}
        assert node not in out[kind], f"a second {kind} from {node}: {call}"
        out[kind][node] = sorted(body["guids"])
    return out


@pytest.fixture
def registry(multinode, tmp_path):
    """A container registry on the controller's address (the cluster's REGISTRY, which every
    node's config lets dgxvm reach over plain HTTP), with one busybox image."""
    from harness.registry import LocalRegistry, build_image
    host, port = REGISTRY.split(":")
    assert host == CTL_ADDR
    reg = LocalRegistry(tmp_path / "reg", port=int(port), netns=CTL_NETNS, host=host)
    reg.start()
    try:
        digest = build_image(reg, "mn/busy", "1", tmp_path / "build", marker="mn-busy")
        yield f"{REGISTRY}/mn/busy:1", digest, reg
    finally:
        reg.stop()


@pytest.fixture
def probe(multinode) -> str:
    """The UDP probe, built here and put in the jobs' work dir, which each VM has at the same
    path (the work dir share): what a user brings into their own VM."""
    out = multinode.workdir / "udpprobe"
    subprocess.run(["gcc", "-static", "-Os", "-s", "-o", str(out), str(PROBE_SRC)], check=True)
    out.chmod(0o755)
    yield str(out)
    out.unlink(missing_ok=True)


#: a rendezvous at the first node's name and an all-reduce of two ranks over TCP, busybox sh
ALLREDUCE = (Path(__file__).resolve().parents[2] / "harness" / "allreduce.sh").read_text()


# -- the tests -------------------------------------------------------------------------------------
def test_a_two_node_jobs_tasks_meet_over_tcp_on_the_fabric_and_both_vms_are_accounted(
        multinode, registry):
    c = multinode
    ref, digest, reg = registry
    (c.workdir / "allreduce.sh").write_text(ALLREDUCE)
    (c.workdir / "allreduce.sh").chmod(0o755)
    job = submit(c, "#!/bin/sh\n"
                    "export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" "
                    "| head -n1)\n"
                    "srun -N2 --ntasks-per-node=1 dgxvm run -- sh ./allreduce.sh\n"
                    f"srun -N2 --ntasks-per-node=1 dgxvm run --container-image {ref} "
                    "-- sh ./allreduce.sh\n"
                    "dgxvm job --json > job-$SLURM_JOB_ID.json\n"
                    "dgxvm run -- sh -c 'cat /sys/class/net/eth1/mtu; "
                    "grep -w dgxb /etc/hosts; dbclient -T dgxb cat /sys/class/net/eth1/address'"
                    "\n")
    out = wait_ended(c, job)
    lines = out.splitlines()
    assert "rank 0 of 2 on dgxa sum 30" in lines, out
    assert "rank 1 of 2 on dgxb sum 30" in lines, out
    # the same in a container of the registry's image, pulled on each node by its own dgxvm
    assert "rank 0 of 2 on dgxa sum 30 in mn-busy" in lines, out
    assert "rank 1 of 2 on dgxb sum 30 in mn-busy" in lines, out
    # each node's own image cache copied it once (a node's cache is its own)
    assert reg.count("GET", rf"/v2/mn/busy/manifests/{digest}$") == 2, reg.requests()
    # the guest: the fabric's MTU, the job's node names, SSH to the other VM with the job's key
    # and that VM's derived host key (no prompt: dbclient has no terminal here)
    assert "1450" in lines, out
    assert [ADDR["dgxb"], "dgxb"] in [x.split() for x in lines], out
    assert mac_for(vni_for(job), 1) in lines, out
    view = json.loads((c.workdir / f"job-{job}.json").read_text())
    assert view["job_fabric"]["node"] == "dgxa" and view["job_fabric"]["index"] == 0
    assert view["job_fabric"]["hosts"] == [["dgxa", ADDR["dgxa"]], ["dgxb", ADDR["dgxb"]]]
    # sacct: one record per node, both ended
    row = c.jobs.sacct([job])[job]
    assert row["State"] == "COMPLETED", out
    records = decode_all(c.cluster.run(["sacct", "-j", str(job), "-X", "-n", "-P", "-o",
                                        "AdminComment"], check=True).stdout.strip())
    assert sorted((r["node"], r["state"]) for r in records) == [("dgxa", "ended"),
                                                               ("dgxb", "ended")], \
        slurmd_logs(c)
    assert all("jobnet:" in r["create_stages"] and "ib:" in r["create_stages"]
               for r in records)
    assert all(r["containers"] == f"{ref}@{digest}" for r in records), records
    # InfiniBand: each node put its VM's VF (one GPU, one VF beside it) into the job's key and
    # took the same out again; the key holds nothing now
    ib = ib_calls(c, job)
    assert sorted(ib["add"]) == list(NODES) and ib["remove"] == ib["add"], ib
    assert all(len(guids) == 1 and guids[0].startswith("02") for guids in ib["add"].values())
    assert c.ufm_members(pkey(job)) == []
    c.wait_idle()
    nothing_left(c)


def test_two_jobs_with_the_same_fabric_addresses_cannot_reach_each_other(multinode, probe):
    c = multinode
    a = submit(c, "#!/bin/sh\nsleep 600\n")
    b = submit(c, "#!/bin/sh\nsleep 600\n")
    try:
        wait_running(c, a)
        wait_running(c, b)
        na, nb = c.node("dgxa"), c.node("dgxb")
        # each job's VM on dgxb serves its own job's name at the same address
        for job in (a, b):
            root(nb, job, f"(nc -ll -p 7000 -e /bin/echo job-{job} >/dev/null 2>&1 &) ; "
                          f"({probe} recv 7001 60 > /tmp/udp.log 2>&1 &) ; sleep 0.5")
        # TCP and ping from B's VM on dgxa reach B's VM on dgxb only
        assert root(na, b, f"nc -w 3 {ADDR['dgxb']} 7000").strip() == f"job-{b}"
        assert root(na, a, f"nc -w 3 {ADDR['dgxb']} 7000").strip() == f"job-{a}"
        root(na, b, f"ping -c 2 -W 2 {ADDR['dgxb']}")
        neigh = root(na, b, "ip neigh show dev eth1")
        assert mac_for(vni_for(b), 1) in neigh and mac_for(vni_for(a), 1) not in neigh, neigh
        # a spoofed source: B's guest root takes another fabric address; nothing of it arrives
        root(na, b, "ip addr add 10.64.0.99/32 dev eth1; "
                    f"ip route replace {ADDR['dgxb']}/32 dev eth1 src 10.64.0.99")
        assert root(na, b, f"nc -w 3 {ADDR['dgxb']} 7000").strip() == ""
        root(na, b, f"ip route del {ADDR['dgxb']}/32; ip addr del 10.64.0.99/32 dev eth1")
        # forged VXLAN carrying A's VNI to A's VM on dgxb, from B's guest through its NAT to
        # dgxb's underlay address, and to its own node's
        forged = vxlan_frame(vni_for(a), mac_for(vni_for(a), 1), ADDR["dgxa"], ADDR["dgxb"],
                             7001, b"forged-from-guest")
        b64 = base64.b64encode(forged).decode()
        for target in (nb.addr, na.addr):
            sent = root(na, b, f"echo {b64} | base64 -d | {probe} send {target} 4789")
            assert sent.startswith("sent "), sent
        time.sleep(1)
        assert "forged" not in root(nb, a, "cat /tmp/udp.log")
        # the same bytes from dgxa itself (a peer of A's fabric on dgxb) are delivered: the
        # probe would see a packet that got through
        control = vxlan_frame(vni_for(a), mac_for(vni_for(a), 1), ADDR["dgxa"], ADDR["dgxb"],
                              7001, b"from-a-peer")
        na.run(["python3", "-c", "import socket,sys; socket.socket(socket.AF_INET, "
                "socket.SOCK_DGRAM).sendto(bytes.fromhex(sys.argv[1]), (sys.argv[2], 4789))",
                control.hex(), nb.addr], check=True)
        wait_for("the control packet", lambda: "from-a-peer" in root(nb, a, "cat /tmp/udp.log"),
                 timeout=10)
        assert "from-a-peer" not in root(nb, b, "cat /tmp/udp.log")
    finally:
        c.cluster.run(["scancel", str(a), str(b)], check=False)
    wait_ended(c, a)
    wait_ended(c, b)
    c.wait_idle()
    nothing_left(c)


def test_a_prolog_that_dies_on_one_node_leaves_nothing_on_either(multinode):
    c = multinode
    job = submit(c, "#!/bin/sh\nhostname\n", hold=True)
    failpoints = c.node("dgxb").path("/var/lib/dgxvm") / "failpoints"
    failpoints.write_text(f"after:make_job_fabric job-{job} kill\n")
    failpoints.chmod(0o644)
    try:
        c.cluster.run(["scontrol", "release", str(job)], check=True)
        # Slurm's outcome: dgxb drained (a Prolog killed is the node's fault), the job held
        wait_for("the job requeued held",
                 lambda: "held" in state(c, job) or "launch failed" in state(c, job), c=c)
        wait_for("both nodes clean", lambda: not any(
            fabric_left(c.node(n)) or c.node(n).vms() for n in NODES), timeout=120)
        nothing_left(c)
        assert "drain" in c.cluster.node_state(node="dgxb")
        # both nodes' VFs were in the job's key (dgxb's Prolog died after its ib stage); both
        # Epilogs took them out
        ib = ib_calls(c, job)
        assert sorted(ib["add"]) == list(NODES) and ib["remove"] == ib["add"], ib
        assert c.ufm_members(pkey(job)) == []
    finally:
        failpoints.unlink(missing_ok=True)
        c.cluster.run(["scancel", str(job)], check=False)
        c.cluster.run(["scontrol", "update", "nodename=dgxb", "state=resume"], check=False)
    c.wait_idle()


def test_a_node_lost_mid_job_is_cleaned_by_the_other_epilog_and_reconcile(multinode):
    c = multinode
    job = submit(c, "#!/bin/sh\nsleep 600\n")
    wait_running(c, job)
    nb = c.node("dgxb")
    assert fabric_left(nb)
    # dgxb is lost: its slurmd stops, its VM dies; the admin marks it down
    c.cluster.stop_slurmd("dgxb")
    try:
        nb.run(["virsh", "-c", "qemu:///system", "destroy", f"job-{job}"], check=True)
        c.cluster.run(["scontrol", "update", "nodename=dgxb", "state=down", "reason=lost"],
                      check=True)
        c.cluster.run(["scancel", str(job)], check=False)
        wait_for(f"job {job} gone", lambda: not state(c, job), timeout=120, c=c)
        # dgxa's Epilog cleaned dgxa
        assert c.node("dgxa").vms() == [] and fabric_left(c.node("dgxa")) == []
        # dgxb kept its pieces (no Epilog ran there), its VF in the job's key too; reconcile,
        # run by the admin while its slurmd is still away (Slurm no longer has the job
        # there), removes them
        assert fabric_left(nb)
        ib = ib_calls(c, job)
        assert list(ib["remove"]) == ["dgxa"] and c.ufm_members(pkey(job)) == ib["add"]["dgxb"]
        # as an admin on the node: Slurm's config where a node has it (the cluster's)
        r = nb.run(["env", f"SLURM_CONF={c.cluster.slurm_conf}", c.dgxvm, "reconcile"],
                   timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"vm job-{job}: " in r.stdout and "delete the VM: done" in r.stdout, r.stdout
        assert nb.vms() == [] and fabric_left(nb) == []
        assert c.ufm_members(pkey(job)) == []
    finally:
        c.cluster.start_slurmd("dgxb")
    c.cluster.run(["scontrol", "update", "nodename=dgxb", "state=resume"], check=False)
    c.wait_idle()
    # the slurmd that came back may run the job's Epilog once more: it finds nothing
    wait_for("both nodes empty", lambda: not any(fabric_left(c.node(n)) or c.node(n).vms()
                                                 for n in NODES), timeout=120, c=c)
    nothing_left(c)
