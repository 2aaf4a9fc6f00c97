"""Placement: the aligned block, NVSwitches / FM partition, pinned cores and memory of one VM."""

from __future__ import annotations

import os
from itertools import combinations

import pytest

from slurm_dgxvm.errors import NoFit, RequestError
from slurm_dgxvm.placement import EMPTY, Occupancy, Policy, Request, place, templates

STRICT = Policy()
PREFER = Policy(alignment="prefer")
ONE_GIB_KIB = 1048576


def _bdfs(buses: str) -> tuple[str, ...]:
    return tuple(f"0000:{b}:00.0" for b in buses.split())


def take(host, *requests: Request, policy: Policy = STRICT) -> Occupancy:
    """Place the requests one after the other, each seeing the ones before; return the union."""
    taken = EMPTY
    for r in requests:
        taken = Occupancy.union([taken, place(host, taken, r, policy).occupancy()])
    return taken


def one_gpu_at(*indices: int) -> tuple[Request, ...]:
    return tuple(Request(count=1, gpu_index=i) for i in indices)


def assert_whole_cores(host, cpus):
    cpus = set(cpus)
    for core in host.cores:
        assert set(core.threads) <= cpus or not set(core.threads) & cpus, core


# -- the headline ----------------------------------------------------------------------------------
def test_slurm_scattered_gpus_are_remapped_to_an_aligned_block_on_one_board_and_node(host):
    p = place(host, EMPTY, Request(count=4, slurm_gpus=(5, 6, 7, 11)))
    assert p.gpus == (4, 5, 6, 7)              # the block sharing most GPUs with Slurm's choice
    assert p.gpus in host.block_by_gpus
    assert p.aligned is True and p.remapped is True
    assert p.slurm_gpus == (5, 6, 7, 11)
    assert len({host.gpu(i).board for i in p.gpus}) == 1
    assert p.numa_nodes == (0,)
    assert set(p.cpus) <= set(host.node(0).cpus)
    assert_whole_cores(host, p.cpus)
    assert p.nvswitches == _bdfs("65 66 67")
    boards = {s.board for s in host.nvswitches if s.pci in p.nvswitches}
    assert boards == {host.gpu(4).board}
    assert p.fm_partition is None
    assert p.vcpus == 22                       # sizing docstring: 11 cores
    assert "Slurm" in p.reason


def test_slurm_choice_is_kept_when_it_is_already_an_aligned_free_block(host):
    p = place(host, EMPTY, Request(count=4, slurm_gpus=(11, 8, 10, 9)))
    assert p.gpus == (8, 9, 10, 11)
    assert p.remapped is False and p.aligned is True
    assert p.nvswitches == _bdfs("c1 c2 c3")
    assert p.numa_nodes == (1,)
    assert set(p.cpus) <= set(host.node(1).cpus)


def test_slurm_choice_that_is_aligned_but_busy_is_remapped(host):
    taken = take(host, *one_gpu_at(9))
    p = place(host, taken, Request(count=4, slurm_gpus=(8, 9, 10, 11)))
    assert 9 not in p.gpus and p.aligned and p.remapped


# -- best fit --------------------------------------------------------------------------------------
def test_best_fit_puts_a_single_gpu_next_to_a_taken_one_not_into_a_free_board(host):
    taken = take(host, *one_gpu_at(0))
    assert place(host, taken, Request(count=1)).gpus == (1,)


def test_best_fit_puts_a_pair_next_to_a_taken_pair(host):
    taken = take(host, Request(count=2, gpu_index=0))
    assert place(host, taken, Request(count=2)).gpus == (2, 3)


def test_best_fit_on_an_empty_host_starts_at_the_lowest_index(host):
    assert place(host, EMPTY, Request(count=8)).gpus == tuple(range(8))


# -- an admin's --gpu-index ------------------------------------------------------------------------
def test_gpu_index_at_an_aligned_start_takes_that_block(host):
    p = place(host, EMPTY, Request(count=4, gpu_index=8))
    assert p.gpus == (8, 9, 10, 11)
    assert p.nvswitches == _bdfs("c1 c2 c3")
    assert p.slurm_gpus is None and p.remapped is False


def test_misaligned_gpu_index_raises_request_error_listing_the_aligned_starts(host):
    with pytest.raises(RequestError) as info:
        place(host, EMPTY, Request(count=4, gpu_index=3))
    msg = str(info.value)
    assert msg.startswith("gpu index 3 is not aligned")      # the quantity: no CLI flag here
    assert "0, 4, 8, 12" in msg
    assert (info.value.quantity, info.value.value) == ("gpu_index", 3)


def test_gpu_index_of_a_busy_block_is_no_fit_naming_the_busy_gpu(host):
    taken = take(host, *one_gpu_at(9))
    with pytest.raises(NoFit) as info:
        place(host, taken, Request(count=4, gpu_index=8))
    assert info.value.resource == "gpus"
    assert "9" in str(info.value) and "(gpu index 8)" in str(info.value)
    assert (info.value.quantity, info.value.value) == ("gpu_index", 8)


# -- requests that can never fit -------------------------------------------------------------------
@pytest.mark.parametrize("machine, count", [
    ("dgx2", 0), ("dgx2", 3), ("dgx2", 17), ("dgx2", -1),
    ("dgx-h100", 16), ("dgx-a100", 6),
    ("dgx2-degraded", 16),
])
def test_impossible_gpu_counts_raise_request_error_naming_the_count(host, count):
    with pytest.raises(RequestError) as info:
        place(host, EMPTY, Request(count=count))
    assert str(count) in str(info.value)


@pytest.mark.parametrize("slurm_gpus, names", [
    ((99, 1, 2, 3), "99"),
    ((5, 5, 6, 7), "repeats"),
    ((1, 2, 3), "3 GPU(s)"),
    ((1, 2, 3, 4, 5), "5 GPU(s)"),
    ((0, 1, 2, 16), "16"),
])
def test_bad_slurm_gpu_lists_raise_request_error(host, slurm_gpus, names):
    with pytest.raises(RequestError) as info:
        place(host, EMPTY, Request(count=4, slurm_gpus=slurm_gpus))
    assert names in str(info.value)


@pytest.mark.parametrize("request_, names, quantity", [
    (Request(count=1, vcpus=5), "vcpus 5 ", "vcpus"),                 # odd: not whole cores
    (Request(count=4, vcpus=1000), "vcpus 1000 ", "vcpus"),           # more than node 0 has
    (Request(count=16, vcpus=200), "vcpus 200 ", "vcpus"),            # more than both nodes have
    (Request(count=4, memory_mib=10 ** 8), "memory 100000000 MiB ", "memory_mib"),
    (Request(count=1, vcpus=0), "vcpus 0 ", "vcpus"),
    (Request(count=1, memory_mib=0), "memory 0 MiB ", "memory_mib"),
    (Request(count=1, disk_gib=0), "disk 0 GiB ", "disk_gib"),
    (Request(count=1, gpu_index=16), "gpu index 16 ", "gpu_index"),
])
def test_overrides_the_host_cannot_give_raise_request_error(host, request_, names, quantity):
    """Placement names the quantity, not a CLI flag: a Slurm job's sizes come from its
    partition; the edge that knows the source renames it (tests/unit/test_cli.py: the flag)."""
    with pytest.raises(RequestError) as info:
        place(host, EMPTY, request_)
    assert str(info.value).startswith(names)
    assert "--" not in str(info.value)
    assert info.value.quantity == quantity
    assert info.value.value == getattr(request_, quantity)


def test_even_vcpus_and_memory_overrides_are_honoured(host):
    p = place(host, EMPTY, Request(count=2, vcpus=8, memory_mib=65536, disk_gib=100))
    assert p.vcpus == 8 and len(p.cpus) == 8
    assert p.memory_mib == 65536
    assert p.disk_gib == 100
    assert_whole_cores(host, p.cpus)


def test_memory_override_is_rounded_up_to_whole_huge_pages(host):
    p = place(host, EMPTY, Request(count=1, memory_mib=1000))
    assert p.memory_mib == 1024


# -- fragmentation ---------------------------------------------------------------------------------
def test_strict_alignment_refuses_a_fragmented_host(host):
    taken = take(host, *one_gpu_at(0, 4, 8, 12))       # one GPU in each 4-GPU block
    with pytest.raises(NoFit) as info:
        place(host, taken, Request(count=4))
    assert info.value.resource == "aligned-block"
    assert "12 GPUs are free" in str(info.value)


def test_prefer_alignment_takes_slurm_free_set_without_nvswitches(host):
    taken = take(host, *one_gpu_at(0, 4, 8, 12))
    p = place(host, taken, Request(count=4, slurm_gpus=(1, 2, 3, 5)), PREFER)
    assert p.gpus == (1, 2, 3, 5)
    assert p.aligned is False and p.remapped is False
    assert p.nvswitches == () and p.fm_partition is None


def test_prefer_alignment_without_slurm_packs_on_one_numa_node(host):
    taken = take(host, *one_gpu_at(0, 4, 8, 12))
    p = place(host, taken, Request(count=4), PREFER)
    assert not p.aligned
    assert len(p.numa_nodes) == 1
    assert not {host.gpu(i).pci for i in p.gpus} & taken.gpus


@pytest.mark.parametrize("machine", ["dgx-h100"])
def test_prefer_alignment_on_h100_gives_no_fm_partition(host):
    taken = take(host, *one_gpu_at(0, 4))
    with pytest.raises(NoFit):
        place(host, taken, Request(count=4))
    p = place(host, taken, Request(count=4, slurm_gpus=(1, 2, 3, 5)), PREFER)
    assert p.gpus == (1, 2, 3, 5) and p.fm_partition is None and not p.aligned


def test_no_fit_when_too_few_gpus_are_free(host):
    taken = take(host, Request(count=8, gpu_index=0), Request(count=4, gpu_index=8))
    with pytest.raises(NoFit) as info:
        place(host, taken, Request(count=8), PREFER)
    assert info.value.resource == "gpus"
    assert "only 4 GPU(s) free" in str(info.value)


# -- cores -----------------------------------------------------------------------------------------
def test_cores_are_never_given_twice(host):
    first = place(host, EMPTY, Request(count=4, slurm_gpus=(5, 6, 7, 11)))
    second = place(host, first.occupancy(), Request(count=4))
    assert second.numa_nodes == first.numa_nodes == (0,)      # both on node 0: a real test
    assert not set(first.cpus) & set(second.cpus)
    assert not set(first.gpus) & set(second.gpus)
    assert not set(first.nvswitches) & set(second.nvswitches)


def test_sixteen_single_gpu_vms_get_disjoint_whole_cores_and_never_the_reserved_ones(host):
    taken, placements = EMPTY, []
    for _ in range(16):
        p = place(host, taken, Request(count=1))
        placements.append(p)
        taken = Occupancy.union([taken, p.occupancy()])
    assert sorted(i for p in placements for i in p.gpus) == list(range(16))
    for a, b in combinations(placements, 2):
        assert not set(a.cpus) & set(b.cpus)
    reserved = {0, 48, 24, 72}                 # core 0 of each socket, both threads
    for p in placements:
        assert_whole_cores(host, p.cpus)
        assert not reserved & set(p.cpus)
        assert set(p.cpus) <= set(host.node(p.numa_nodes[0]).cpus)
    with pytest.raises(NoFit):
        place(host, taken, Request(count=1))


def test_reserved_cores_are_the_emulator_cpus(host):
    p0 = place(host, EMPTY, Request(count=2, gpu_index=0))
    p1 = place(host, EMPTY, Request(count=2, gpu_index=8))
    assert p0.emulator_cpus == (0, 48)
    assert p1.emulator_cpus == (24, 72)
    assert not {0, 48} & set(p0.cpus)


def test_more_reserved_cores_shrink_the_templates(host):
    p = place(host, EMPTY, Request(count=8, gpu_index=0), Policy(reserved_cores_per_node=2))
    assert sorted(p.emulator_cpus) == [0, 1, 48, 49]
    assert p.vcpus == 44                       # 22 usable cores
    assert not {0, 1, 48, 49} & set(p.cpus)


def test_vcpu_order_is_the_pinned_cpu_order(host):
    p = place(host, EMPTY, Request(count=1))
    (cell,) = p.cells
    assert cell.vcpus == tuple(range(len(cell.cpus)))


# -- other machines --------------------------------------------------------------------------------
@pytest.mark.parametrize("machine", ["dgx-a100"])
def test_a100_four_gpu_block_spans_two_numa_nodes_with_a_cell_each(host):
    p = place(host, EMPTY, Request(count=4))
    assert p.gpus == (0, 1, 2, 3) and p.fm_partition == 7
    assert p.numa_nodes == (1, 3)
    assert len(p.cells) == 2
    for cell in p.cells:
        assert set(cell.cpus) <= set(host.node(cell.host_node).cpus)
        assert all(host.gpu(i).numa_node == cell.host_node for i in cell.gpus)
        assert cell.memory_mib > 0
    assert p.cells[0].vcpus + p.cells[1].vcpus == tuple(range(p.vcpus))
    assert p.nvswitches == ()


@pytest.mark.parametrize("machine", ["dgx-h100"])
@pytest.mark.parametrize("count, partitions", [(8, {0}), (4, {1, 2}), (2, {3, 4, 5, 6}),
                                               (1, set(range(7, 15)))])
def test_h100_placements_name_their_fm_partition(host, count, partitions):
    p = place(host, EMPTY, Request(count=count))
    assert p.fm_partition in partitions
    assert p.nvswitches == ()
    assert p.aligned


@pytest.mark.parametrize("machine", ["dgx-h100"])
def test_h100_pair_of_slurm_gpus_is_kept_only_when_it_is_a_partition(host):
    kept = place(host, EMPTY, Request(count=2, slurm_gpus=(0, 2)))
    assert kept.gpus == (0, 2) and kept.fm_partition == 3 and not kept.remapped
    moved = place(host, EMPTY, Request(count=2, slurm_gpus=(0, 1)))
    assert moved.remapped and moved.gpus in {(0, 2), (1, 3), (4, 6), (5, 7)}


@pytest.mark.parametrize("machine", ["dgx-h100"])
def test_h100_fm_partition_in_use_blocks_its_gpus(host):
    taken = Occupancy(fm_partitions=frozenset({1}))
    p = place(host, taken, Request(count=4))
    assert p.gpus == (4, 5, 6, 7) and p.fm_partition == 2


@pytest.mark.parametrize("machine", ["dgx2-degraded"])
def test_degraded_dgx2_never_offers_the_missing_gpu(host):
    p = place(host, EMPTY, Request(count=8))
    assert p.gpus == tuple(range(7, 15))       # board 1: board 0 lost a GPU
    assert "0000:39:00.0" not in p.gpu_pcis


# -- memory and sizing -----------------------------------------------------------------------------
@pytest.mark.parametrize("machine", ["dgx2", "dgx-a100", "dgx-h100"])
def test_memory_is_in_one_gib_huge_pages_and_fits_the_pool(host):
    for size in host.block_sizes:
        p = place(host, EMPTY, Request(count=size))
        assert p.hugepage_kib == ONE_GIB_KIB
        for cell in p.cells:
            pool = host.node(cell.host_node).hugepage_pool(ONE_GIB_KIB)
            assert cell.memory_mib % 1024 == 0
            assert 0 < cell.memory_mib <= pool.total * 1024


def test_without_hugepages_memory_leaves_the_host_reserve(host):
    policy = Policy(hugepage_kib=None)
    p = place(host, EMPTY, Request(count=8, gpu_index=0), policy)
    assert p.hugepage_kib is None
    assert p.memory_mib == host.node(0).memory_mib - policy.reserved_memory_mib_per_node


def test_a_node_whose_memory_is_all_reserved_for_the_host_is_no_fit_saying_so(host):
    """A small host (an H100 cloud VM has 4 GiB) below reserved_memory_mib_per_node: no
    VM of 0 MiB, but a no-fit that names the node and the reserve."""
    policy = Policy(hugepage_kib=None,
                    reserved_memory_mib_per_node=host.node(0).memory_mib + 1)
    with pytest.raises(NoFit) as info:
        place(host, EMPTY, Request(count=1, gpu_index=0), policy)
    assert info.value.resource == "memory"
    assert (f"NUMA node 0 has no memory for VMs: {host.node(0).memory_mib} MiB, of which "
            f"reserved_memory_mib_per_node keeps {host.node(0).memory_mib + 1} MiB") \
        in str(info.value)


def test_memory_already_taken_on_a_node_is_no_fit(host):
    pool_mib = host.node(0).hugepage_pool(ONE_GIB_KIB).total * 1024
    taken = Occupancy(memory_mib={0: pool_mib - 1024})
    with pytest.raises(NoFit) as info:
        place(host, taken, Request(count=2, gpu_index=0))
    assert info.value.resource == "memory"


def test_templates_match_the_sizing_docstring_example(host):
    by_size = {t.gpus: t for t in templates(host, STRICT)}
    assert {k: t.vcpus for k, t in by_size.items()} == {1: 4, 2: 10, 4: 22, 8: 46, 16: 92}
    assert by_size[16].numa_nodes == (0, 1)
    assert by_size[8].numa_nodes == (0,)
    for k, t in by_size.items():
        assert t.disk_gib == max(32, 64 * k)
        assert place(host, EMPTY, Request(count=k)).vcpus == t.vcpus


def test_disk_defaults_to_the_per_gpu_size_with_a_floor(host):
    assert place(host, EMPTY, Request(count=1)).disk_gib == 64
    small = Policy(disk_gib_per_gpu=10, min_disk_gib=32)
    assert place(host, EMPTY, Request(count=1), small).disk_gib == 32
    assert place(host, EMPTY, Request(count=4), small).disk_gib == 40


# -- purity ----------------------------------------------------------------------------------------
def _snapshot(root):
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            st = os.lstat(os.path.join(dirpath, name))
            out[os.path.join(dirpath, name)] = (st.st_mtime_ns, st.st_size)
    return out


def test_place_is_pure(host, tree, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    taken = take(host, *one_gpu_at(3))
    before_taken = Occupancy.union([taken])
    before_tree = _snapshot(tree)
    r = Request(count=4, slurm_gpus=(5, 6, 7, 11))
    a = place(host, taken, r)
    b = place(host, taken, r)
    assert a == b and a.to_json() == b.to_json()
    assert taken == before_taken
    assert list(tmp_path.iterdir()) == []
    assert _snapshot(tree) == before_tree


def test_placement_json_is_what_the_placement_holds(host):
    p = place(host, EMPTY, Request(count=4, slurm_gpus=(5, 6, 7, 11)))
    doc = p.to_json()
    assert doc["gpus"] == [4, 5, 6, 7] and doc["slurm_gpus"] == [5, 6, 7, 11]
    assert doc["cpus"] == list(p.cpus) and doc["vcpus"] == len(p.cpus)
    assert doc["memory_mib"] == sum(c["memory_mib"] for c in doc["cells"])
    assert doc["memory_mib_per_node"] == {"0": p.memory_mib}


@pytest.mark.parametrize("machine", ["dgx2", "dgx-a100", "dgx-h100"])
def test_every_gpu_has_a_compute_nic_behind_its_own_pcie_switch(host, machine):
    for g in host.gpus:
        kinds = {n.pci: n.kind for n in host.nics}
        assert g.nics and all(kinds[pci] == "infiniband" for pci in g.nics), (g.index, g.nics)


@pytest.mark.parametrize("machine", ["dgx2"])
def test_placement_nics_are_the_gpus_nearest_not_a_storage_card_on_the_upper_switch(host):
    p = place(host, EMPTY, Request(count=2, gpu_index=14))
    # GPUs 14-15 share their second-level switch with the CX-5 at e6; the dual-port Ethernet
    # card at dc sits on the first-level switch above GPUs 12-15 and is not theirs.
    assert p.nics == ("0000:e6:00.0",)
    quad = place(host, EMPTY, Request(count=4, gpu_index=0))
    assert quad.nics == ("0000:35:00.0", "0000:3a:00.0")
