"""gres.conf for a VM host: one VFIO group per GPU, in PCI order, Cores= per socket."""

from __future__ import annotations

import dataclasses
import re

import pytest

from slurm_dgxvm.errors import TopologyError
from slurm_dgxvm.topology.gres import gres_conf, slurm_core_ids

LINE = re.compile(r"^(?:NodeName=(\S+) )?Name=gpu File=(\S+)/(\d+)(?: Cores=(\S+))?$")


def gpu_lines(text: str) -> list[re.Match]:
    lines = [line for line in text.splitlines() if "Name=gpu" in line and not line.startswith("#")]
    matches = [LINE.match(line) for line in lines]
    assert all(matches), lines
    return matches


def test_dgx2_lists_16_vfio_groups_in_pci_order_with_socket_cores(host):
    lines = gpu_lines(gres_conf(host))
    assert len(lines) == 16
    assert [int(m.group(3)) for m in lines] == [g.iommu_group for g in host.gpus]
    assert {m.group(2) for m in lines} == {"/dev/vfio"}
    # the simulator numbers IOMMU groups in bus order, so PCI order shows as ascending groups
    groups = [int(m.group(3)) for m in lines]
    assert groups == sorted(groups)
    assert [m.group(4) for m in lines] == ["0-23"] * 8 + ["24-47"] * 8


def test_each_gpu_line_is_preceded_by_a_comment_naming_its_pci_address(host):
    text = gres_conf(host).splitlines()
    for g in host.gpus:
        comment = next(i for i, line in enumerate(text) if line.startswith(f"# GPU {g.index}:"))
        assert g.pci in text[comment]
        assert text[comment + 1].startswith("Name=gpu File=/dev/vfio/")
        assert text[comment + 1].split()[1] == f"File=/dev/vfio/{g.iommu_group}"


def test_the_footer_gives_the_slurm_conf_gres_count(host):
    assert gres_conf(host).rstrip().endswith("Gres=gpu:16")


def test_a_simulated_host_says_so(host):
    assert "# SIMULATED host" in gres_conf(host)


@pytest.mark.parametrize("machine", ["dgx2-degraded"])
def test_degraded_dgx2_lists_15_gpus_and_comments_the_missing_one(host):
    text = gres_conf(host)
    lines = gpu_lines(text)
    assert len(lines) == 15
    assert [int(m.group(3)) for m in lines] == [g.iommu_group for g in host.gpus]
    missing = [line for line in text.splitlines() if "0000:39:00.0" in line]
    assert len(missing) == 1 and missing[0].startswith("#") and "missing" in missing[0]
    # b7:00.0 (numa_node -1, node from local_cpulist) is still bound to socket 1's cores
    assert [m.group(4) for m in lines] == ["0-23"] * 7 + ["24-47"] * 8
    assert text.rstrip().endswith("Gres=gpu:15")


@pytest.mark.parametrize("machine, cores", [
    # A100: GPU NUMA nodes 3,3,1,1 are socket 0 (nodes 0-3), 7,7,5,5 socket 1; 64 cores a socket
    ("dgx-a100", ["0-63"] * 4 + ["64-127"] * 4),
    ("dgx-h100", ["0-55"] * 4 + ["56-111"] * 4),
])
def test_cores_are_slurm_abstract_ids_of_the_gpu_socket(host, cores):
    assert [m.group(4) for m in gpu_lines(gres_conf(host))] == cores


def test_node_name_and_dev_dir_options(host):
    lines = gpu_lines(gres_conf(host, dev_dir="/tmp/vfio/", node_name="dgx01"))
    assert {m.group(1) for m in lines} == {"dgx01"}
    assert {m.group(2) for m in lines} == {"/tmp/vfio"}


def test_slurm_core_ids_number_cores_socket_by_socket(host):
    assert slurm_core_ids(host, 0) == tuple(range(24))
    assert slurm_core_ids(host, 1) == tuple(range(24, 48))


def test_a_gpu_without_an_iommu_group_is_a_topology_error(host):
    gpus = (dataclasses.replace(host.gpus[0], iommu_group=None),) + host.gpus[1:]
    broken = dataclasses.replace(host, gpus=gpus)
    with pytest.raises(TopologyError) as info:
        gres_conf(broken)
    assert host.gpus[0].pci in str(info.value)
    assert "IOMMU" in str(info.value)
