"""The simulated DGX trees read back through SysfsRoot as the machines' sourced facts say."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from slurm_dgxvm.errors import SimulateError
from slurm_dgxvm.simulate import MACHINES, render
from slurm_dgxvm.simulate.machines import DGX2, DGX_A100, DGX_H100
from slurm_dgxvm.topology.sysfs import (
    NODE_CPULIST, SIMULATED_MARKER, SysfsRoot,
)


def _bdfs(*buses: int) -> list[str]:
    return [f"0000:{b:02x}:00.0" for b in buses]


GPUS = {
    "dgx2": _bdfs(0x34, 0x36, 0x39, 0x3b, 0x57, 0x59, 0x5c, 0x5e,
                  0xb7, 0xb9, 0xbc, 0xbe, 0xe0, 0xe2, 0xe5, 0xe7),
    "dgx-a100": _bdfs(0x07, 0x0f, 0x47, 0x4e, 0x87, 0x90, 0xb7, 0xbd),
    "dgx-h100": _bdfs(0x1b, 0x43, 0x52, 0x61, 0x9d, 0xc3, 0xd1, 0xdf),
}
GPU_IDS = {"dgx2": ("0x1db8", "0x12ab"), "dgx-a100": ("0x20b2", "0x1463"),
           "dgx-h100": ("0x2330", "0x16c1")}
NVSWITCHES = {
    "dgx2": _bdfs(0x61, 0x62, 0x63, 0x65, 0x66, 0x67, 0xc1, 0xc2, 0xc3, 0xc5, 0xc6, 0xc7),
    "dgx-a100": _bdfs(0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9),
    "dgx-h100": _bdfs(0x07, 0x08, 0x09, 0x0a),
}
NVSWITCH_DEVICE = {"dgx2": "0x1ac2", "dgx-a100": "0x1af1", "dgx-h100": "0x22a3"}
NODE_CPUS = {
    "dgx2": {0: "0-23,48-71", 1: "24-47,72-95"},
    "dgx-a100": {n: f"{16 * n}-{16 * n + 15},{128 + 16 * n}-{128 + 16 * n + 15}" for n in range(8)},
    "dgx-h100": {0: "0-55,112-167", 1: "56-111,168-223"},
}
NODE_MEM_GIB = {"dgx2": 768, "dgx-a100": 128, "dgx-h100": 1024}
PRODUCT = {"dgx2": "NVIDIA DGX-2", "dgx-a100": "DGXA100 920-23687-2531-001",
           "dgx-h100": "DGXH100"}
# compute NIC -> the GPUs it is paired with (shares a PCIe switch with)
NIC_GPUS = {
    "dgx2": {},   # filled below: one invented NIC per second-level switch
    "dgx-a100": {0x0c: (0x07, 0x0f), 0x12: (0x07, 0x0f), 0x4b: (0x47, 0x4e), 0x54: (0x47, 0x4e),
                 0x8d: (0x87, 0x90), 0x94: (0x87, 0x90), 0xba: (0xb7, 0xbd), 0xcc: (0xb7, 0xbd)},
    "dgx-h100": {0x18: (0x1b,), 0x40: (0x43,), 0x4f: (0x52,), 0x5e: (0x61,),
                 0x9a: (0x9d,), 0xc0: (0xc3,), 0xce: (0xd1,), 0xdc: (0xdf,)},
}
GPU_NUMA = {
    "dgx2": [0] * 8 + [1] * 8,
    "dgx-a100": [3, 3, 1, 1, 7, 7, 5, 5],
    "dgx-h100": [0] * 4 + [1] * 4,
}


def _to_cpus(cpulist: str) -> tuple[int, ...]:
    out = []
    for part in cpulist.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(out)


@pytest.fixture(scope="module", params=sorted(MACHINES))
def rendered(request, tmp_path_factory):
    key = request.param
    out = render(key, tmp_path_factory.mktemp(key) / "root")
    return key, SysfsRoot(out)


def _of_class(root: SysfsRoot, prefix: str) -> list[str]:
    return [b for b in root.pci_addresses() if root.pci_attr(b, "class").startswith(prefix)]


# -- facts per machine -----------------------------------------------------------------------------
def test_gpus_appear_at_the_sourced_addresses_with_their_ids(rendered):
    key, root = rendered
    gpus = _of_class(root, "0x0302")
    assert gpus == GPUS[key]
    for bdf in gpus:
        assert root.pci_attr(bdf, "vendor") == "0x10de"
        assert (root.pci_attr(bdf, "device"), root.pci_attr(bdf, "subsystem_device")) == GPU_IDS[key]
        assert root.pci_attr(bdf, "subsystem_vendor") == "0x10de"
        assert root.pci_attr(bdf, "class") == "0x030200"
        assert root.pci_link_name(bdf, "driver") == "vfio-pci"


def test_gpus_sit_on_their_sourced_numa_nodes_with_the_nodes_cpus(rendered):
    key, root = rendered
    for bdf, node in zip(GPUS[key], GPU_NUMA[key]):
        assert root.pci_attr(bdf, "numa_node") == str(node)
        assert root.pci_attr(bdf, "local_cpulist") == NODE_CPUS[key][node]


def test_nvswitches_appear_as_pci_endpoints(rendered):
    key, root = rendered
    switches = _of_class(root, "0x0680")
    assert switches == NVSWITCHES[key]
    assert {root.pci_attr(b, "device") for b in switches} == {NVSWITCH_DEVICE[key]}
    # a DGX-2's go into VMs; an A100's or H100's stay with Fabric Manager on the host
    want = "vfio-pci" if key == "dgx2" else "nvidia-nvswitch"
    assert {root.pci_link_name(b, "driver") for b in switches} == {want}


def test_numa_nodes_have_the_sourced_cpulists_memory_and_hugepage_pools(rendered):
    key, root = rendered
    assert root.node_ids() == tuple(NODE_CPUS[key])
    for node, cpulist in NODE_CPUS[key].items():
        assert root.read_cpulist(NODE_CPULIST, node=node) == tuple(sorted(_to_cpus(cpulist)))
        assert root.node_memtotal_kib(node) == NODE_MEM_GIB[key] * 1024 * 1024
        pools = root.node_hugepages(node)
        assert pools[2048] == (0, 0)
        nr, free = pools[1048576]
        assert nr == free == int(NODE_MEM_GIB[key] * 0.9)


def test_meminfo_uses_the_kernel_line_format(rendered):
    key, root = rendered
    text = root.read("sys/devices/system/node/node{node}/meminfo", node=0)
    total = NODE_MEM_GIB[key] * 1024 * 1024
    assert f"Node 0 MemTotal:       {total} kB" in text
    assert "Node 0 MemFree:" in text and "Node 0 MemUsed:" in text


def test_cpu_topology_numbers_hyperthreads_after_all_cores(rendered):
    key, root = rendered
    m = MACHINES[key]
    cores = m.total_cpus // 2
    assert root.read("sys/devices/system/cpu/online") == f"0-{m.total_cpus - 1}"
    for cpu in (0, 1, cores - 1, cores, m.total_cpus - 1):
        topo = f"sys/devices/system/cpu/cpu{cpu}/topology"
        core = cpu % cores
        assert root.read(f"{topo}/thread_siblings_list") == f"{core},{core + cores}"
        assert root.read(f"{topo}/core_cpus_list") == f"{core},{core + cores}"
        assert root.read_int(f"{topo}/physical_package_id") == core // (cores // 2)
        assert root.read_int(f"{topo}/core_id") == core % (cores // 2)


def test_every_compute_nic_shares_a_switch_with_its_gpus_only(rendered):
    key, root = rendered
    pairs = NIC_GPUS[key] or {g + 1: (g, g + 2) for g in
                              (0x34, 0x39, 0x57, 0x5c, 0xb7, 0xbc, 0xe0, 0xe5)}
    gpus = set(GPUS[key])
    for nic, paired in pairs.items():
        nic_bdf = f"0000:{nic:02x}:00.0"
        assert root.pci_attr(nic_bdf, "vendor") == "0x15b3"
        assert root.pci_attr(nic_bdf, "class") == "0x020700"
        assert root.pci_link_name(nic_bdf, "driver") == "mlx5_core"
        paired_bdfs = {f"0000:{g:02x}:00.0" for g in paired}
        # the bridges shared with each paired GPU, and with no other GPU
        shared = set(root.pci_upstream(nic_bdf))
        for g in paired_bdfs:
            shared &= set(root.pci_upstream(g))
        private = [b for b in shared
                   if all(b not in root.pci_upstream(o) for o in gpus - paired_bdfs)]
        assert private, f"{nic_bdf} shares no switch with {sorted(paired_bdfs)} alone"


def test_dmi_names_the_product_and_the_marker_says_simulated(rendered):
    key, root = rendered
    assert root.read("sys/class/dmi/id/product_name") == PRODUCT[key]
    assert root.read("sys/class/dmi/id/sys_vendor") == "NVIDIA"
    assert root.simulated() == {"machine": key, "product_name": PRODUCT[key], "missing_gpus": [],
                                "unknown_numa": [],
                                "note": "simulated by dgxvm simulate; not a real host"}


def test_each_device_has_its_own_iommu_group_numbered_in_bus_order(rendered):
    _, root = rendered
    addrs = root.pci_addresses()
    groups = [root.pci_link_name(b, "iommu_group") for b in addrs]
    assert groups == [str(i) for i in range(len(addrs))]
    for i, bdf in enumerate(addrs):
        assert root.listdir(f"sys/kernel/iommu_groups/{i}/devices") == [bdf]
        back = root.path(f"sys/kernel/iommu_groups/{i}/devices/{bdf}")
        assert os.path.realpath(back) == os.path.realpath(root.path("sys/bus/pci/devices/" + bdf))


def test_bridges_use_pcieport_and_storage_devices_their_drivers(rendered):
    key, root = rendered
    nvswitch = "vfio-pci" if key == "dgx2" else "nvidia-nvswitch"
    for bdf in root.pci_addresses():
        cls = root.pci_attr(bdf, "class")
        expected = {"0x0604": "pcieport", "0x0108": "nvme", "0x0200": "mlx5_core",
                    "0x0207": "mlx5_core", "0x0680": nvswitch}.get(cls[:6], "vfio-pci")
        if root.pci_link_name(bdf, "physfn") is not None:
            expected = "vfio-pci"          # an SR-IOV VF, ready for a VM
        assert root.pci_link_name(bdf, "driver") == expected
        assert root.path(f"sys/bus/pci/drivers/{expected}").is_dir()


def test_all_symlinks_are_relative_so_the_tree_can_move(rendered, tmp_path):
    _, root = rendered
    for dirpath, dirnames, filenames in os.walk(root.root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                assert not os.path.isabs(os.readlink(p)), p
    moved = tmp_path / "moved"
    shutil.copytree(root.root, moved, symlinks=True)
    again = SysfsRoot(moved)
    bdf = again.pci_addresses()[-1]
    assert again.pci_upstream(bdf) == root.pci_upstream(bdf)
    assert os.path.realpath(again.path("sys/bus/pci/devices/" + bdf)).startswith(str(moved))


# -- specific sourced facts ------------------------------------------------------------------------
def test_dgx2_gpu0_hangs_below_two_levels_of_switches(tmp_path):
    root = SysfsRoot(render("dgx2", tmp_path / "r"))
    # GDS lspci -tv: [0000:2b] 00.0-[2c-3b] 00.0-[2d-3b] +04.0-[32-36] 00.0-[33-36] +00.0-[34]
    assert root.pci_upstream("0000:34:00.0") == (
        "0000:2b:00.0", "0000:2c:00.0", "0000:2d:04.0", "0000:32:00.0", "0000:33:00.0")
    # the NVSwitches of baseboard A sit under root 4e beside GPUs 4-7
    assert root.pci_upstream("0000:61:00.0")[0] == "0000:4e:00.0"
    assert root.pci_upstream("0000:c7:00.0")[0] == "0000:ae:00.0"


def test_dgx2_has_two_ethernet_nics_on_socket_1():
    eth = [d for d in DGX2.devices if d.kind == "nic" and d.role == "ethernet"]
    assert len(eth) == 2
    assert {d.class_code for d in eth} == {0x020000}
    assert {DGX2.node(d.numa_node).socket for d in eth} == {1}


def test_dgx_a100_gpu0_follows_the_gds_switch_chain(tmp_path):
    root = SysfsRoot(render("dgx-a100", tmp_path / "r"))
    assert root.pci_upstream("0000:07:00.0")[1:] == (
        "0000:01:00.0", "0000:02:00.0", "0000:03:00.0", "0000:04:00.0", "0000:05:00.0",
        "0000:06:00.0")
    assert root.pci_upstream("0000:0f:00.0")[-3:] == ("0000:0b:10.0", "0000:0d:00.0", "0000:0e:00.0")
    assert root.pci_attr("0000:01:00.0", "vendor") == "0x1000"
    assert root.pci_attr("0000:01:00.0", "device") == "0xc010"
    for fn in ("0000:61:00.0", "0000:61:00.1"):
        assert root.pci_attr(fn, "subsystem_device") == "0x0009"
        assert root.pci_attr(fn, "numa_node") == "0"


def test_dgx_h100_storage_nics_sit_one_card_per_socket():
    storage = {d.bdf: d.numa_node for d in DGX_H100.devices if d.role == "storage"}
    assert storage == {"0000:29:00.0": 0, "0000:29:00.1": 0, "0000:aa:00.0": 1, "0000:aa:00.1": 1}


def test_descriptions_expose_gpus_in_nvidia_smi_order():
    for key, m in MACHINES.items():
        assert [g.bdf for g in m.gpus] == GPUS[key]
        assert [g.label for g in m.gpus] == [f"GPU{i}" for i in range(len(GPUS[key]))]
        assert len(m.compute_nics) == 8
    assert (DGX2.total_cpus, DGX_A100.total_cpus, DGX_H100.total_cpus) == (96, 256, 224)


# -- quirks ----------------------------------------------------------------------------------------
def test_a_missing_gpu_leaves_no_trace_in_the_tree(tmp_path):
    root = SysfsRoot(render("dgx-h100", tmp_path / "r", missing_gpus=["0000:43:00.0"]))
    assert "0000:43:00.0" not in root.pci_addresses()
    assert _of_class(root, "0x0302") == [g for g in GPUS["dgx-h100"] if g != "0000:43:00.0"]
    assert not list(root.root.rglob("0000:43:00.0"))
    assert "0000:42:00.0" in root.pci_addresses()     # the bridge above it still enumerates
    assert root.simulated()["missing_gpus"] == ["0000:43:00.0"]


def test_unknown_numa_reads_minus_one_but_keeps_local_cpulist(tmp_path):
    root = SysfsRoot(render("dgx-a100", tmp_path / "r", unknown_numa=["0000:47:00.0"]))
    assert root.pci_attr("0000:47:00.0", "numa_node") == "-1"
    assert root.pci_attr("0000:47:00.0", "local_cpulist") == "16-31,144-159"
    assert root.pci_attr("0000:4e:00.0", "numa_node") == "1"
    assert root.simulated()["unknown_numa"] == ["0000:47:00.0"]


def test_quirk_addresses_may_be_given_short_and_in_upper_case(tmp_path):
    root = SysfsRoot(render("dgx2", tmp_path / "r", missing_gpus=["B7:00.0"]))
    assert "0000:b7:00.0" not in root.pci_addresses()


# -- bad values ------------------------------------------------------------------------------------
def test_unknown_machine_is_refused_by_name(tmp_path):
    with pytest.raises(SimulateError, match="'dgx-b200'") as exc:
        render("dgx-b200", tmp_path / "r")
    assert exc.value.value == "dgx-b200"
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("bad", ["0000:35:00.0", "0000:61:00.0", "0000:ff:00.0", "gpu0"])
def test_missing_gpu_that_is_not_a_gpu_is_refused_by_name(tmp_path, bad):
    with pytest.raises(SimulateError, match=repr(bad)) as exc:
        render("dgx2", tmp_path / "r", missing_gpus=[bad])
    assert exc.value.value == bad


def test_unknown_numa_on_a_device_the_machine_lacks_is_refused_by_name(tmp_path):
    with pytest.raises(SimulateError, match="'0000:34:00.0'"):
        render("dgx-h100", tmp_path / "r", unknown_numa=["0000:34:00.0"])


# -- the output directory --------------------------------------------------------------------------
def test_a_non_empty_foreign_directory_is_refused_and_left_alone(tmp_path):
    out = tmp_path / "home"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(SimulateError, match="not empty") as exc:
        render("dgx2", out)
    assert exc.value.value == str(out)
    assert os.listdir(out) == ["thesis.tex"]
    assert [p.name for p in tmp_path.iterdir()] == ["home"]    # no temporary left behind


def test_a_file_in_place_of_the_output_is_refused(tmp_path):
    out = tmp_path / "f"
    out.write_text("x")
    with pytest.raises(SimulateError, match="not a directory"):
        render("dgx2", out)


def test_an_empty_directory_is_used(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert SysfsRoot(render("dgx-h100", out)).simulated()["machine"] == "dgx-h100"


def test_a_previous_simulated_tree_is_replaced(tmp_path):
    out = tmp_path / "r"
    render("dgx-h100", out, missing_gpus=["0000:1b:00.0"])
    render("dgx2", out)
    root = SysfsRoot(out)
    assert json.loads((out / SIMULATED_MARKER).read_text())["machine"] == "dgx2"
    assert _of_class(root, "0x0302") == GPUS["dgx2"]
    assert root.node_ids() == (0, 1)
    assert not root.path("sys/devices/system/cpu/cpu100").exists()    # H100's CPUs are gone
    assert [p.name for p in tmp_path.iterdir()] == ["r"]


def test_a_description_object_renders_like_its_key(tmp_path):
    root = SysfsRoot(render(DGX_A100, tmp_path / "r"))
    assert root.simulated()["machine"] == "dgx-a100"


# -- SR-IOV on the compute HCAs --------------------------------------------------------------------
VF_DEVICE = {"dgx-a100": "101c", "dgx-h100": "101e"}


@pytest.mark.parametrize("key", sorted(VF_DEVICE))
def test_compute_hcas_enable_eight_vfs_numbered_from_the_pf_routing_id(key, tmp_path):
    root = SysfsRoot(render(key, tmp_path / "r"))
    for nic in NIC_GPUS[key]:
        pf = f"0000:{nic:02x}:00.0"
        assert root.read(f"sys/bus/pci/devices/{pf}/sriov_totalvfs") == "16"
        assert root.read(f"sys/bus/pci/devices/{pf}/sriov_numvfs") == "8"
        assert root.read(f"sys/bus/pci/devices/{pf}/sriov_vf_device") == VF_DEVICE[key]
        # routing id + offset 1 + i * stride 1: .1 ... .7, then device 1 function 0
        want = [f"0000:{nic:02x}:00.{f}" for f in range(1, 8)] + [f"0000:{nic:02x}:01.0"]
        assert [root.pci_link_name(pf, f"virtfn{i}") for i in range(8)] == want
        numa = root.pci_attr(pf, "numa_node")
        # VFs do not make the PF a multi-function device (header type bit 7 stays 0)
        assert root.read_bytes(f"sys/bus/pci/devices/{pf}/config", 64)[0x0e] == 0
        for vf in want:
            assert root.pci_link_name(vf, "physfn") == pf
            assert root.pci_attr(vf, "device") == "0x" + VF_DEVICE[key]
            assert root.pci_attr(vf, "class") == "0x020700"
            assert root.pci_attr(vf, "numa_node") == numa
            assert root.pci_link_name(vf, "driver") == "vfio-pci"
            group = root.pci_link_name(vf, "iommu_group")
            assert root.listdir(f"sys/kernel/iommu_groups/{group}/devices") == [vf]
            assert root.pci_upstream(vf) == root.pci_upstream(pf)   # beside the PF, on its bus


def test_the_storage_nics_and_the_dgx2_have_no_sriov(tmp_path):
    a100 = SysfsRoot(render("dgx-a100", tmp_path / "a"))
    assert not a100.exists("sys/bus/pci/devices/0000:61:00.0/sriov_totalvfs")
    dgx2 = SysfsRoot(render("dgx2", tmp_path / "d"))
    assert not any(dgx2.exists(f"sys/bus/pci/devices/{b}/sriov_totalvfs")
                   for b in dgx2.pci_addresses())


@pytest.mark.parametrize("count", [0, 3, 16])
def test_ib_vfs_sets_how_many_vfs_each_hca_enables(count, tmp_path):
    root = SysfsRoot(render("dgx-h100", tmp_path / "r", ib_vfs=count))
    assert root.read("sys/bus/pci/devices/0000:18:00.0/sriov_numvfs") == str(count)
    vfs = [b for b in root.pci_addresses() if root.pci_link_name(b, "physfn")]
    assert len(vfs) == 8 * count


def test_the_serial_makes_each_simulated_nodes_hca_guids_its_own(tmp_path):
    """Two nodes of one simulated cluster: their HCAs' GUIDs differ, as on a real fabric,
    where a subnet manager keys partition members by GUID."""
    def guids(root):
        return sorted((p.parent.parent.parent.name, p.read_text().strip())
                      for p in root.glob("sys/bus/pci/devices/*/infiniband/*/node_guid"))
    a = guids(render("dgx-h100", tmp_path / "a"))
    b = guids(render("dgx-h100", tmp_path / "b", serial=0x1f))
    assert len(a) == len(b) == 8 and [x for x, _ in a] == [x for x, _ in b]
    assert a[0][1] == "b8ce:f603:0000:1800"         # serial 0: the tree's GUIDs as before
    assert b[0][1] == "b8ce:f603:001f:1800"
    assert not {g for _, g in a} & {g for _, g in b}


@pytest.mark.parametrize("bad", [-1, 65536, True, "1"])
def test_a_serial_beyond_16_bits_is_refused(bad, tmp_path):
    with pytest.raises(SimulateError, match="serial"):
        render("dgx-h100", tmp_path / "r", serial=bad)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("bad", [-1, 17, True, "8"])
def test_ib_vfs_beyond_totalvfs_is_refused(bad, tmp_path):
    with pytest.raises(SimulateError, match="ib_vfs"):
        render("dgx-a100", tmp_path / "r", ib_vfs=bad)
    assert not (tmp_path / "r").exists()
