"""The load and soak benchmarks, small, on the session's Slurm node (CI smoke of
benchmarks/load_bench.py and benchmarks/soak_bench.py; the code is theirs, harness/soak.py):
four `dgxvm prolog` processes released at one moment get their own GPUs and cores and the
ledger agrees with libvirt; a mini-soak of 6 jobs of 1-8 GPUs through Slurm with a GPU whose
reset fails (quarantined at its job's end, given to no VM, then cleared) and a Prolog SIGKILLed
after it defined the domain (the node drains, the job is held; resumed and released). The
fault module's Prolog cases leave "define" to this one.
Both end with nothing left on the node: no domain, QEMU, VM directory, ledger entry, DHCP
reservation or fault point; and no two VMs ever shared a GPU or a CPU."""

from __future__ import annotations

import pytest

from harness.soak import Node, Soak, failed, leftovers, load, print_checks

pytestmark = pytest.mark.integration


def test_four_prologs_at_once_get_their_own_gpus_and_cores_and_leave_nothing(slurm_node,
                                                                              tmp_path):
    node = Node.of_fixture(slurm_node)
    assert leftovers(node) == []
    checks, fig = load(node, 4, config=node.hooks_config(tmp_path / "hooks.toml"),
                       first_job=910001, deadline_s=400)
    print_checks("4 Prologs at once", checks)
    assert failed(checks) == []
    assert len(fig["lock_s"]) == 4


def test_a_mini_soak_with_two_faults_ends_clean_and_every_job_accounted(slurm_node):
    node = Node.of_fixture(slurm_node)
    slurm_node.cluster.wait_idle(timeout=120)
    soak = Soak(node, jobs=6, fault_every=3, faults=("gpu:reset-fail", "prolog:define"),
                hold=1.0, fault_hold=6.0, sample_every=5, clear_after=1)
    checks = soak.run()
    print_checks("mini-soak: 6 jobs, 2 faults", checks)
    assert failed(checks) == []
    assert sorted(j.fault for j in soak.jobs.values() if j.fault) == ["gpu:reset-fail",
                                                                      "prolog:define"]
    assert soak.quarantines and all(q["cleared"] for q in soak.quarantines)
