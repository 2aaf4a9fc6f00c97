"""jobnet.plan: a multi-node job's fabric on one node, planned from the config and the job's
nodelist alone (pure): the VNI, the devices, the peers, the addresses and MACs every node
computes alike, and the refusals of a nodelist the node will not use."""

from __future__ import annotations

import ipaddress
import json

import pytest

from slurm_dgxvm.config import JobnetConfig
from slurm_dgxvm.errors import ConfigError, JobInputError
from slurm_dgxvm.jobnet.plan import (VNI_MAX, VXLAN_OVERHEAD, JobFabric, Peer, mac_for, plan,
                                     vni_for)

NODES = {f"dgx{i:02d}": f"192.168.50.{10 + i}" for i in range(1, 9)}
CFG = JobnetConfig(enabled=True, nodes=NODES)


def test_the_vni_is_the_job_id_until_it_wraps():
    assert vni_for(1) == 1 and vni_for(12345) == 12345 and vni_for(VNI_MAX) == VNI_MAX
    assert vni_for(VNI_MAX + 1) == 1 and vni_for(VNI_MAX + 12345) == 12345
    assert vni_for(67043328) == vni_for(67043328)          # Slurm's default MaxJobId
    for job in (1, 2, 999, VNI_MAX, VNI_MAX + 1, 2 ** 32 - 1, 2 ** 40):
        assert 1 <= vni_for(job) <= VNI_MAX


@pytest.mark.parametrize("job", [0, -1, True, "7", 1.0])
def test_a_job_id_that_is_not_one_has_no_vni(job):
    with pytest.raises(ValueError):
        vni_for(job)


def test_a_two_node_job_on_its_second_node():
    fab = plan(CFG, 12345, "dgx[01-02]", "dgx02")
    assert fab.vni == 12345 and fab.index == 1 and fab.nodes == ("dgx01", "dgx02")
    assert (fab.vxlan, fab.bridge) == ("vxj12345", "brj12345")
    assert fab.local == "192.168.50.12"
    assert fab.peers == (Peer("dgx01", "192.168.50.11"),)
    assert fab.mtu == 1500 - VXLAN_OVERHEAD == 1450 and fab.port == 4789
    assert fab.vm_address == ipaddress.IPv4Interface("10.64.0.11/16")
    assert fab.mac == "02:00:30:39:00:01"
    assert fab.hosts == (("dgx01", "10.64.0.10"), ("dgx02", "10.64.0.11"))


def test_every_node_of_a_job_plans_the_same_picture():
    nodelist = "dgx[03,01,05-06]"
    fabs = [plan(CFG, 77, nodelist, n) for n in ("dgx03", "dgx01", "dgx05", "dgx06")]
    assert [f.index for f in fabs] == [0, 1, 2, 3]                  # nodelist order
    assert len({f.hosts for f in fabs}) == 1 and len({f.vni for f in fabs}) == 1
    # each node's VM address is the one the others' /etc/hosts give it
    for f in fabs:
        assert dict(f.hosts)[f.node] == str(f.vm_address.ip)
        assert [p.node for p in f.peers] == [n for n in f.nodes if n != f.node]
        assert f.local == NODES[f.node]
    assert len({f.mac for f in fabs}) == 4


def test_addresses_are_unique_inside_the_subnet_and_never_end_in_0_or_255():
    cfg = JobnetConfig(enabled=True, nodes={f"n{i}": f"10.1.{i // 250}.{i % 250 + 1}"
                                            for i in range(1024)})
    fab = plan(cfg, 5, "n[0-1023]", "n0")
    addrs = [fab.address(i) for i in range(1024)]
    assert len({a.ip for a in addrs}) == 1024
    subnet = ipaddress.IPv4Network("10.64.0.0/16")
    for a in addrs:
        assert a.network == subnet and a.ip not in (subnet.network_address,
                                                    subnet.broadcast_address)
        assert a.ip.packed[3] not in (0, 255)
    assert str(addrs[0].ip) == "10.64.0.10" and str(addrs[244].ip) == "10.64.0.254"
    assert str(addrs[245].ip) == "10.64.1.1"
    assert [fab.address(i) for i in range(1024)] == addrs                 # deterministic
    with pytest.raises(ValueError):
        fab.address(1024)


def test_two_jobs_on_the_same_nodes_get_the_same_addresses_and_different_vnis():
    a, b = plan(CFG, 100, "dgx[01-02]", "dgx01"), plan(CFG, 200, "dgx[01-02]", "dgx01")
    assert a.hosts == b.hosts and a.vm_address == b.vm_address
    assert a.vni != b.vni and a.vxlan != b.vxlan and a.mac != b.mac


@pytest.mark.parametrize("vni, index", [(1, 0), (12345, 1), (VNI_MAX, 1023), (0xABCDEF, 0xFFF)])
def test_the_mac_is_locally_administered_unicast(vni, index):
    fab = JobFabric(job_id=vni, vni=vni, node="a", index=0, nodes=("a",), local="10.0.0.1",
                    peers=(), vxlan=f"vxj{vni}", bridge=f"brj{vni}", mtu=1450, port=4789,
                    subnet=ipaddress.IPv4Network("10.64.0.0/16"))
    mac = mac_for(vni, index)
    first = int(mac.split(":")[0], 16)
    assert first & 0x02 and not first & 0x01
    assert int(mac.replace(":", ""), 16) & 0xFFFFFFFFFF == (vni << 16) | index
    assert fab.mac == mac_for(vni, 0)


def test_the_devices_fit_an_interface_name():
    fab = plan(CFG, VNI_MAX, "dgx[01-02]", "dgx01")
    assert len(fab.vxlan) <= 15 and len(fab.bridge) <= 15


def test_to_dict_is_json_and_reads_back():
    fab = plan(CFG, 4242, "dgx[01-03]", "dgx03")
    data = json.loads(json.dumps(fab.to_dict()))
    assert JobFabric.from_dict(data) == fab
    assert data["vm_address"] == "10.64.0.12/16" and data["mac"] == fab.mac
    assert data["hosts"][0] == ["dgx01", "10.64.0.10"]
    with pytest.raises(ValueError):
        JobFabric.from_dict({"job_id": 1})


def test_no_fabric_when_disabled_or_for_one_node():
    assert plan(JobnetConfig(nodes=NODES), 1, "dgx[01-02]", "dgx01") is None
    assert plan(JobnetConfig(nodes=NODES), 1, "garbage[", "dgx01") is None   # not even read
    assert plan(CFG, 1, "dgx01", "dgx01") is None


def test_the_config_mtu_port_and_subnet_are_used():
    cfg = JobnetConfig(enabled=True, nodes=NODES, underlay_mtu=9000, port=8472,
                       subnet="172.20.0.0/24", max_nodes=8)
    fab = plan(cfg, 9, "dgx[01-02]", "dgx01")
    assert fab.mtu == 8950 and fab.port == 8472
    assert fab.vm_address == ipaddress.IPv4Interface("172.20.0.10/24")


@pytest.mark.parametrize("nodelist, bad", [
    ("dgx[01-02", "not a Slurm hostlist"),
    ("dgx01,dgx99", "'dgx99' is not in [jobnet] nodes"),
    ("dgx[01-02],dgx01", "'dgx01' is listed twice"),
    ("dgx[02-03]", "this node 'dgx01' is not in it"),
    ("dgx01;reboot", "not a Slurm hostlist"),
    ("x" * 5000, "'" + "x" * 20),
])
def test_a_nodelist_the_node_will_not_use_is_the_jobs_fault(nodelist, bad):
    with pytest.raises(JobInputError) as err:
        plan(CFG, 1, nodelist, "dgx01")
    assert err.value.what == "SLURM_NODELIST" and err.value.value == nodelist
    assert bad in str(err.value)


def test_more_nodes_than_max_nodes_is_refused():
    cfg = JobnetConfig(enabled=True, nodes=NODES, max_nodes=3)
    with pytest.raises(JobInputError, match="4 nodes, more than .jobnet. max_nodes 3"):
        plan(cfg, 1, "dgx[01-04]", "dgx01")
    assert plan(cfg, 1, "dgx[01-03]", "dgx01").nodes == ("dgx01", "dgx02", "dgx03")


def test_a_node_without_an_underlay_address_is_the_configs_fault():
    with pytest.raises(ConfigError, match="'dgx09' has no underlay address"):
        plan(CFG, 1, "dgx[01-02]", "dgx09")
