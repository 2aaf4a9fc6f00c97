"""A job's InfiniBand plan (ibpart.plan): its partition key, the GUIDs of its VM's functions and
the commands that set them, from a real placement on the simulated DGX H100."""

from __future__ import annotations

import pytest

from slurm_dgxvm.errors import RequestError
from slurm_dgxvm.ibpart import IbPlan, Member, pkey_for, plan_for, vf_guid
from slurm_dgxvm.placement import EMPTY, Policy, Request, place

pytestmark = pytest.mark.parametrize("machine", ["dgx-h100"])


@pytest.mark.parametrize("job,lo,hi,want", [
    (42, 4096, 32766, 0x102a),
    (0, 4096, 32766, 4096),
    (28671, 4096, 32766, 4096),          # the range wraps after 28671 keys
    (28670, 4096, 32766, 32766),
    (7, 1, 32766, 8),
    (10 ** 9, 1, 0x7ffe, 1 + 10 ** 9 % 0x7ffe),
])
def test_pkey_is_job_id_mod_the_range_and_never_the_default(machine, job, lo, hi, want):
    key = pkey_for(job, lo, hi)
    assert key == want and 1 <= key <= 0x7ffe


@pytest.mark.parametrize("lo,hi", [(0, 10), (10, 9), (1, 0x7fff), (-5, 3)])
def test_a_range_outside_the_valid_keys_is_refused(machine, lo, hi):
    with pytest.raises(RequestError, match="is not within 1..32766"):
        pkey_for(1, lo, hi)


def test_the_full_membership_bit_is_added_only_where_a_p_key_table_holds_it(machine):
    plan = IbPlan(job_id=42, pkey=0x102a, members=())
    assert plan.pkey_hex == "0x102a" and plan.full_pkey == 0x902a


def test_vf_guids_are_locally_administered_and_distinct_per_vf_and_hca(machine):
    a = [vf_guid("0xb8cef60300001800", i) for i in range(8)]
    b = [vf_guid("0xb8cef60300004000", i) for i in range(8)]
    assert a[3] == "0x02f60300001800" + "03"
    assert len(set(a + b)) == 16 and all(int(g, 16) >> 56 == 0x02 for g in a + b)


def test_plan_of_a_two_gpu_vf_vm_names_each_vf_its_guid_and_commands(host, machine):
    # the 2-GPU block is Fabric Manager partition 3, modules 1 and 3: GPUs 0 and 2 (18, 4f)
    p = place(host, EMPTY, Request(count=2, ib="vf"), Policy())
    plan = plan_for(42, p, host)
    assert plan.pkey == 0x102a
    assert plan.members == (
        Member(pci="0000:18:00.1", hca="0000:18:00.0", vf=0, guid="0x02f60300001800" + "00",
               netdev="ibp24s0"),
        Member(pci="0000:4f:00.1", hca="0000:4f:00.0", vf=0, guid="0x02f60300004f00" + "00",
               netdev="ibp79s0"),
    )
    assert plan.guid_commands() == (
        ("ip", "link", "set", "dev", "ibp24s0", "vf", "0", "node_guid", "02:f6:03:00:00:18:00:00"),
        ("ip", "link", "set", "dev", "ibp24s0", "vf", "0", "port_guid", "02:f6:03:00:00:18:00:00"),
        ("ip", "link", "set", "dev", "ibp79s0", "vf", "0", "node_guid", "02:f6:03:00:00:4f:00:00"),
        ("ip", "link", "set", "dev", "ibp79s0", "vf", "0", "port_guid", "02:f6:03:00:00:4f:00:00"),
    )


def test_a_whole_port_keeps_its_own_guid_and_needs_no_command(host, machine):
    p = place(host, EMPTY, Request(count=1, ib="port"), Policy())
    plan = plan_for(7, p, host, pkey_min=100, pkey_max=200)
    assert plan.guids == (host.nic_by_pci["0000:18:00.0"].node_guid,)
    assert plan.guid_commands() == () and plan.pkey == 107


def test_no_ib_is_an_empty_plan(host, machine):
    assert plan_for(1, place(host, EMPTY, Request(count=1), Policy()), host).members == ()
