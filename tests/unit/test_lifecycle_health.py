"""GPU health in the lifecycle: every teardown resets and checks the VM's devices before the
ledger gives them out again; a device that fails is quarantined, named in the record, and left
out of every placement after it; a create checks the devices it chose before launch.

The ledger, placement, the VM record, the health record and the simulated sysfs (with injected
faults) are real; the steps that need a booting guest are the stand-ins of
test_lifecycle_stages.py."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from slurm_dgxvm.errors import GuestTimeout, NoFit
from slurm_dgxvm.fabric import Fabric
from slurm_dgxvm.health import device_checks as health_checks
from slurm_dgxvm.lifecycle import create, delete
from slurm_dgxvm.simulate import render
from slurm_dgxvm.simulate.faults import inject
from slurm_dgxvm.observe.stages import StageTimer
from test_lifecycle_stages import FakeDom, make_env, request, stand_ins  # noqa: F401
from test_slurm_hooks import image_store  # noqa: F401 - a fixture


@pytest.fixture
def own_tree(tmp_path):
    """Render a machine of the test's own: faults change it."""
    def make(machine="dgx2"):
        return {machine: render(machine, tmp_path / f"sys-{machine}")}
    return make


def _undo_dom(monkeypatch, name):
    """libvirt's view: ``name`` is a running domain (that stops when asked), nothing else."""
    from slurm_dgxvm.virt import hypervisor
    monkeypatch.setattr(hypervisor, "lookup", lambda conn, n: FakeDom() if n == name else None)


def test_a_teardown_resets_every_device_of_the_vm_then_releases(tmp_path, own_tree, image_store,
                                                                 stand_ins, monkeypatch):
    clock, _ = stand_ins
    env = make_env(tmp_path, own_tree(), image_store, shutdown_timeout_s=0.2)
    rec = create(env, request(count=8, name="t8"), timer=StageTimer(clock))
    devices = [*rec.allocation.gpu_pcis, *rec.allocation.nvswitches]
    assert rec.allocation.nvswitches                       # full passthrough: switches too
    _undo_dom(monkeypatch, "t8")
    done = delete(env, "t8")
    assert list(done.teardown_stages) == ["shutdown", "undefine", "reset", "release"]
    assert set(done.gpu_resets) == set(devices) and done.quarantined == {}
    health = env.health.read()
    assert all(health[p].resets == 1 and health[p].last_reset["ok"] for p in devices)
    assert env.ledger.read().allocations == {}


def test_a_gpu_whose_reset_fails_is_quarantined_before_release_and_never_placed_again(
        tmp_path, own_tree, image_store, stand_ins, monkeypatch):
    clock, _ = stand_ins
    trees = own_tree()
    env = make_env(tmp_path, trees, image_store, shutdown_timeout_s=0.2)
    rec = create(env, request(count=16, name="t16", ), timer=StageTimer(clock))
    bad = rec.allocation.gpu_pcis[5]
    inject(trees["dgx2"], bad, "reset-fail")
    seen_at_release = {}
    real_release = env.ledger.release

    def release(key):
        seen_at_release["quarantined"] = set(env.health.quarantined())
        return real_release(key)
    monkeypatch.setattr(env.ledger, "release", release)
    _undo_dom(monkeypatch, "t16")
    done = delete(env, "t16", job_id=None)
    assert seen_at_release["quarantined"] == {bad}          # quarantined first, then released
    assert list(done.quarantined) == [bad] and done.quarantined[bad].startswith("reset failed")
    q = env.health.read()[bad]
    assert q.quarantined and q.vm == "t16" and q.history[-1]["by"] == "teardown of t16"
    # degraded, not out of service: no 16-GPU VM, but an 8-GPU VM from the healthy board
    with pytest.raises(NoFit, match=f"quarantined .*{bad}"):
        create(env, request(count=16, name="again16"), timer=StageTimer(clock))
    rec8 = create(env, request(count=8, name="again8"), timer=StageTimer(clock))
    assert bad not in rec8.allocation.gpu_pcis


def test_a_create_checks_the_gpus_it_chose_and_places_again_without_a_failing_one(
        tmp_path, own_tree, image_store, stand_ins):
    clock, _ = stand_ins
    trees = own_tree()
    env = make_env(tmp_path, trees, image_store)
    first_choice = create(env, request(count=1, name="probe1"), timer=StageTimer(clock))
    chosen = first_choice.allocation.gpu_pcis[0]
    env.ledger.release(first_choice.ledger_key)
    env.vms.remove_dir("probe1")
    inject(trees["dgx2"], chosen, "fell-off-bus")
    rec = create(env, request(count=1, name="t1"), timer=StageTimer(clock))
    assert rec.allocation.gpu_pcis[0] != chosen
    q = env.health.read()[chosen]
    assert q.quarantined and q.reason == "config space reads all ones (fell off the bus)"
    assert q.history[-1]["by"] == "create of t1"
    assert set(env.ledger.read().allocations) == {rec.ledger_key}     # one VM, one entry


def test_on_a_fabric_manager_machine_the_partition_is_off_before_the_reset(
        tmp_path, own_tree, image_store, stand_ins, monkeypatch):
    clock, _ = stand_ins
    env = make_env(tmp_path, own_tree("dgx-a100"), image_store, machine="dgx-a100",
                   shutdown_timeout_s=0.2)
    rec = create(env, request(count=2, name="a2"), timer=StageTimer(clock))
    order = []
    fabric = env.fabric
    real_deactivate, real_reset = fabric.deactivate, health_checks.reset_devices
    monkeypatch.setattr(fabric, "deactivate", lambda fm: (order.append(("fm off", fm)),
                                                          real_deactivate(fm)))
    monkeypatch.setattr(health_checks, "reset_devices",
                        lambda sysfs, pcis, **kw: (order.append(("reset", tuple(pcis))),
                                                   real_reset(sysfs, pcis, **kw))[1])
    _undo_dom(monkeypatch, "a2")
    done = delete(env, "a2")
    assert order == [("fm off", rec.placement.fm_partition),
                     ("reset", tuple(rec.allocation.gpu_pcis))]   # NVSwitches stay with FM
    assert "reset" in done.teardown_stages and fabric.active == set()


def test_a_vm_whose_partition_fabric_manager_lost_is_torn_down_entirely(
        tmp_path, own_tree, image_store, stand_ins, monkeypatch):
    """Fabric Manager restarted (no resiliency mode) under a running VM: its partition is
    inactive when the VM is deleted. The teardown takes that as done (no `fmpm -d` of an
    inactive partition, which FM refuses), resets the GPUs and releases everything."""
    standin = Path(__file__).resolve().parents[2] / "tools" / "fmpm-standin" / "fmpm"
    monkeypatch.setenv("FMPM_STANDIN_STATE", str(tmp_path / "fm.json"))
    monkeypatch.delenv("FMPM_STANDIN_PARTITIONS", raising=False)
    clock, _ = stand_ins
    env = make_env(tmp_path, own_tree("dgx-h100"), image_store, machine="dgx-h100",
                   shutdown_timeout_s=0.2)
    env.__dict__["fabric"] = Fabric(str(standin), timeout_s=30)
    rec = create(env, request(count=2, name="h2"), timer=StageTimer(clock))
    fm = rec.placement.fm_partition
    assert env.fabric.list()[fm] is True
    subprocess.run([str(standin), "--standin-restart"], check=True, capture_output=True)
    ran = []
    real_run = env.fabric._run
    monkeypatch.setattr(env.fabric, "_run", lambda args, *a, **k: (ran.append(args[0]),
                                                                    real_run(args, *a, **k))[1])
    _undo_dom(monkeypatch, "h2")
    done = delete(env, "h2")
    assert "-d" not in ran and "reset" in done.teardown_stages
    assert set(done.gpu_resets) == set(rec.allocation.gpu_pcis)
    assert env.ledger.read().allocations == {} and not env.vms.dir("h2").exists()
    assert not any(env.fabric.list().values())


def test_a_create_that_fails_after_start_resets_the_devices_the_guest_had(
        tmp_path, own_tree, image_store, stand_ins):
    clock, fail = stand_ins
    fail["wait_for_guest"] = GuestTimeout(name="t2", timeout=300, reason="no agent", tail="")
    env = make_env(tmp_path, own_tree(), image_store)
    with pytest.raises(GuestTimeout):
        create(env, request(count=2, name="t2"), timer=StageTimer(clock))
    health = env.health.read()
    reset = {p for p, d in health.items() if d.resets == 1}
    gpus = {g.pci for g in env.host.gpus}
    switches = {s.pci for s in env.host.nvswitches}
    assert len(reset & gpus) == 2 and reset - gpus <= switches      # its GPUs (and NVSwitches)
    assert env.ledger.read().allocations == {}


def test_with_reset_off_the_teardown_still_checks(tmp_path, own_tree, image_store, stand_ins,
                                                  monkeypatch):
    clock, _ = stand_ins
    trees = own_tree()
    env = make_env(tmp_path, trees, image_store, shutdown_timeout_s=0.2)
    env.cfg = env.cfg.__class__(**{**env.cfg.__dict__,
                                   "health": env.cfg.health.__class__(reset=False)})
    rec = create(env, request(count=1, name="t1"), timer=StageTimer(clock))
    inject(trees["dgx2"], rec.allocation.gpu_pcis[0], "aer-fatal")
    _undo_dom(monkeypatch, "t1")
    done = delete(env, "t1")
    assert done.gpu_resets == {} and list(done.quarantined) == [rec.allocation.gpu_pcis[0]]


def test_deleting_a_crashed_vm_never_resets_gpus_another_vm_took_since(
        tmp_path, own_tree, image_store, stand_ins, monkeypatch):
    """The libvirt hook reset a crashed VM's GPUs and gave them back; a new VM took them. The
    crashed VM's later delete (its job's Epilog) must neither reset them nor switch their
    Fabric Manager partition off under the new VM."""
    from slurm_dgxvm.lifecycle import hook
    clock, _ = stand_ins
    env = make_env(tmp_path, own_tree("dgx-a100"), image_store, machine="dgx-a100",
                   shutdown_timeout_s=0.2)
    crashed = create(env, request(count=2, name="c2"), timer=StageTimer(clock))
    hook(env, "c2", "release", "end")                         # the guest crashed
    again = create(env, request(count=2, name="n2"), timer=StageTimer(clock))
    assert again.allocation.gpu_pcis == crashed.allocation.gpu_pcis   # the same GPUs
    resets = {p: env.health.read()[p].resets for p in again.allocation.gpu_pcis}
    monkeypatch.setattr("slurm_dgxvm.virt.hypervisor.lookup", lambda conn, n: None)
    done = delete(env, "c2")
    assert "reset" not in done.teardown_stages
    assert set(done.gpu_resets) == set(crashed.allocation.gpu_pcis)   # the hook's, recorded
    assert {p: env.health.read()[p].resets for p in again.allocation.gpu_pcis} == resets
    assert env.fabric.active == {again.placement.fm_partition}
    assert set(env.ledger.read().allocations) == {again.ledger_key}
