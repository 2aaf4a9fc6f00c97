"""Property tests: long random sequences of allocate/release through placement and the ledger.

Invariants checked after every step, on every machine fixture:
  - no GPU, core, NVSwitch or FM partition is ever held twice;
  - when an aligned free block of the requested size exists, placement finds one (the sizing
    templates guarantee cores and memory for it);
  - the ledger on disk always equals the ledger in memory (the model kept by the test).
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from slurm_dgxvm.errors import NoFit
from slurm_dgxvm.ledger import Allocation, Ledger
from slurm_dgxvm.placement import Occupancy, Policy, Request, place
from slurm_dgxvm.simulate import render
from slurm_dgxvm.topology import SysfsRoot, discover

_HOSTS: dict[str, object] = {}


def _host(machine: str):
    if machine not in _HOSTS:
        tree = tempfile.mkdtemp(prefix=f"dgxvm-prop-{machine}-")
        try:
            missing = ("0000:39:00.0",) if machine == "dgx2-degraded" else ()
            render("dgx2" if machine == "dgx2-degraded" else machine, tree, missing_gpus=missing)
            _HOSTS[machine] = discover(SysfsRoot(tree))
        finally:
            shutil.rmtree(tree)
    return _HOSTS[machine]


def _free_block_exists(host, taken: Occupancy, count: int) -> bool:
    free = {g.index for g in host.gpus if g.pci not in taken.gpus}
    return any(set(b.gpus) <= free
               and not set(b.nvswitches) & taken.nvswitches
               and b.fm_partition not in taken.fm_partitions
               for b in host.blocks_by_size.get(count, ()))


def machine_for(machine: str, policy: Policy):
    class AllocateRelease(RuleBasedStateMachine):
        @initialize()
        def setup(self):
            self.host = _host(machine)
            self.dir = tempfile.mkdtemp(prefix="dgxvm-ledger-")
            self.ledger = Ledger(self.dir, lock_timeout=5)
            self.model: dict[str, Allocation] = {}
            self.next_job = 1

        def teardown(self):
            shutil.rmtree(getattr(self, "dir", ""), ignore_errors=True)

        @rule(data=st.data(), use_slurm=st.booleans())
        def allocate(self, data, use_slurm):
            host = self.host
            # sizes with at least one healthy block (a degraded DGX-2 has no 16-GPU block left)
            count = data.draw(st.sampled_from(sorted(host.blocks_by_size)), label="count")
            slurm = None
            if use_slurm and count <= len(host.gpus):
                slurm = tuple(sorted(data.draw(
                    st.lists(st.integers(0, len(host.gpus) - 1), min_size=count, max_size=count,
                             unique=True), label="slurm_gpus")))
            key = f"job:{self.next_job}"
            self.next_job += 1
            with self.ledger.transaction() as txn:
                taken = txn.occupancy()
                exists = _free_block_exists(host, taken, count)
                try:
                    p = place(host, taken, Request(count=count, slurm_gpus=slurm), policy)
                except NoFit as exc:
                    assert not exists, f"an aligned free {count}-GPU block exists but: {exc}"
                    if policy.alignment == "strict":
                        assert exc.resource in ("gpus", "aligned-block"), exc
                    return
                if policy.alignment == "strict":
                    assert p.aligned
                if exists:
                    assert p.aligned, "an aligned block was free but an unaligned set was taken"
                alloc = Allocation.from_placement(key, p, owner="job", job_id=self.next_job - 1,
                                                  domain=f"dgxvm-job-{self.next_job - 1}")
                txn.allocate(alloc)
            self.model[key] = alloc

        @precondition(lambda self: bool(self.model))
        @rule(data=st.data())
        def release(self, data):
            key = data.draw(st.sampled_from(sorted(self.model)), label="release")
            released = self.ledger.release(key)
            assert released == self.model.pop(key)

        @rule()
        def release_unknown_is_noop(self):
            before = self.ledger.read()
            assert self.ledger.release("job:999999") is None
            assert self.ledger.read().allocations == before.allocations

        @invariant()
        def disk_equals_memory(self):
            if hasattr(self, "ledger"):
                assert dict(self.ledger.read().allocations) == self.model

        @invariant()
        def nothing_held_twice(self):
            if not hasattr(self, "model"):
                return
            for what in ("gpu_pcis", "cpus", "nvswitches"):
                c = Counter(x for a in self.model.values() for x in getattr(a, what))
                assert not [x for x, n in c.items() if n > 1], f"{what} held twice: {c}"
            fm = Counter(a.fm_partition for a in self.model.values() if a.fm_partition is not None)
            assert all(n == 1 for n in fm.values())
            reserved = {t for n in self.host.numa_nodes
                        for c in self.host.cores_by_node[n.id][:policy.reserved_cores_per_node]
                        for t in c.threads}
            assert not reserved & {x for a in self.model.values() for x in a.cpus}

        @invariant()
        def memory_within_budget(self):
            if not hasattr(self, "model"):
                return
            used = Counter()
            for a in self.model.values():
                for node, mib in a.memory_mib.items():
                    used[int(node)] += mib
            for node, mib in used.items():
                pool = self.host.node(node).hugepage_pool(1048576)
                assert mib <= pool.total * 1024

    # data_too_large: 40 steps, each drawing up to 16 GPU indices, now and then overrun the
    # example buffer of Debian's Hypothesis (6.67); those examples are dropped, not failed, and
    # the health check failed the test for it (about 1 run in 40; invariants unchanged)
    AllocateRelease.TestCase.settings = settings(
        max_examples=25, stateful_step_count=40, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    return AllocateRelease


@pytest.mark.parametrize("machine", ["dgx2", "dgx-a100", "dgx-h100", "dgx2-degraded"])
@pytest.mark.parametrize("alignment", ["strict", "prefer"])
def test_random_allocate_release_sequences_keep_the_invariants(machine, alignment):
    machine_for(machine, Policy(alignment=alignment)).TestCase().runTest()
