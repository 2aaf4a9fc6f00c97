"""Which InfiniBand functions a VM gets beside its GPUs (placement.ib): one of each GPU's nearest
HCA, never given twice, as the hardware notes pair HCAs with GPUs (GDS for the DGX A100, the
H100 User Guide's table 6 for the DGX H100)."""

from __future__ import annotations

import pytest

from slurm_dgxvm.errors import NoFit, RequestError
from slurm_dgxvm.ledger import Allocation
from slurm_dgxvm.placement import EMPTY, Occupancy, Placement, Policy, Request, place

# H100UG table 6: GPU index -> its OSFP HCA's bus
H100_HCA = dict(enumerate("18 40 4f 5e 9a c0 ce dc".split()))


def taken_by(*placements) -> Occupancy:
    return Occupancy.union(p.occupancy() for p in placements)


@pytest.mark.parametrize("machine", ["dgx-h100"])
def test_eight_single_gpu_vms_each_get_a_vf_of_their_own_gpus_hca(host):
    done = []
    for _ in range(8):
        done.append(place(host, taken_by(*done), Request(count=1, ib="vf"), Policy()))
    for p in done:
        (f,) = p.ib
        assert f.gpu == p.gpus[0] and f.hca == f"0000:{H100_HCA[f.gpu]}:00.0"
        assert f.vf == 0 and f.pci == f"0000:{H100_HCA[f.gpu]}:00.1"


@pytest.mark.parametrize("machine", ["dgx-a100"])
def test_two_vms_on_one_hca_get_different_vfs(host):
    """GPU 0 and GPU 1 each take mlx5_0 (0c) first in a 1-GPU VM: VFs 0 and 1 of it."""
    a = place(host, EMPTY, Request(count=1, gpu_index=1, ib="vf"), Policy())
    b = place(host, taken_by(a), Request(count=1, gpu_index=0, ib="vf"), Policy())
    assert [(f.hca, f.vf) for f in a.ib] == [("0000:0c:00.0", 0)]
    assert [(f.hca, f.vf) for f in b.ib] == [("0000:0c:00.0", 1)]
    assert not set(a.occupancy().ib_functions) & set(b.occupancy().ib_functions)


@pytest.mark.parametrize("machine", ["dgx-a100"])
def test_port_mode_gives_the_next_hca_when_the_nearest_port_is_taken(host):
    a = place(host, EMPTY, Request(count=1, gpu_index=1, ib="port"), Policy())
    b = place(host, taken_by(a), Request(count=1, gpu_index=0, ib="port"), Policy())
    assert [f.pci for f in a.ib] == ["0000:0c:00.0"] and a.ib[0].vf is None
    assert [f.pci for f in b.ib] == ["0000:12:00.0"]


@pytest.mark.parametrize("machine", ["dgx-a100"])
def test_a_port_with_a_vf_in_use_is_not_given_whole_and_the_other_way_round(host):
    vf = place(host, EMPTY, Request(count=1, gpu_index=1, ib="vf"), Policy())       # 0c VF 0
    port = place(host, taken_by(vf), Request(count=1, gpu_index=0, ib="port"), Policy())
    assert [f.pci for f in port.ib] == ["0000:12:00.0"]
    # GPU 0 free again, its HCAs still held: 0c has a VF in a VM, 12 is in one whole
    held = Occupancy(ib_functions=vf.occupancy().ib_functions | port.occupancy().ib_functions)
    with pytest.raises(NoFit) as info:
        place(host, held, Request(count=1, gpu_index=0, ib="port"), Policy())
    assert info.value.resource == "ib"
    assert "0000:0c:00.0, 0000:12:00.0 have no port free" in str(info.value)
    with pytest.raises(NoFit):              # and a VF of a port that is in a VM whole is not free
        place(host, Occupancy(ib_functions=frozenset({"0000:0c:00.0", "0000:12:00.0"})),
              Request(count=1, gpu_index=0, ib="vf"), Policy())


@pytest.mark.parametrize("machine", ["dgx-h100"])
def test_a_hca_whose_vfs_are_all_taken_is_no_fit_naming_it(host):
    taken = Occupancy(ib_functions=frozenset(vf.pci for vf in host.nic_by_pci["0000:18:00.0"].vfs))
    with pytest.raises(NoFit) as info:
        place(host, taken, Request(count=1, gpu_index=0, ib="vf"), Policy())
    assert info.value.resource == "ib"
    assert "GPU 0's InfiniBand HCAs 0000:18:00.0 have no free VF" in str(info.value)
    # another GPU's block is still offered when none is asked for
    p = place(host, taken, Request(count=1, ib="vf"), Policy())
    assert p.gpus != (0,) and p.ib


def test_dgx2_has_no_vfs_to_give(host):
    with pytest.raises(RequestError, match="SR-IOV VF enabled"):
        place(host, EMPTY, Request(count=2, ib="vf"), Policy())
    assert place(host, EMPTY, Request(count=2, ib="port"), Policy()).ib   # its CX-5 ports


@pytest.mark.parametrize("machine", ["dgx-h100"])
def test_an_unknown_mode_is_refused_naming_it(host):
    with pytest.raises(RequestError, match="ib rdma is not one of") as info:
        place(host, EMPTY, Request(count=1, ib="rdma"), Policy())
    assert "none, vf, port" in str(info.value)


@pytest.mark.parametrize("machine", ["dgx-h100"])
def test_the_ledger_records_the_functions_and_refuses_them_twice(host):
    p = place(host, EMPTY, Request(count=2, ib="vf"), Policy())
    a = Allocation.from_placement("job:1", p, owner="job", job_id=1, domain="job-1", now=1.0)
    assert a.ib_functions == tuple(f.pci for f in p.ib) and len(a.ib_functions) == 2
    assert Allocation.from_json(a.to_json()) == a
    assert a.occupancy().ib_functions == frozenset(a.ib_functions)
    again = Placement.from_json(p.to_json())
    assert again == p


@pytest.mark.parametrize("machine", ["dgx-h100"])
def test_without_ib_the_json_is_as_before(host):
    p = place(host, EMPTY, Request(count=2), Policy())
    assert "ib" not in p.to_json() and "ib_mode" not in p.to_json()
    a = Allocation.from_placement("job:1", p, owner="job", job_id=1, domain="job-1", now=1.0)
    assert "ib_functions" not in a.to_json()
