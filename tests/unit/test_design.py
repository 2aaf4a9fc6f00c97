"""The domain design and its XML: golden files per machine and VM size (compared by structure),
libvirt's schema (virt-xml-validate), and libvirt itself (the test:///default driver).

Regenerate the golden files after an intended change with DGXVM_REGEN_GOLDEN=1.
"""

from __future__ import annotations

import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import libvirt
import pytest

from slurm_dgxvm.design import (FabricNic, RealHost, VmInputs, design, domain_xml, fit_to_host,
                                image_cache_tag, mac_for, share_tag)
from slurm_dgxvm.placement import EMPTY, Policy, Request, place
from slurm_dgxvm.ranges import format_index_list
from slurm_dgxvm.topology import SysfsRoot, discover

GOLDEN = Path(__file__).parent.parent / "golden" / "domains"
NS = {"dgxvm": "https://slurm-dgxvm.invalid/xmlns/vm/1"}
SIZES = {"dgx2": (1, 2, 4, 8, 16), "dgx-a100": (1, 2, 4, 8), "dgx-h100": (1, 2, 4, 8)}
CASES = [(m, n) for m, sizes in SIZES.items() for n in sizes]

IMAGE = SimpleNamespace(name="testguest", version="0123456789ab", path="/images/t/disk.qcow2",
                        format="qcow2", kernel="/images/t/vmlinuz", initrd="/images/t/initrd.img",
                        cmdline="console=ttyS0 root=/dev/vda rw")


def vm_inputs(name="vm1", workdir="/home/alice/run", share="virtiofs", data=False,
              address="10.213.0.7", image_cache=None, fabric=None):
    d = f"/var/lib/dgxvm/vms/{name}"
    return VmInputs(name=name, uuid="6f1d7d3c-0000-4000-8000-000000000001", owner="job",
                    job_id=4242, user="alice", os_disk=f"{d}/os.qcow2", seed=f"{d}/seed.iso",
                    data_disk=f"{d}/data.qcow2" if data else None, console_log=f"{d}/console.log",
                    network="dgxvm", mac=mac_for(name), share=share, workdir=workdir,
                    share_binary=f"{d}/virtiofsd", address=address, image_cache=image_cache,
                    image_cache_binary=f"{d}/virtiofsd-images" if image_cache else None,
                    fabric=fabric)


def spec_for(host, count, ib="none", **kw):
    p = place(host, EMPTY, Request(count=count, ib=ib), Policy())
    return p, design(host, p, IMAGE, vm_inputs(**kw), domain_type="kvm")


def canonical(xml: str) -> str:
    return ET.canonicalize(xml, strip_text=True)


@pytest.fixture(scope="module")
def hosts(trees):
    return {m: discover(SysfsRoot(str(trees[m]))) for m in SIZES}


@pytest.fixture(scope="module")
def conn():
    c = libvirt.open("test:///default")
    yield c
    c.close()


def validated_xml(spec, tmp_path) -> str:
    """The domain XML of ``spec``, checked against libvirt's schema (virt-xml-validate)."""
    xml = domain_xml(spec)
    f = tmp_path / "dom.xml"
    f.write_text(xml)
    r = subprocess.run(["virt-xml-validate", str(f), "domain"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr + r.stdout
    return xml


# InfiniBand beside the GPUs (a partition's ib): a VF per GPU on every size of the machines with
# SR-IOV HCAs, and whole ports once
IB_CASES = ([(m, n, "vf") for m in ("dgx-a100", "dgx-h100") for n in SIZES[m]]
            + [("dgx-a100", 2, "port"), ("dgx-h100", 8, "port")])


@pytest.mark.parametrize("machine,count,ib", [(m, n, "none") for m, n in CASES] + IB_CASES)
def test_domain_matches_golden_file(hosts, machine, count, ib):
    _, spec = spec_for(hosts[machine], count, ib=ib)
    xml = domain_xml(spec)
    golden = GOLDEN / (f"{machine}-{count}gpu.xml" if ib == "none"
                       else f"{machine}-{count}gpu-ib-{ib}.xml")
    if os.environ.get("DGXVM_REGEN_GOLDEN"):
        golden.write_text(xml)
    assert canonical(xml) == canonical(golden.read_text())


def test_the_nic_is_isolated_and_pinned_to_its_mac_and_reserved_address(hosts):
    """The job's user is root in the guest: its NIC's bridge port is isolated (no other guest
    at layer 2) and clean-traffic holds it to its MAC and the address dgxvm reserved for it."""
    _, spec = spec_for(hosts["dgx2"], 4, address="10.213.0.9")
    nic = ET.fromstring(domain_xml(spec)).find("./devices/interface")
    assert nic.find("port").get("isolated") == "yes"
    assert nic.find("mac").get("address") == mac_for("vm1")
    ref = nic.find("filterref")
    assert ref.get("filter") == "clean-traffic"
    assert [(p.get("name"), p.get("value")) for p in ref] == [("IP", "10.213.0.9")]
    # without an address (no reservation) the filter stays; libvirt then learns the IP
    _, spec = spec_for(hosts["dgx2"], 4, address=None)
    nic = ET.fromstring(domain_xml(spec)).find("./devices/interface")
    assert nic.find("filterref").get("filter") == "clean-traffic"
    assert list(nic.find("filterref")) == [] and nic.find("port").get("isolated") == "yes"


FABRIC_NIC = FabricNic(bridge="brj4242", mac="0a:de:00:00:10:92", mtu=1450, address="10.64.0.11")


def test_a_multi_node_job_gets_a_second_nic_on_its_fabric_bridge(hosts, tmp_path, conn):
    """After the management NIC (the guest's eth0 stays it): a NIC on the job's bridge with
    the job's MTU, its port isolated, clean-traffic pinning it to its MAC and fabric address.
    It validates against libvirt's schema and defines; without a fabric there is one NIC."""
    _, spec = spec_for(hosts["dgx-h100"], 8, fabric=FABRIC_NIC, name="v-fabric")
    xml = validated_xml(spec, tmp_path)
    mgmt, fab = ET.fromstring(xml).findall("./devices/interface")
    assert mgmt.get("type") == "network" and mgmt.find("source").get("network") == "dgxvm"
    assert fab.get("type") == "bridge" and fab.find("source").get("bridge") == "brj4242"
    assert fab.find("mac").get("address") == "0a:de:00:00:10:92"
    assert fab.find("mtu").get("size") == "1450" and mgmt.find("mtu") is None
    assert fab.find("port").get("isolated") == "yes"
    ref = fab.find("filterref")
    assert ref.get("filter") == "clean-traffic"
    assert [(p.get("name"), p.get("value")) for p in ref] == [("IP", "10.64.0.11")]
    dom = conn.defineXML(xml)
    try:
        defined = ET.fromstring(dom.XMLDesc()).findall("./devices/interface")
        assert [i.get("type") for i in defined] == ["network", "bridge"]
    finally:
        dom.undefine()
    fitted, _ = fit_to_host(spec, RealHost(cpus=(0, 1), numa_nodes=(0,), hugepages_kib=()),
                            max_vcpus=2, max_memory_mib=512)
    assert [i.bridge for i in fitted.interfaces] == [None, "brj4242"]
    _, plain = spec_for(hosts["dgx-h100"], 8)
    assert len(ET.fromstring(domain_xml(plain)).findall("./devices/interface")) == 1


@pytest.mark.parametrize("machine,count", CASES)
def test_domain_validates_and_defines_on_libvirt(hosts, machine, count, tmp_path, conn):
    _, spec = spec_for(hosts[machine], count, name=f"v-{machine}-{count}")
    for s in (spec, fit_to_host(spec, RealHost(cpus=(0, 1), numa_nodes=(0,), hugepages_kib=()),
                                max_vcpus=2, max_memory_mib=512)[0]):
        xml = validated_xml(s, tmp_path)
        dom = conn.defineXML(xml)
        try:
            assert dom.name() == s.name
            defined = ET.fromstring(dom.XMLDesc())
            assert len(defined.findall("./devices/hostdev")) == len(s.hostdevs)
        finally:
            dom.undefine()


@pytest.mark.parametrize("machine,count,ib", IB_CASES)
def test_ib_domain_validates_defines_and_fits_without_its_hcas(hosts, machine, count, ib,
                                                               tmp_path, conn):
    _, spec = spec_for(hosts[machine], count, ib=ib, name=f"ib-{machine}-{count}-{ib}")
    fitted, changes = fit_to_host(spec, RealHost(cpus=(0, 1), numa_nodes=(0,), hugepages_kib=()),
                                  max_vcpus=2, max_memory_mib=512)
    ibs = [h.pci for h in spec.hostdevs if h.kind.startswith("ib-")]
    assert ibs and fitted.hostdevs == ()
    assert f"{len(ibs)} InfiniBand function(s) {', '.join(ibs)}" in changes[0]
    for s in (spec, fitted):
        dom = conn.defineXML(validated_xml(s, tmp_path))
        try:
            defined = ET.fromstring(dom.XMLDesc())
            assert len(defined.findall("./devices/hostdev")) == len(s.hostdevs)
        finally:
            dom.undefine()


def _guest_layout(spec):
    """{host PCI address: (guest NUMA cell, kind, the upstream switch port above it or None)},
    walking from each device's port up through switch and root port to the expander."""
    parent = {p.index: p.bus for p in (*spec.root_ports, *spec.switch_ports)}
    upstream = {p.index for p in spec.switch_ports if p.upstream}
    cell_of = {x.index: x.cell for x in spec.expanders}
    out = {}
    for h in spec.hostdevs:
        at, switch = h.bus, None
        while at not in cell_of:
            switch = at if at in upstream else switch
            at = parent[at]
        out[h.pci] = (cell_of[at], h.kind, switch)
    return out


def test_each_h100_gpu_gets_a_vf_of_its_own_hca_in_its_guest_cell(hosts):
    """H100UG table 6: GPU i <-> OSFP HCA at GPU bus - 3; the VF sits on the root port after its
    GPU's, behind the same expander (same guest NUMA cell)."""
    host = hosts["dgx-h100"]
    p, spec = spec_for(host, 8, ib="vf")
    hca_bus = dict(zip("1b 43 52 61 9d c3 d1 df".split(), "18 40 4f 5e 9a c0 ce dc".split()))
    assert [(f.gpu, f.hca, f.pci, f.vf) for f in p.ib] == [
        (i, f"0000:{hca_bus[g.pci[5:7]]}:00.0", f"0000:{hca_bus[g.pci[5:7]]}:00.1", 0)
        for i, g in enumerate(host.gpus)]
    layout = _guest_layout(spec)
    for f in p.ib:
        cell, kind, switch = layout[host.gpu(f.gpu).pci]
        assert kind == "gpu" and switch is not None
        assert layout[f.pci] == (cell, "ib-vf", switch)     # one switch: GPU and its VF only
    assert len({sw for _, _, sw in layout.values()}) == 8
    xml = ET.fromstring(domain_xml(spec))
    sources = [h.find("source/address").attrib for h in xml.findall("./devices/hostdev")]
    assert {"domain": "0x0000", "bus": "0x18", "slot": "0x00", "function": "0x1"} in sources


def test_a100_gpu_pair_gets_the_two_hcas_of_its_switch_complex(hosts):
    """GDS: mlx5_0 (0c) with GPU 0f, mlx5_1 (12) with GPU 07."""
    p, spec = spec_for(hosts["dgx-a100"], 2, ib="port")
    assert [(f.gpu, f.pci, f.vf) for f in p.ib] == [(0, "0000:12:00.0", None),
                                                   (1, "0000:0c:00.0", None)]
    layout = _guest_layout(spec)
    assert layout["0000:12:00.0"][1:] == ("ib-port", layout["0000:07:00.0"][2])
    assert layout["0000:0c:00.0"][1:] == ("ib-port", layout["0000:0f:00.0"][2])


def test_no_ib_by_default_keeps_the_domain_of_before(hosts):
    p, spec = spec_for(hosts["dgx-h100"], 4)
    assert p.ib == () and all(h.kind == "gpu" for h in spec.hostdevs)


def test_dgx2_four_gpus_pins_to_one_node_with_its_nvswitches(hosts):
    host = hosts["dgx2"]
    p, spec = spec_for(host, 4)
    root = ET.fromstring(domain_xml(spec))
    node = p.numa_nodes[0]
    node_cpus = set(host.node(node).cpus)
    pins = root.findall("./cputune/vcpupin")
    assert len(pins) == p.vcpus == int(root.findtext("vcpu"))
    assert {int(x.get("cpuset")) for x in pins} == set(p.cpus) <= node_cpus
    emul = root.find("./cputune/emulatorpin").get("cpuset")
    assert emul == format_index_list(p.emulator_cpus)
    assert not set(p.emulator_cpus) & set(p.cpus)     # QEMU's threads never share a vCPU core
    assert root.find("./numatune/memory").attrib == {"mode": "strict", "nodeset": str(node)}
    hostdevs = root.findall("./devices/hostdev")
    assert all(h.attrib == {"mode": "subsystem", "type": "pci", "managed": "yes"} for h in hostdevs)
    srcs = [h.find("./source/address") for h in hostdevs]
    got = {f"{a.get('domain')[2:]}:{a.get('bus')[2:]}:{a.get('slot')[2:]}.{a.get('function')[2:]}"
           for a in srcs}
    assert got == set(p.gpu_pcis) | set(p.nvswitches)
    assert len(p.nvswitches) == 3
    page = root.find("./memoryBacking/hugepages/page")
    assert page.get("size") == "1048576"
    # the GPUs sit behind a pxb-pcie bound to guest NUMA cell 0
    pxb = root.find("./devices/controller[@model='pcie-expander-bus']")
    assert pxb.find("./target/node").text == "0"


def test_block_spanning_two_nodes_gets_two_guest_cells_and_expanders(hosts):
    host = hosts["dgx-a100"]
    p, spec = spec_for(host, 4)
    assert len(p.cells) == 2   # A100 4-GPU blocks span NUMA nodes 1 and 3 (NPS4)
    root = ET.fromstring(domain_xml(spec))
    cells = root.findall("./cpu/numa/cell")
    assert len(cells) == 2
    memnodes = {m.get("cellid"): m.get("nodeset") for m in root.findall("./numatune/memnode")}
    assert memnodes == {"0": str(p.cells[0].host_node), "1": str(p.cells[1].host_node)}
    pxbs = root.findall("./devices/controller[@model='pcie-expander-bus']")
    assert sorted(x.find("./target/node").text for x in pxbs) == ["0", "1"]
    # every GPU hangs off a root port whose parent is the pxb of its own cell
    ports = {c.get("index"): c.find("./address").get("bus")
             for c in root.findall("./devices/controller[@model='pcie-root-port']")}
    pxb_cell = {f"0x{int(x.get('index')):02x}": x.find("./target/node").text for x in pxbs}
    for cell, c in enumerate(p.cells):
        for gi in c.gpus:
            h = root.find(f"./devices/hostdev/alias[@name='ua-gpu{gi}']/..")
            port = str(int(h.find("./address").get("bus"), 16))
            assert pxb_cell[ports[port]] == str(cell)


def test_h100_shared_nvswitch_passes_gpus_only(hosts):
    p, spec = spec_for(hosts["dgx-h100"], 8)
    assert p.fm_partition is not None
    assert {h.kind for h in spec.hostdevs} == {"gpu"}


def test_metadata_names_the_job_and_gpus(hosts):
    p, spec = spec_for(hosts["dgx2"], 2)
    root = ET.fromstring(domain_xml(spec))
    vm = root.find("./metadata/dgxvm:vm", NS)
    assert vm.findtext("dgxvm:job", namespaces=NS) == "4242"
    assert vm.findtext("dgxvm:user", namespaces=NS) == "alice"
    assert vm.find("dgxvm:image", NS).attrib == {"name": "testguest", "version": "0123456789ab"}


def test_workdir_is_shared_with_virtiofs_and_shared_memory(hosts):
    _, spec = spec_for(hosts["dgx2"], 1, workdir="/scratch/alice")
    root = ET.fromstring(domain_xml(spec))
    fs = root.find("./devices/filesystem")
    assert fs.find("driver").get("type") == "virtiofs"
    assert fs.find("source").get("dir") == "/scratch/alice"
    assert root.find("./memoryBacking/access").get("mode") == "shared"
    # served by dgxvm's per-VM wrapper (virtiofsd as the job's user), never libvirt's root one
    assert fs.find("binary").get("path") == "/var/lib/dgxvm/vms/vm1/virtiofsd"
    _, none = spec_for(hosts["dgx2"], 1, share="none")
    assert ET.fromstring(domain_xml(none)).find("./devices/filesystem") is None


CACHE = "/var/lib/dgxvm/containers/4242"


def filesystems(spec) -> list[tuple[str, str, str]]:
    return [(fs.find("source").get("dir"), fs.find("target").get("dir"),
             fs.find("binary").get("path"))
            for fs in ET.fromstring(domain_xml(spec)).findall("./devices/filesystem")]


def test_the_image_cache_is_a_second_filesystem_with_its_own_virtiofsd(hosts):
    d = "/var/lib/dgxvm/vms/vm1"
    _, spec = spec_for(hosts["dgx2"], 1, workdir="/scratch/alice", image_cache=CACHE)
    assert filesystems(spec) == [("/scratch/alice", share_tag("/scratch/alice"), f"{d}/virtiofsd"),
                                 (CACHE, image_cache_tag(CACHE), f"{d}/virtiofsd-images")]
    assert share_tag(CACHE) != image_cache_tag(CACHE)
    assert spec.memory_shared
    # without a work dir share the cache is still shared (and memory still shared for it)
    _, alone = spec_for(hosts["dgx2"], 1, workdir=None, image_cache=CACHE)
    assert filesystems(alone) == [(CACHE, image_cache_tag(CACHE), f"{d}/virtiofsd-images")]
    root = ET.fromstring(domain_xml(alone))
    assert root.find("./memoryBacking/access").get("mode") == "shared"
    # vm.share = "none": neither
    _, none = spec_for(hosts["dgx2"], 1, share="none", image_cache=CACHE)
    assert filesystems(none) == [] and not none.memory_shared
    # no cache: the domain of before, byte for byte (the golden files hold it)
    _, before = spec_for(hosts["dgx2"], 1)
    assert len(filesystems(before)) == 1


def test_two_filesystems_validate_and_define_on_libvirt(hosts, tmp_path, conn):
    _, spec = spec_for(hosts["dgx2"], 2, name="v-two-fs", image_cache=CACHE)
    xml = validated_xml(spec, tmp_path)
    dom = conn.defineXML(xml)
    try:
        defined = ET.fromstring(dom.XMLDesc())
        assert [fs.find("source").get("dir") for fs in defined.findall("./devices/filesystem")] \
            == ["/home/alice/run", CACHE]
    finally:
        dom.undefine()


@pytest.mark.parametrize("hostile", [
    '/home/a"b/<x>&y', "/home/x'/]]>", "/tmp/</source><hostdev/>",
])
def test_hostile_strings_cannot_change_the_document(hosts, hostile):
    p = place(hosts["dgx2"], EMPTY, Request(count=1), Policy())
    img = SimpleNamespace(**{**IMAGE.__dict__, "cmdline": hostile + " </cmdline><x/>"})
    spec = design(hosts["dgx2"], p, img, vm_inputs(workdir=hostile), domain_type="kvm")
    root = ET.fromstring(domain_xml(spec))
    assert root.find("./devices/filesystem/source").get("dir") == hostile
    assert root.findtext("./os/cmdline") == hostile + " </cmdline><x/>"
    assert root.find("./x") is None and root.find("./os/x") is None
    assert len(root.findall("./devices/hostdev")) == 1


def test_fit_to_host_lists_every_change(hosts):
    _, spec = spec_for(hosts["dgx2"], 16)
    fitted, changes = fit_to_host(spec, RealHost(cpus=(0, 1), numa_nodes=(0,), hugepages_kib=()),
                                  max_vcpus=2, max_memory_mib=512)
    text = "\n".join(changes)
    assert "16 GPU(s)" in text and "12 NVSwitch(es)" in text
    assert "vCPUs 92 in 2 guest NUMA cell(s) -> 2 in 1" in text
    assert "hugepages" in text and "numatune" in text and "memory" in text
    assert fitted.hostdevs == () and fitted.expanders == () and fitted.pcihole64_gib is None
    assert fitted.vcpus == 2 and fitted.memory_mib == 512 and fitted.hugepage_kib is None
    assert {c for p in fitted.vcpupins for c in p.cpus} <= {0, 1}
    assert fitted.memory_source == "memfd"       # virtiofs still has shared memory
    assert fitted.metadata.fitted == changes
    root = ET.fromstring(domain_xml(fitted))
    assert [e.text for e in root.findall("./metadata/dgxvm:vm/dgxvm:fitted", NS)] == list(changes)


def test_fit_to_a_host_that_has_everything_changes_nothing(hosts):
    host = hosts["dgx2"]
    p, spec = spec_for(host, 1)
    real = RealHost(cpus=tuple(range(96)), numa_nodes=(0, 1), hugepages_kib=(1048576,))
    s = spec
    s = s.__class__(**{**s.__dict__, "hostdevs": ()})  # passthrough already absent
    fitted, changes = fit_to_host(s, real, max_vcpus=1000, max_memory_mib=10 ** 9)
    assert changes == ()
    assert fitted.vcpupins == s.vcpupins and fitted.numa_nodes == s.numa_nodes




def test_real_host_probe_reads_through_the_sysfs_root_it_is_given(tmp_path):
    from slurm_dgxvm.topology.sysfs import SysfsRoot
    pools = tmp_path / "sys/kernel/mm/hugepages"
    for size, free in (("2048kB", "3"), ("1048576kB", "0")):
        (pools / f"hugepages-{size}").mkdir(parents=True)
        (pools / f"hugepages-{size}" / "free_hugepages").write_text(free + "\n")
    (tmp_path / "sys/devices/system/node").mkdir(parents=True)
    (tmp_path / "sys/devices/system/node/online").write_text("0-1\n")
    real = RealHost.probe(SysfsRoot(tmp_path))
    assert (real.numa_nodes, real.hugepages_kib) == ((0, 1), (2048,))
    bare = RealHost.probe(SysfsRoot(tmp_path / "sys/kernel/mm/hugepages/hugepages-2048kB"))
    assert (bare.numa_nodes, bare.hugepages_kib) == ((0,), ())    # nothing there: one node, none
