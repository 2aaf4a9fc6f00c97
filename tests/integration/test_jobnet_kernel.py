"""The job fabric on a real kernel, in network namespaces (root; no libvirt, no Slurm).

Three "nodes" on an underlay bridge (harness/jobnet_rig.py), the package's own ``apply()`` run
inside each node's namespace, veth "VMs" in the job bridges. Two jobs run at once on the same
nodes with the same fabric addresses: job A on n[1-2], job B on n[1-3].

| probe                                                          | must    | control               |
|----------------------------------------------------------------|---------|-----------------------|
| ping, TCP between a job's VMs on different nodes               | work    |                       |
| ping, TCP, ARP from job A's VM to job B's (same addresses)     | fail    | B's own VMs reach it  |
| forged VXLAN (VNI A, inner frame to A's VM) from n3, no peer   | dropped | same bytes from n1    |
| the same from B's VM through its node's NAT, to another node   | dropped | NAT path reaches n2   |
| the same from B's VM through its node's NAT, to its own node   | dropped |                       |
| apply of a VNI whose devices are another job's                 | refused |                       |
| apply with another node's underlay address                     | refused |                       |
| apply of a job's fabric again (a Prolog run twice)              | works   |                       |
| after teardown on every node: devices, FDB, nft chains          | none    | present() saw them    |
"""

from __future__ import annotations

import json
import shutil
import time

import pytest

from harness.jobnet_rig import NODE_ADDR, Rig, vxlan_frame
from slurm_dgxvm.config import JobnetConfig
from slurm_dgxvm.jobnet.plan import VNI_MAX, mac_for, plan

pytestmark = pytest.mark.integration

CFG = JobnetConfig(enabled=True, nodes=dict(NODE_ADDR))
JOB_A, JOB_B = 101, 202
VICTIM_PORT, TCP_PORT, PLAIN_PORT = 9999, 7000, 5555


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    for tool in ("ip", "bridge", "nft"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    r = Rig(tmp_path_factory.mktemp("jobnet"))
    try:
        r.build()
        r.fabs = {}
        for job, nodelist, nodes in ((JOB_A, "n[1-2]", ("n1", "n2")),
                                     (JOB_B, "n[1-3]", ("n1", "n2", "n3"))):
            for node in nodes:
                fab = plan(CFG, job, nodelist, node)
                rc, out = r.jobnet(node, "apply", fab.to_dict())
                assert rc == 0, f"apply of job {job} on {node}: {out}"
                r.fabs[job, node] = fab
                vm = f"{'a' if job == JOB_A else 'b'}{node[1]}"
                r.add_vm(vm, node, fab.bridge, str(fab.vm_address), fab.mac, fab.mtu,
                         nat=(vm == "b1"))
        for vm in ("a2", "b2", "b3", "a1"):
            r.agent_start(vm, "serve-tcp", str(TCP_PORT), vm)
        yield r
    finally:
        r.close()


def test_the_devices_are_tagged_with_their_jobs_and_have_the_fabric_mtu(rig):
    rc, out = rig.jobnet("n1", "present", None)
    assert rc == 0
    assert {int(k): v for k, v in json.loads(out).items()} == {JOB_A: JOB_A,
                                                                             JOB_B: JOB_B}
    link = rig.ip("n1", "-d", "link", "show", "vxj101").stdout
    assert "mtu 1450" in link and "vxlan id 101 local 192.168.214.11" in link
    assert "nolearning" in link and "alias dgxvm-job=101" in link
    assert rig.ip("n1", "-4", "addr", "show", "dev", "brj101").stdout.strip() == ""
    assert rig.run("n1", "cat", "/proc/sys/net/ipv6/conf/brj101/disable_ipv6").stdout == "1\n"


def test_a_jobs_vms_reach_each_other_across_nodes(rig):
    assert rig.agent_run("a1", "ping", "10.64.0.11", "3") == "3"
    assert rig.agent_run("a1", "tcp", "10.64.0.11", str(TCP_PORT)) == "a2"
    assert rig.agent_run("a2", "tcp", "10.64.0.10", str(TCP_PORT)) == "a1"
    assert rig.agent_run("b1", "tcp", "10.64.0.12", str(TCP_PORT)) == "b3"    # three nodes
    assert rig.agent_run("b3", "ping", "10.64.0.11", "2") == "2"


def test_jobs_with_the_same_addresses_do_not_reach_each_other(rig):
    # the same address answers each job with its own VM
    assert rig.agent_run("a1", "tcp", "10.64.0.11", str(TCP_PORT)) == "a2"
    assert rig.agent_run("b1", "tcp", "10.64.0.11", str(TCP_PORT)) == "b2"
    # job A has no third node: B's VM there is unreachable from A, by ping, TCP and ARP
    assert rig.agent_run("b1", "ping", "10.64.0.12", "1") == "1"             # control
    assert rig.agent_run("a1", "ping", "10.64.0.12", "2") == "0"
    assert rig.agent_run("a1", "tcp", "10.64.0.12", str(TCP_PORT)).startswith("ERR")
    neigh_a = rig.ip("a1", "neigh", "show", "dev", "eth0").stdout
    assert mac_for(JOB_A, 1) in neigh_a                        # A's peer, learnt by ARP
    for i in range(3):
        assert mac_for(JOB_B, i) not in neigh_a                # no B VM ever answered
    assert "10.64.0.12 " not in neigh_a or "lladdr" not in neigh_a.split("10.64.0.12 ")[1] \
        .splitlines()[0]
    neigh_b = rig.ip("b1", "neigh", "show", "dev", "eth0").stdout
    assert mac_for(JOB_B, 1) in neigh_b and mac_for(JOB_A, 1) not in neigh_b


def _forge(rig, sender: str, to: str, tag: str, via_vm: bool = False) -> None:
    """Send a VXLAN packet with job A's VNI whose inner frame goes to a2's UDP port, from
    namespace ``sender`` to underlay address ``to``."""
    frame = vxlan_frame(JOB_A, mac_for(JOB_A, 1), "10.64.0.10", "10.64.0.11", VICTIM_PORT,
                        tag.encode())
    assert rig.agent_run(sender, "send-udp", to, "4789", frame.hex()) == "sent"


def _received(path, wait: float = 1.0) -> str:
    time.sleep(wait)
    return path.read_text() if path.exists() else ""


def test_forged_vxlan_from_anything_but_the_jobs_peers_reaches_nothing(rig, tmp_path):
    got = tmp_path / "victim"
    rig.agent_start("a2", "serve-udp", str(VICTIM_PORT), str(got))
    # control: the same forged bytes from a peer of job A on n2 (n1) are delivered: the probe works
    _forge(rig, "n1", NODE_ADDR["n2"], "from-peer")
    assert "from-peer" in _received(got)
    # n3 is a node of the cluster (and of job B) but not of job A
    _forge(rig, "n3", NODE_ADDR["n2"], "from-n3")
    # job B's VM on n1, through n1's NAT (with n1's address, a peer of A, were it let out)
    plain = tmp_path / "plain"
    rig.agent_start("n2", "serve-udp", str(PLAIN_PORT), str(plain))
    assert rig.agent_run("b1", "send-udp", NODE_ADDR["n2"], str(PLAIN_PORT),
                         b"via-nat".hex()) == "sent"
    assert f"{NODE_ADDR['n1']} via-nat" in _received(plain, 0.5)      # the NAT path works
    _forge(rig, "b1", NODE_ADDR["n2"], "nat-to-n2")
    # job B's VM to its own node's underlay address (n1 also holds job A's VM a1)
    got1 = tmp_path / "victim-a1"
    rig.agent_start("a1", "serve-udp", str(VICTIM_PORT), str(got1))
    frame = vxlan_frame(JOB_A, mac_for(JOB_A, 0), "10.64.0.11", "10.64.0.10", VICTIM_PORT,
                        b"nat-to-n1")
    assert rig.agent_run("b1", "send-udp", NODE_ADDR["n1"], "4789", frame.hex()) == "sent"
    seen = _received(got) + _received(got1, 0.2)
    assert "from-n3" not in seen and "nat-to-n2" not in seen and "nat-to-n1" not in seen
    counters = rig.run("n2", "nft", "list", "table", "inet", "dgxvm-jobnet").stdout
    assert "job-101" in counters


def test_a_vni_whose_devices_are_another_jobs_is_refused(rig):
    other = JOB_A + VNI_MAX                     # wraps onto job A's VNI
    fab = plan(CFG, other, "n[1-2]", "n1")
    assert fab.vni == JOB_A
    rc, out = rig.jobnet("n1", "apply", fab.to_dict())
    assert rc == 3 and "JobFabricError" in out
    assert f"vxj{JOB_A} exists for job {JOB_A}" in out or f"brj{JOB_A} exists for job {JOB_A}" in out
    # job A's fabric is untouched
    assert rig.agent_run("a1", "tcp", "10.64.0.11", str(TCP_PORT)) == "a2"


def test_apply_checks_the_nodes_underlay_address_and_makes_a_jobs_fabric_again(rig):
    # n1's fabric applied in n3's namespace: 192.168.214.11 is not n3's
    rc, out = rig.jobnet("n3", "apply", plan(CFG, 303, "n[1-2]", "n1").to_dict())
    assert rc == 3 and "192.168.214.11 of node n1" in out and "not an address" in out
    assert "vxj303" not in rig.ip("n3", "-o", "link", "show").stdout
    # a Prolog run twice: job A's own fabric made again on n2, its VM put back in the bridge
    fab = rig.fabs[JOB_A, "n2"]
    assert rig.jobnet("n2", "apply", fab.to_dict()) == (0, "null")
    rig.ip("n2", "link", "set", "va2", "master", fab.bridge, "up")
    assert rig.agent_run("a1", "tcp", "10.64.0.11", str(TCP_PORT)) == "a2"


def test_teardown_leaves_nothing_of_either_job(rig):
    # runs last in this module (pytest keeps file order)
    for (job, node), fab in sorted(rig.fabs.items()):
        rc, out = rig.jobnet(node, "teardown", fab.vni)
        assert (rc, out) == (0, "true"), (job, node)
    for node in ("n1", "n2", "n3"):
        rc, out = rig.jobnet(node, "teardown", JOB_A)
        assert (rc, out) == (0, "false")                      # idempotent
        links = rig.ip(node, "-o", "link", "show").stdout
        assert "vxj" not in links and "brj" not in links
        assert "vxj" not in rig.run(node, "bridge", "fdb", "show").stdout
        ruleset = rig.run(node, "nft", "list", "ruleset").stdout
        assert "job-" not in ruleset and "dgxvm-job=" not in ruleset
        assert rig.jobnet(node, "present", None) == (0, "{}")
