"""Topology discovery: the simulated DGX trees read back as the hardware notes say.

Expected values come from /work/shared/notes/machines.md (tables of BDFs, NUMA nodes, NVSwitches,
Fabric Manager partitions), not from the code under test.
"""

from __future__ import annotations

import json
import shutil
from itertools import combinations

import pytest
from click.testing import CliRunner

from slurm_dgxvm.cli.main import cli
from slurm_dgxvm.errors import SysfsError, TopologyError
from slurm_dgxvm.simulate import render
from slurm_dgxvm.topology import (FULL_PASSTHROUGH, NO_NVSWITCH, SHARED_NVSWITCH, MissingGpu,
                                  SysfsRoot, discover)
from slurm_dgxvm.topology.sysfs import SIMULATED_MARKER

MACHINES = ("dgx2", "dgx-a100", "dgx-h100")
DEGRADED = "dgx2-degraded"               # conftest: missing 39:00.0, numa_node -1 on b7:00.0
DEGRADED_MISSING = "0000:39:00.0"
DEGRADED_UNKNOWN_NUMA = "0000:b7:00.0"


def _bdfs(buses: str) -> list[str]:
    return [f"0000:{b}:00.0" for b in buses.split()]


# notes §1.3, §2.3, §3.3 (nvidia-smi order = ascending BDF)
GPU_PCI = {
    "dgx2": _bdfs("34 36 39 3b 57 59 5c 5e b7 b9 bc be e0 e2 e5 e7"),
    "dgx-a100": _bdfs("07 0f 47 4e 87 90 b7 bd"),
    "dgx-h100": _bdfs("1b 43 52 61 9d c3 d1 df"),
}
GPU_NUMA = {
    "dgx2": [0] * 8 + [1] * 8,
    "dgx-a100": [3, 3, 1, 1, 7, 7, 5, 5],
    "dgx-h100": [0] * 4 + [1] * 4,
}
NODE_CPUS = {
    "dgx2": {0: [*range(0, 24), *range(48, 72)], 1: [*range(24, 48), *range(72, 96)]},
    "dgx-a100": {n: [*range(16 * n, 16 * n + 16), *range(128 + 16 * n, 128 + 16 * n + 16)]
                 for n in range(8)},
    "dgx-h100": {0: [*range(0, 56), *range(112, 168)], 1: [*range(56, 112), *range(168, 224)]},
}
CORE0_SIBLINGS = {"dgx2": (0, 48), "dgx-a100": (0, 128), "dgx-h100": (0, 112)}
CORE_COUNT = {"dgx2": 48, "dgx-a100": 128, "dgx-h100": 112}
NVSWITCHES = {
    "dgx2": _bdfs("61 62 63 65 66 67 c1 c2 c3 c5 c6 c7"),
    "dgx-a100": _bdfs("c4 c5 c6 c7 c8 c9"),
    "dgx-h100": _bdfs("07 08 09 0a"),
}
NVSWITCH_MODEL = {"dgx2": FULL_PASSTHROUGH, "dgx-a100": SHARED_NVSWITCH,
                  "dgx-h100": SHARED_NVSWITCH}

per_machine = pytest.mark.parametrize("machine", MACHINES)


# -- a DGX-2 tree that tests may change ------------------------------------------------------------
class Scratch:
    """A private DGX-2 tree shared by the tests that break it; every change is undone after the
    test (re-rendering or copying a tree per test would cost most of the suite's time)."""

    def __init__(self, root):
        self.root = root
        self._saved: dict = {}

    def _save(self, rel):
        p = self.root / rel
        if rel not in self._saved:
            self._saved[rel] = p.read_bytes() if p.is_file() else None
        return p

    def write(self, rel, text):
        self._save(rel).write_text(text + "\n")

    def remove(self, rel):
        self._save(rel).unlink()

    def make_dir(self, rel):
        p = self._save(rel)
        p.unlink()
        p.mkdir()

    def restore(self):
        for rel, data in self._saved.items():
            p = self.root / rel
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
            if data is not None:
                p.write_bytes(data)
        self._saved.clear()


@pytest.fixture(scope="module")
def _scratch_root(tmp_path_factory):
    return render("dgx2", tmp_path_factory.mktemp("scratch") / "dgx2")


@pytest.fixture
def scratch(_scratch_root):
    s = Scratch(_scratch_root)
    yield s
    s.restore()


# -- machine identity ------------------------------------------------------------------------------
@per_machine
def test_machine_key_and_nvswitch_model_come_from_the_catalog(host, machine):
    assert host.machine == machine
    assert host.nvswitch_model == NVSWITCH_MODEL[machine]
    assert "DMI product name" in host.match


@per_machine
def test_simulated_marker_is_detected(host, machine):
    assert host.simulated == machine


def test_a_tree_without_the_marker_reads_as_real_hardware(scratch):
    scratch.remove(SIMULATED_MARKER)
    assert discover(SysfsRoot(scratch.root)).simulated is None


# -- GPUs ------------------------------------------------------------------------------------------
@per_machine
def test_gpus_are_indexed_in_ascending_pci_order_at_the_documented_addresses(host, machine):
    assert [g.index for g in host.gpus] == list(range(len(GPU_PCI[machine])))
    assert [g.pci for g in host.gpus] == GPU_PCI[machine]
    assert [g.pci for g in host.gpus] == sorted(g.pci for g in host.gpus)
    assert all(g.healthy for g in host.gpus)
    assert host.missing_gpus == ()


@per_machine
def test_each_gpu_has_its_documented_numa_node_read_from_sysfs(host, machine):
    assert [g.numa_node for g in host.gpus] == GPU_NUMA[machine]
    assert {g.numa_source for g in host.gpus} == {"sysfs"}


@per_machine
def test_every_gpu_has_its_own_iommu_group(host):
    groups = [g.iommu_group for g in host.gpus]
    assert None not in groups
    assert len(set(groups)) == len(groups)


# -- CPUs and NUMA ---------------------------------------------------------------------------------
@per_machine
def test_numa_nodes_have_the_documented_cpu_lists(host, machine):
    assert {n.id: list(n.cpus) for n in host.numa_nodes} == NODE_CPUS[machine]


@per_machine
def test_cores_are_whole_with_two_threads_each(host, machine):
    assert len(host.cores) == CORE_COUNT[machine]
    assert host.threads_per_core == 2
    assert all(len(c.threads) == 2 for c in host.cores)
    first = min(host.cores, key=lambda c: c.threads)
    assert first.threads == CORE0_SIBLINGS[machine]
    every = [t for c in host.cores for t in c.threads]
    assert sorted(every) == sorted(t for cpus in NODE_CPUS[machine].values() for t in cpus)


@per_machine
def test_both_threads_of_a_core_are_on_the_core_node(host):
    for core in host.cores:
        assert set(core.threads) <= set(host.node(core.node).cpus)


@per_machine
def test_nodes_have_a_one_gib_hugepage_pool(host):
    for node in host.numa_nodes:
        pool = node.hugepage_pool(1048576)
        assert pool is not None and 0 < pool.total * 1024 <= node.memory_mib


def test_dgx2_nodes_sit_on_their_own_sockets(host):
    assert {n.id: n.socket for n in host.numa_nodes} == {0: 0, 1: 1}


# -- NVSwitches ------------------------------------------------------------------------------------
@per_machine
def test_nvswitches_are_found_at_the_documented_addresses(host, machine):
    assert [s.pci for s in host.nvswitches] == NVSWITCHES[machine]


def test_dgx2_has_six_nvswitches_on_each_baseboard(host):
    assert [s.board for s in host.nvswitches] == [0] * 6 + [1] * 6
    assert [g.board for g in host.gpus] == [0] * 8 + [1] * 8


@pytest.mark.parametrize("machine", ["dgx-a100", "dgx-h100"])
def test_single_baseboard_machines_have_everything_on_board_zero(host):
    assert {s.board for s in host.nvswitches} == {0}
    assert {g.board for g in host.gpus} == {0}


# -- legal blocks ----------------------------------------------------------------------------------
def test_dgx2_blocks_are_index_aligned_sizes_1_2_4_8_16(host):
    assert host.block_sizes == (1, 2, 4, 8, 16)
    counts = {size: len(blocks) for size, blocks in host.blocks_by_size.items()}
    assert counts == {1: 16, 2: 8, 4: 4, 8: 2, 16: 1}
    for b in host.blocks:
        start = b.gpus[0]
        assert start % b.size == 0
        assert b.gpus == tuple(range(start, start + b.size))


def test_dgx2_blocks_take_the_fabric_manager_number_of_nvswitches(host):
    # FMG passthrough table: 16 GPUs -> 12 switches, 8 -> 6, 4 -> 3, 2 -> 1, 1 -> none
    wanted = {16: 12, 8: 6, 4: 3, 2: 1, 1: 0}
    for b in host.blocks:
        assert len(b.nvswitches) == wanted[b.size]
        assert b.fm_partition is None
        if b.size <= 8:      # a block within a baseboard takes that baseboard's switches
            boards = {host.gpu(i).board for i in b.gpus}
            sw_boards = {s.board for s in host.nvswitches if s.pci in b.nvswitches}
            assert len(boards) == 1 and sw_boards <= boards


def test_dgx2_block_4_to_7_takes_switches_65_66_67(host):
    block = host.block_by_gpus[(4, 5, 6, 7)]
    assert block.nvswitches == tuple(_bdfs("65 66 67"))


def test_dgx2_disjoint_blocks_never_share_an_nvswitch(host):
    for a, b in combinations(host.blocks, 2):
        if not set(a.gpus) & set(b.gpus):
            assert not set(a.nvswitches) & set(b.nvswitches), (a.gpus, b.gpus)


@pytest.mark.parametrize("machine", ["dgx-a100"])
def test_dgx_a100_blocks_are_the_single_baseboard_fm_partitions(host):
    ids = sorted(b.fm_partition for b in host.blocks)
    assert ids == [1, 7, 8, 11, 12, 13, 14, *range(19, 27)]
    assert all(b.nvswitches == () for b in host.blocks)
    by_id = {b.fm_partition: b.gpus for b in host.blocks}
    assert by_id[1] == tuple(range(8))
    assert by_id[7] == (0, 1, 2, 3) and by_id[8] == (4, 5, 6, 7)


@pytest.mark.parametrize("machine", ["dgx-h100"])
def test_dgx_h100_two_gpu_blocks_are_fm_partitions_3_to_6(host):
    pairs = {b.gpus: b.fm_partition for b in host.blocks_by_size[2]}
    assert pairs == {(0, 2): 3, (1, 3): 4, (4, 6): 5, (5, 7): 6}
    assert {b.gpus: b.fm_partition for b in host.blocks_by_size[4]} == {(0, 1, 2, 3): 1,
                                                                         (4, 5, 6, 7): 2}
    assert host.blocks_by_size[8][0].fm_partition == 0
    assert sorted(b.fm_partition for b in host.blocks_by_size[1]) == list(range(7, 15))


def test_a_configured_module_id_permutation_changes_the_h100_blocks(trees):
    # device order 0..7 -> modules 4,2,1,3,8,6,5,7 (as on a real HGX B200 capture, notes §3.7)
    h = discover(SysfsRoot(trees["dgx-h100"]), module_ids=(4, 2, 1, 3, 8, 6, 5, 7))
    assert [g.module_id for g in h.gpus] == [4, 2, 1, 3, 8, 6, 5, 7]
    pairs = {b.gpus: b.fm_partition for b in h.blocks_by_size[2]}
    # partition 3 = modules {1,3} = GPUs {2,3}; 4 = {2,4} = {1,0}; 5 = {5,7} = {6,7}; 6 = {6,8}
    assert pairs == {(2, 3): 3, (0, 1): 4, (6, 7): 5, (4, 5): 6}
    singles = {b.gpus: b.fm_partition for b in h.blocks_by_size[1]}
    assert singles[(0,)] == 10          # module 4 -> partition 7 + 3
    assert any("module ids from config" in n for n in h.notes)


@pytest.mark.parametrize("module_ids", [
    (1, 1, 2, 3, 4, 5, 6, 7),            # a repeat
    (1, 2, 3, 4, 5, 6, 7),               # too short
    (0, 1, 2, 3, 4, 5, 6, 7),            # 0-based
    (1, 2, 3, 4, 5, 6, 7, 9),            # out of range
])
def test_module_ids_that_are_not_a_permutation_raise_topology_error(trees, module_ids):
    with pytest.raises(TopologyError) as info:
        discover(SysfsRoot(trees["dgx-h100"]), module_ids=module_ids)
    assert "host.module_ids" in str(info.value)
    assert str(list(module_ids)) in str(info.value)


# -- NICs ------------------------------------------------------------------------------------------
def test_each_dgx2_compute_nic_is_near_exactly_its_gpu_pair(host):
    compute = {n.pci: n.near_gpus for n in host.nics if n.kind == "infiniband"}
    assert compute == {
        "0000:35:00.0": (0, 1), "0000:3a:00.0": (2, 3), "0000:58:00.0": (4, 5),
        "0000:5d:00.0": (6, 7), "0000:b8:00.0": (8, 9), "0000:bd:00.0": (10, 11),
        "0000:e1:00.0": (12, 13), "0000:e6:00.0": (14, 15),
    }


@pytest.mark.parametrize("machine", ["dgx-h100"])
def test_each_dgx_h100_compute_nic_is_near_its_paired_gpu(host):
    # H100UG table 6: OSFP port -> GPU
    near = {n.pci: n.near_gpus for n in host.nics if n.near_gpus}
    assert near == {f"0000:{bus}:00.0": (i,) for i, bus in
                    enumerate("18 40 4f 5e 9a c0 ce dc".split())}
    storage = [n for n in host.nics if n.pci.startswith(("0000:29:", "0000:aa:"))]
    assert len(storage) == 4 and all(n.near_gpus == () for n in storage)


@pytest.mark.parametrize("machine", ["dgx-a100"])
def test_dgx_a100_nics_stay_within_their_gpu_pair(host):
    pairs = [{0, 1}, {2, 3}, {4, 5}, {6, 7}]
    for nic in host.nics:
        if nic.near_gpus:
            assert any(set(nic.near_gpus) <= p for p in pairs), nic
    assert {i for n in host.nics for i in n.near_gpus} == set(range(8))


@pytest.mark.parametrize("machine", ["dgx-a100", "dgx-h100"])
def test_compute_hcas_bring_their_enabled_vfs_and_no_vf_is_a_nic_of_its_own(host):
    compute = [n for n in host.nics if n.near_gpus]
    assert len(compute) == 8
    for n in compute:
        assert n.total_vfs == 16 and len(n.vfs) == 8
        assert [vf.index for vf in n.vfs] == list(range(8))
        assert all(vf.driver == "vfio-pci" and vf.numa_node == n.numa_node
                   and vf.iommu_group is not None for vf in n.vfs)
        assert n.rdma_device.startswith("mlx5_") and n.node_guid.startswith("0xb8cef603")
    all_vfs = {vf.pci for n in host.nics for vf in n.vfs}
    assert not all_vfs & {n.pci for n in host.nics}
    assert len(all_vfs) == 64


@pytest.mark.parametrize("machine", ["dgx-a100"])
def test_each_a100_gpu_lists_the_hcas_of_its_switch_nearest_first(host):
    # GDS: mlx5_0 (0c) sits under GPU1's (0f) second-level switch, mlx5_1 (12) beside the pair
    assert [pci for pci, _ in host.gpu(1).hcas] == ["0000:0c:00.0", "0000:12:00.0"]
    assert host.gpu(1).hcas[0][1] > host.gpu(1).hcas[1][1]
    assert {pci for pci, _ in host.gpu(0).hcas} == {"0000:0c:00.0", "0000:12:00.0"}
    assert all(pci not in ("0000:61:00.0", "0000:61:00.1") for g in host.gpus for pci, _ in g.hcas)


def test_the_dgx2_hcas_have_no_sriov(host):
    assert all(n.total_vfs == 0 and n.vfs == () for n in host.nics)


# -- a degraded DGX-2 ------------------------------------------------------------------------------
on_degraded = pytest.mark.parametrize("machine", [DEGRADED])


@on_degraded
def test_degraded_dgx2_indexes_the_15_present_gpus_from_zero(host):
    degraded = host
    assert degraded.machine == "dgx2"
    assert [g.index for g in degraded.gpus] == list(range(15))
    expected = [p for p in GPU_PCI["dgx2"] if p != DEGRADED_MISSING]
    assert [g.pci for g in degraded.gpus] == expected
    assert degraded.missing_gpus == (MissingGpu(pci=DEGRADED_MISSING, slot=2, board=0),)
    assert any(DEGRADED_MISSING in n and "missing" in n for n in degraded.notes)


@on_degraded
def test_degraded_dgx2_offers_no_block_with_the_missing_slot(host):
    degraded = host
    for b in degraded.blocks:
        slots = {degraded.gpu(i).slot for i in b.gpus}
        assert 2 not in slots


@on_degraded
def test_degraded_dgx2_loses_the_blocks_of_the_missing_gpu_and_keeps_board_1(host):
    degraded = host
    slot_sets = {tuple(degraded.gpu(i).slot for i in b.gpus) for b in degraded.blocks}
    assert 16 not in degraded.blocks_by_size
    assert tuple(range(8)) not in slot_sets                      # board-0 8-GPU block
    assert tuple(range(8, 16)) in slot_sets                      # board-1 8-GPU block
    assert (0, 1, 2, 3) not in slot_sets and (2, 3) not in slot_sets
    assert {(4, 5, 6, 7), (8, 9, 10, 11), (12, 13, 14, 15), (0, 1)} <= slot_sets
    # board-1 blocks keep their physical switches although indices shifted by one
    board1 = degraded.block_by_gpus[tuple(range(7, 15))]
    assert board1.nvswitches == tuple(_bdfs("c1 c2 c3 c5 c6 c7"))


@on_degraded
def test_degraded_dgx2_gpu_with_unknown_numa_gets_its_node_from_local_cpulist(host):
    degraded = host
    gpu = next(g for g in degraded.gpus if g.pci == DEGRADED_UNKNOWN_NUMA)
    assert gpu.numa_node == 1
    assert gpu.numa_source == "local_cpulist"
    assert any(DEGRADED_UNKNOWN_NUMA in n and "local_cpulist" in n for n in degraded.notes)


# -- other machines and matching -------------------------------------------------------------------
def test_forcing_generic_gives_blocks_within_numa_nodes(trees):
    h = discover(SysfsRoot(trees["dgx2"]), machine="generic")
    assert h.machine == "generic"
    assert h.nvswitch_model == NO_NVSWITCH and h.nvswitches == ()
    everything = tuple(range(16))
    for b in h.blocks:
        assert b.nvswitches == () and b.fm_partition is None
        if b.gpus != everything:
            assert len({h.gpu(i).numa_node for i in b.gpus}) == 1, b.gpus
    assert {(0, 1, 2, 3, 4, 5, 6, 7), tuple(range(8, 16)), everything} <= set(h.block_by_gpus)


def test_forcing_an_unknown_machine_raises_topology_error(trees):
    with pytest.raises(TopologyError) as info:
        discover(SysfsRoot(trees["dgx2"]), machine="dgx-9000")
    assert "'dgx-9000'" in str(info.value)


def _foreign_gpus(scratch):
    for pci in GPU_PCI["dgx2"]:
        scratch.write(f"sys/bus/pci/devices/{pci}/device", "0x1234")


def test_unknown_dmi_name_and_unknown_gpu_ids_give_a_generic_host_with_a_note(scratch):
    scratch.write("sys/class/dmi/id/product_name", "ACME GPU Box 9000")
    _foreign_gpus(scratch)
    h = discover(SysfsRoot(scratch.root))
    assert h.machine == "generic"
    assert "unknown machine" in h.match and "ACME GPU Box 9000" in h.match
    assert "10de:1234" in h.match
    assert any("NVSwitch" in n and "unknown machine" in n for n in h.notes)
    assert len(h.gpus) == 16 and h.nvswitches == ()


def test_known_dmi_name_with_foreign_gpus_is_not_trusted(scratch):
    _foreign_gpus(scratch)
    h = discover(SysfsRoot(scratch.root))
    assert h.machine == "generic"
    assert "NVIDIA DGX-2" in h.match and "10de:1234" in h.match


def test_known_gpus_at_reference_addresses_identify_the_machine_without_dmi(scratch):
    scratch.remove("sys/class/dmi/id/product_name")
    h = discover(SysfsRoot(scratch.root))
    assert h.machine == "dgx2"
    assert h.product_name is None
    assert "GPU PCI ids" in h.match


# -- unreadable or malformed sysfs -----------------------------------------------------------------
def test_a_gpu_class_file_that_is_a_directory_raises_sysfs_error_naming_it(scratch):
    scratch.make_dir("sys/bus/pci/devices/0000:34:00.0/class")
    with pytest.raises(SysfsError) as info:
        discover(SysfsRoot(scratch.root))
    assert info.value.path.endswith("0000:34:00.0/class")
    assert info.value.path in str(info.value)


def test_a_missing_node_meminfo_raises_sysfs_error_naming_it(scratch):
    scratch.remove("sys/devices/system/node/node1/meminfo")
    with pytest.raises(SysfsError) as info:
        discover(SysfsRoot(scratch.root))
    assert info.value.path.endswith("node/node1/meminfo")
    assert "node1/meminfo" in str(info.value)


@pytest.mark.parametrize("rel, content", [
    ("sys/bus/pci/devices/0000:34:00.0/class", "three-d controller"),
    ("sys/bus/pci/devices/0000:34:00.0/numa_node", "zero"),
    ("sys/devices/system/node/node0/cpulist", "0-23,x"),
    ("sys/devices/system/node/node0/meminfo", "MemTotal: lots"),
    ("sys/devices/system/cpu/cpu5/topology/core_id", "five"),
    ("sys/devices/system/node/node0/hugepages/hugepages-1048576kB/nr_hugepages", "many"),
])
def test_a_malformed_sysfs_value_raises_sysfs_error_naming_the_file(scratch, rel, content):
    scratch.write(rel, content)
    with pytest.raises(SysfsError) as info:
        discover(SysfsRoot(scratch.root))
    assert info.value.path == str(scratch.root / rel)
    assert str(scratch.root / rel) in str(info.value)


def test_a_malformed_local_cpulist_of_an_unknown_numa_device_raises_sysfs_error(scratch):
    scratch.write("sys/bus/pci/devices/0000:34:00.0/numa_node", "-1")
    scratch.write("sys/bus/pci/devices/0000:34:00.0/local_cpulist", "0-3,q")
    with pytest.raises(SysfsError) as info:
        discover(SysfsRoot(scratch.root))
    assert info.value.path.endswith("0000:34:00.0/local_cpulist")


def test_scratch_tree_is_back_to_a_healthy_dgx2_after_those_changes(scratch):
    h = discover(SysfsRoot(scratch.root))
    assert h.machine == "dgx2" and len(h.gpus) == 16 and h.notes == ()


def test_a_root_that_is_not_a_directory_raises_sysfs_error(tmp_path):
    with pytest.raises(SysfsError) as info:
        SysfsRoot(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value)


# -- topology show --json --------------------------------------------------------------------------
@per_machine
def test_topology_show_json_has_the_stable_keys(tree, host, tmp_path, machine, monkeypatch):
    monkeypatch.setattr("slurm_dgxvm.config.DEFAULT_CONFIG_PATH", str(tmp_path / "no.toml"))
    result = CliRunner().invoke(cli, ["--sysfs-root", str(tree), "--state-dir",
                                      str(tmp_path / "state"), "topology", "show", "--json"],
                                env={"DGXVM_CONFIG": None, "DGXVM_SYSFS_ROOT": None,
                                     "DGXVM_STATE_DIR": None})
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["machine"] == machine
    assert doc["nvswitch_model"] == NVSWITCH_MODEL[machine]
    assert len(doc["gpus"]) == len(GPU_PCI[machine])
    for g, want in zip(doc["gpus"], host.gpus):
        assert {"index", "pci", "numa_node", "board", "healthy"} <= set(g)
        assert (g["index"], g["pci"], g["numa_node"], g["board"], g["healthy"]) == (
            want.index, want.pci, want.numa_node, want.board, True)
    assert [(s["pci"], s["board"]) for s in doc["nvswitches"]] == [
        (s.pci, s.board) for s in host.nvswitches]
    assert {n["id"]: n["cpus"] for n in doc["numa_nodes"]} == NODE_CPUS[machine]
    assert not (tmp_path / "state" / "ledger.json").exists()


@on_degraded
def test_topology_json_lists_a_missing_gpu_as_unhealthy(host):
    degraded = host
    doc = degraded.to_json()
    missing = [g for g in doc["gpus"] if g.get("missing")]
    assert missing == [{"index": None, "pci": DEGRADED_MISSING, "numa_node": None, "board": 0,
                        "healthy": False, "iommu_group": None, "device_id": None,
                        "module_id": None, "driver": None, "missing": True}]
    json.dumps(doc)     # serialisable as is
