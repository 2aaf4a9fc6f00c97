"""jobnet.apply: the ip, bridge and nft scripts a job's fabric is made and removed with
(rendered by pure functions), and how apply() runs them: one process per tool, in order; what it
made removed when a step fails; a VNI whose devices belong to another job refused.

The kernel's side (the devices, the guard against forged VXLAN) is
tests/integration/test_jobnet_kernel.py."""

from __future__ import annotations

import json
import subprocess

import pytest

from slurm_dgxvm.config import JobnetConfig
from slurm_dgxvm.errors import JobFabricError
from slurm_dgxvm.jobnet import apply as jn
from slurm_dgxvm.jobnet.plan import plan

NODES = {"n1": "192.168.214.11", "n2": "192.168.214.12", "n3": "192.168.214.13"}
FAB = plan(JobnetConfig(enabled=True, nodes=NODES), 12345, "n[1-3]", "n2")


def test_the_ip_script_makes_the_vxlan_in_its_bridge_and_brings_them_up_last():
    lines = jn.ip_script(FAB).splitlines()
    assert lines == [
        "link add brj12345 mtu 1450 type bridge",
        "link set brj12345 addrgenmode none alias dgxvm-job=12345",
        "link add vxj12345 mtu 1450 type vxlan id 12345 local 192.168.214.12 dstport 4789 "
        "nolearning",
        "link set vxj12345 master brj12345 addrgenmode none alias dgxvm-job=12345",
        "link set vxj12345 up",
        "link set brj12345 up",
    ]
    assert not any(" addr " in ln or "address" in ln for ln in lines)   # no host address


def test_the_fdb_script_floods_to_each_peer_and_sends_each_vms_mac_to_its_node():
    assert jn.fdb_script(FAB).splitlines() == [
        "fdb append 00:00:00:00:00:00 dev vxj12345 dst 192.168.214.11",
        "fdb append 00:00:00:00:00:00 dev vxj12345 dst 192.168.214.13",
        "fdb add 02:00:30:39:00:00 dev vxj12345 dst 192.168.214.11",
        "fdb add 02:00:30:39:00:02 dev vxj12345 dst 192.168.214.13",
    ]


def test_the_guard_accepts_the_vni_from_the_jobs_peers_only():
    text = jn.guard_script(FAB)
    chain = text[text.index("table inet dgxvm-jobnet {"):]
    assert chain.splitlines() == [
        "table inet dgxvm-jobnet {",
        "  chain job-12345 {",
        '    comment "dgxvm-job=12345"',
        "    ip saddr { 192.168.214.11, 192.168.214.13 } accept",
        "    drop",
        "  }",
        "}",
        "add element inet dgxvm-jobnet vnis { 12345 : jump job-12345 }",
    ]


def test_the_guard_drops_every_other_vxlan_packet_and_everything_from_a_fabric_bridge():
    lines = jn.guard_script(FAB).splitlines()
    rules = [ln for ln in lines if ln.startswith("add rule")]
    assert rules == [
        'add rule inet dgxvm-jobnet input iifname "brj*" drop '
        'comment "the host takes nothing from a job fabric"',
        "add rule inet dgxvm-jobnet input udp dport 4789 @th,96,24 vmap @vnis "
        "comment \"VXLAN: the VNI's job chain\"",
        'add rule inet dgxvm-jobnet input udp dport 4789 drop comment "VXLAN of no job here"',
        'add rule inet dgxvm-jobnet forward iifname != "brj*" udp dport 4789 drop '
        'comment "VXLAN routed through this node (a guest behind NAT)"',
        'add rule arp dgxvm-jobnet input iifname "brj*" drop '
        'comment "the host answers no ARP on a job fabric"',
    ]
    # the base chains are flushed before their rules are added: applying twice never doubles
    assert lines.index("flush chain inet dgxvm-jobnet input") < lines.index(rules[0])
    assert "flush chain arp dgxvm-jobnet input" in lines


def test_the_guard_replaces_what_the_vni_had_in_the_same_transaction():
    lines = jn.guard_script(FAB).splitlines()
    removal = jn.removal_script(12345).splitlines()[1:]
    start = lines.index(removal[0], lines.index("flush chain inet dgxvm-jobnet forward"))
    assert lines[start:start + len(removal)] == removal
    assert start < lines.index("table inet dgxvm-jobnet {")


def test_the_removal_works_whether_or_not_the_vni_is_there():
    assert jn.removal_script(7).splitlines()[-5:] == [
        "add chain inet dgxvm-jobnet job-7",                        # so that the deletes
        "add element inet dgxvm-jobnet vnis { 7 : jump job-7 }",     # below always find them
        "delete element inet dgxvm-jobnet vnis { 7 }",
        "flush chain inet dgxvm-jobnet job-7",
        "delete chain inet dgxvm-jobnet job-7",
    ]
    for bad in (0, 2 ** 24, -1, "7"):
        with pytest.raises(ValueError):
            jn.removal_script(bad)


def test_the_port_is_the_configs():
    fab = plan(JobnetConfig(enabled=True, nodes=NODES, port=8472), 5, "n[1-2]", "n1")
    assert "dstport 8472" in jn.ip_script(fab)
    assert "udp dport 8472 drop" in jn.guard_script(fab) and "4789" not in jn.guard_script(fab)


# -- apply() and teardown() with the tools recorded ------------------------------------------------
class Host:
    """Stands in for the tools: records each run, fails the one named in ``fail``, keeps the
    set of links the scripts made."""

    def __init__(self, links=(), aliases=None, fail=None, table=True):
        self.links, self.aliases, self.fail, self.table = set(links), dict(aliases or {}), fail, table
        self.runs: list[tuple[str, str | None]] = []

    def links_now(self):
        return set(self.links)

    def run_tool(self, argv, *, timeout, error, input=None, check=True, **_):
        self.runs.append((" ".join(argv), input))
        if argv[0] == self.fail:
            raise error(f"{' '.join(argv)} failed (exit 1): Error: boom")
        if argv[:2] == ["ip", "-batch"]:
            for ln in (input or "").splitlines():
                if ln.startswith("link add "):
                    self.links.add(ln.split()[2])
        if argv[:3] == ["ip", "-force", "-batch"]:
            for ln in (input or "").splitlines():
                self.links.discard(ln.split()[2])
        if argv[:2] == ["ip", "-j"]:
            out = json.dumps([{"ifname": n, "ifalias": self.aliases.get(n)} for n in self.links])
            return subprocess.CompletedProcess(argv, 0, out, "")
        if argv[:3] == ["nft", "-j", "list"]:
            if not self.table:
                return subprocess.CompletedProcess(argv, 1, "", "Error: No such file or directory")
            return subprocess.CompletedProcess(argv, 0, '{"nftables": []}', "")
        return subprocess.CompletedProcess(argv, 0, "", "")


@pytest.fixture
def host(monkeypatch):
    h = Host()
    monkeypatch.setattr(jn, "run_tool", h.run_tool)
    monkeypatch.setattr(jn, "_links", h.links_now)
    monkeypatch.setattr(jn, "_disable_ipv6", lambda dev: None)
    monkeypatch.setattr(jn, "_is_local", lambda address: address == FAB.local)
    return h


def test_apply_runs_three_processes_with_the_rendered_scripts(host):
    jn.apply(FAB)
    assert host.runs == [("ip -batch -", jn.ip_script(FAB)),
                         ("bridge -batch -", jn.fdb_script(FAB)),
                         ("nft -f -", jn.guard_script(FAB))]
    assert host.links == {"vxj12345", "brj12345"}


@pytest.mark.parametrize("tool, step", [("bridge", "forwarding entries (bridge fdb)"),
                                        ("nft", "guard (nft)")])
def test_a_failed_step_removes_what_was_made_and_names_the_step(host, tool, step):
    host.fail = tool
    with pytest.raises(JobFabricError) as err:
        jn.apply(FAB)
    assert err.value.step == step and "Error: boom" in str(err.value)
    assert err.value.job == 12345 and err.value.vni == 12345 and err.value.exit_code == 3
    assert host.links == set()
    assert ("ip -force -batch -", "link del vxj12345\nlink del brj12345\n") in host.runs


def test_devices_of_another_job_with_the_vni_are_refused_untouched(host):
    host.links = {"vxj12345", "brj12345"}
    host.aliases = {"vxj12345": "dgxvm-job=16789560", "brj12345": "dgxvm-job=16789560"}
    with pytest.raises(JobFabricError) as err:
        jn.apply(FAB)
    assert err.value.step == "check"
    assert "vxj12345 exists for job 16789560" in str(err.value) or \
        "brj12345 exists for job 16789560" in str(err.value)
    assert host.links == {"vxj12345", "brj12345"}
    assert [r for r, _ in host.runs] == ["ip -j link show"]


def test_a_node_whose_underlay_address_is_not_its_own_is_refused(host):
    other = plan(JobnetConfig(enabled=True, nodes=NODES), 12345, "n[1-3]", "n1")
    with pytest.raises(JobFabricError) as err:
        jn.apply(other)
    assert err.value.step == "check"
    assert "192.168.214.11 of node n1 ([jobnet] nodes) is not an address of this host" in \
        str(err.value)
    assert host.runs == []


def test_a_device_that_is_not_dgxvms_is_refused(host):
    host.links = {"brj12345"}
    with pytest.raises(JobFabricError, match="brj12345 exists for something that is not"):
        jn.apply(FAB)
    assert host.links == {"brj12345"}


def test_the_same_jobs_devices_are_made_again(host):
    host.links = {"vxj12345", "brj12345"}
    host.aliases = {"vxj12345": "dgxvm-job=12345", "brj12345": "dgxvm-job=12345"}
    jn.apply(FAB)
    assert host.runs[1] == ("ip -force -batch -", "link del vxj12345\nlink del brj12345\n")
    assert host.runs[-1] == ("nft -f -", jn.guard_script(FAB))


def test_teardown_of_nothing_runs_no_ip_and_says_so(host):
    host.table = False
    assert jn.teardown(12345) is False
    assert [r for r, _ in host.runs] == ["nft -j list table inet dgxvm-jobnet"]
