"""The per-VM lock (lifecycle/vmlock.py) with real processes: who holds it, that it dies with a
SIGKILLed holder, that create and delete hold it, and that no lock file is left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_dgxvm import config as config_mod
from slurm_dgxvm.errors import LockTimeout
from slurm_dgxvm.lifecycle import Env
from slurm_dgxvm.lifecycle import vmlock

REPO = Path(__file__).resolve().parents[2]

HOLDER = """
import sys, time
from slurm_dgxvm.lifecycle import vmlock
with vmlock.held(sys.argv[1], sys.argv[2], timeout=5):
    print("held", flush=True)
    time.sleep(float(sys.argv[3]))
"""


class Holder:
    """A child process holding ``name``'s lock (as a Prolog's create would)."""

    def __init__(self, state_dir: Path, name: str, seconds: float = 60):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(state_dir), name,
                                      str(seconds)], stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": str(REPO)})
        assert self.proc.stdout.readline().strip() == "held"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def wait(self) -> None:
        self.proc.wait(timeout=30)


@pytest.fixture
def state(tmp_path) -> Path:
    return tmp_path / "state"


def test_a_lock_another_process_holds_is_seen_and_not_taken(state):
    holder = Holder(state, "job-42")
    try:
        assert vmlock.is_held(state, "job-42")
        assert vmlock.held_names(state) == ["job-42"]
        with vmlock.try_held(state, "job-42") as got:
            assert got is False
        assert not vmlock.is_held(state, "job-7")
    finally:
        holder.kill()


def test_a_sigkilled_holder_frees_the_lock_and_the_next_taker_removes_its_file(state):
    """A Prolog killed mid-create (SIGKILL runs no cleanup) must not keep its VM locked."""
    holder = Holder(state, "job-42")
    holder.kill()
    path = vmlock.lock_path(state, "job-42")
    assert path.exists()                              # the killed process left its file
    assert not vmlock.is_held(state, "job-42")
    assert path.exists()                              # a probe changes nothing (--dry-run)
    with vmlock.try_held(state, "job-42") as got:
        assert got is True
    assert not path.exists()                          # released: no file accumulates
    assert list(vmlock.lock_dir(state).iterdir()) == []


def test_held_waits_for_a_holder_that_ends_and_times_out_on_one_that_does_not(state):
    holder = Holder(state, "vm1", seconds=0.5)
    t0 = time.monotonic()
    with vmlock.held(state, "vm1", timeout=30):
        assert time.monotonic() - t0 >= 0.2           # it waited for the holder to end
    holder.wait()
    holder = Holder(state, "vm1")
    try:
        with pytest.raises(LockTimeout) as info:
            with vmlock.held(state, "vm1", timeout=0.3):
                pytest.fail("took a lock another process holds")
        assert info.value.exit_code == 5
        assert "another dgxvm is creating or deleting vm1" in str(info.value)
        assert str(vmlock.lock_path(state, "vm1")) in str(info.value)
    finally:
        holder.kill()


def test_the_lock_is_reentrant_in_one_process_and_exclusive_across_processes(state):
    """reconcile holds a name's lock and calls delete, which takes it again."""
    with vmlock.held(state, "vm1", timeout=1):
        with vmlock.try_held(state, "vm1") as again:
            assert again is True
            with vmlock.held(state, "vm1", timeout=0):
                pass
        assert vmlock.lock_path(state, "vm1").exists()   # the outer hold still has it
        probe = subprocess.run([sys.executable, "-c",
                                "import sys; from slurm_dgxvm.lifecycle import vmlock; "
                                "print(vmlock.is_held(sys.argv[1], 'vm1'))", str(state)],
                               capture_output=True, text=True, timeout=30,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
        assert probe.stdout.strip() == "True"
    assert not vmlock.lock_path(state, "vm1").exists()


def test_a_taker_of_a_file_removed_under_it_locks_the_new_one(state):
    """The last holder removes the file as it releases; one that opened the old file and got
    its lock afterwards must not think it holds the name (another may hold the new file)."""
    path = vmlock.lock_path(state, "vm1")
    path.parent.mkdir(parents=True)
    path.write_text("")
    old = os.open(path, os.O_RDWR)
    os.unlink(path)                                   # as a releasing holder does
    try:
        holder = Holder(state, "vm1")                 # makes and holds a new file
        try:
            with vmlock.try_held(state, "vm1") as got:
                assert got is False
        finally:
            holder.kill()
    finally:
        os.close(old)


# -- create and delete hold it ---------------------------------------------------------------------
@pytest.fixture
def env(tmp_path, trees):
    cfg = config_mod.from_dict({"host": {"sysfs_root": str(trees["dgx2"]),
                                         "state_dir": str(tmp_path / "state")},
                                "libvirt": {"uri": "test:///default"}})
    return Env(cfg)


def test_create_waits_for_the_names_lock_before_it_writes_the_ledger(env, monkeypatch):
    from slurm_dgxvm.lifecycle import CreateRequest, create
    from slurm_dgxvm.placement import Request
    state = env.cfg.host.state_dir
    monkeypatch.setattr(vmlock, "wait_s", lambda cfg: 0.3)
    holder = Holder(Path(state), "vm1")
    try:
        with pytest.raises(LockTimeout):
            create(env, CreateRequest(name="vm1", placement=Request(count=4)))
    finally:
        holder.kill()
    assert env.ledger.read().allocations == {}
    assert not env.vms.exists("vm1")


def test_create_holds_the_lock_when_it_writes_the_ledger_and_releases_it_after_undo(env,
                                                                                     monkeypatch):
    """libvirt's test driver has no dgxvm network: the create fails after placing, and undoes."""
    from slurm_dgxvm.errors import DgxvmError
    from slurm_dgxvm.ledger import Ledger
    from slurm_dgxvm.lifecycle import CreateRequest, create
    from slurm_dgxvm.placement import Request
    seen = []
    real = Ledger.transaction

    def spy(self):
        seen.append(str(vmlock.lock_path(env.cfg.host.state_dir, "vm1")) in vmlock._held)
        return real(self)
    monkeypatch.setattr(Ledger, "transaction", spy)
    monkeypatch.setattr(Env, "images", property(lambda self: _Images()))
    with pytest.raises(DgxvmError):
        create(env, CreateRequest(name="vm1", placement=Request(count=4)))
    assert len(seen) >= 2 and all(seen)       # place() and its undo, both under the lock
    assert not vmlock.is_held(env.cfg.host.state_dir, "vm1")
    assert not vmlock.lock_path(env.cfg.host.state_dir, "vm1").exists()
    assert env.ledger.read().allocations == {}


class _Images:
    """An image store whose one image is enough for preflight."""

    def get(self, name=None):
        from types import SimpleNamespace
        return SimpleNamespace(name="img", version="1", readiness="agent")


def test_delete_waits_for_a_create_of_the_same_name(env, monkeypatch):
    from slurm_dgxvm.lifecycle import delete
    env.vms.make_dir("vm1")                   # what a create in progress has made so far
    monkeypatch.setattr(vmlock, "wait_s", lambda cfg: 0.3)
    holder = Holder(Path(env.cfg.host.state_dir), "vm1")
    try:
        with pytest.raises(LockTimeout):
            delete(env, "vm1")
        assert env.vms.exists("vm1")          # untouched while the create holds it
    finally:
        holder.kill()
    delete(env, "vm1")                        # the create died: delete goes on
    assert not env.vms.exists("vm1")
