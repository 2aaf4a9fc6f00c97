"""How the ledger writes and reads its file cheaply without losing a guarantee: the records are
serialised once for both the checksum and the file, an unchanged record keeps its text, and a
parse is reused only for exactly the bytes it was made from (another writer, a hand edit, even
one that keeps the size, inode and mtime, is always seen)."""

from __future__ import annotations

import json
import multiprocessing
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slurm_dgxvm import fsutil
from slurm_dgxvm.errors import LedgerConflict, LedgerCorrupt, LedgerLockTimeout
from slurm_dgxvm.ledger import (Allocation, Ledger, LedgerState, LedgerTxn, checksum_of,
                                parse_document)
from slurm_dgxvm.placement.model import Occupancy
from test_ledger import gpu_pci, mk, on_disk, raw, resource_sets, write_doc


# -- one serialisation -----------------------------------------------------------------------------
def test_the_file_holds_one_record_per_line_and_the_same_document(tmp_path):
    ledger = Ledger(tmp_path / "state")
    a = mk("job:1", [0], cpus=[0, 1], memory={1: 64, 0: 32})
    b = mk("domain:vm-\u00fc", [1])                  # a key that JSON must escape
    ledger.allocate(a)
    ledger.allocate(b)
    lines = raw(ledger).decode("ascii").splitlines()
    assert lines[0].startswith('{"format":"dgxvm-ledger","version":1,"generation":2,')
    assert lines[1] == '"allocations":{'
    assert [line.split(":", 1)[0] for line in lines[2:4]] == ['"domain', '"job']
    assert lines[-1] == "}}"
    doc = on_disk(ledger)
    state = ledger.read()
    assert doc == state.to_json()
    assert doc["checksum"] == checksum_of(doc["allocations"])
    assert dict(state.allocations) == {a.key: a, b.key: b}


def test_an_empty_ledger_is_an_empty_object(tmp_path):
    ledger = Ledger(tmp_path / "state")
    ledger.allocate(mk("job:1", [0]))
    ledger.release("job:1")
    assert on_disk(ledger)["allocations"] == {}
    assert on_disk(ledger)["checksum"] == checksum_of({})
    assert ledger.read().generation == 2


def test_an_unchanged_record_is_written_back_as_it_was_read(tmp_path):
    """A hand-written record with an integer `created` keeps its text (the same JSON value);
    the checksum covers exactly what is written."""
    ledger = Ledger(tmp_path / "state")
    a = mk("job:1", [0], created=1700000000)
    record = dict(a.to_json(), created=1700000000)
    write_doc(ledger, {"format": "dgxvm-ledger", "version": 1, "generation": 7, "checksum": "",
                       "allocations": {"job:1": record}})
    ledger.allocate(mk("job:2", [1]))
    doc = on_disk(ledger)
    assert json.dumps(doc["allocations"]["job:1"]["created"]) == "1700000000"
    assert doc["checksum"] == checksum_of(doc["allocations"])
    state = Ledger(ledger.state_dir).read()
    assert state.generation == 8 and state.allocations["job:1"] == a


keys = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FFF), min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(keys, st.tuples(st.integers(0, 15), st.integers(0, 3),
                                       st.floats(0, 2e9, allow_nan=False)), max_size=6),
       st.integers(0, 2**40))
def test_encode_is_the_canonical_document(entries, generation):
    """encode() builds the checksum from per-record texts: it must equal checksum_of() of the
    whole object, and the bytes must parse back to the same state, whatever the keys."""
    allocs = {}
    for i, (key, (gpu, node, created)) in enumerate(sorted(entries.items())):
        allocs[f"domain:{key}"] = Allocation(
            key=f"domain:{key}", owner="domain", job_id=None, domain=key, user=None,
            machine="dgx2", gpus=(i,), gpu_pcis=(gpu_pci(i),), slurm_gpus=None, aligned=True,
            nvswitches=(), fm_partition=None, cpus=(i,), memory_mib={node: gpu}, created=created)
    state = LedgerState(generation=generation, allocations=allocs)
    data = state.encode()
    assert json.loads(data) == state.to_json()
    again = parse_document(data, "x")
    assert again == state
    assert again.encode() == data


# -- the parse reused ------------------------------------------------------------------------------
def test_a_transaction_after_its_own_write_parses_nothing_under_the_lock(tmp_path):
    ledger = Ledger(tmp_path / "state")
    ledger.allocate(mk("job:1", [0]))
    first = ledger.read()
    with ledger.transaction() as txn:
        txn.allocate(mk("job:2", [1]))
    assert ledger.last_times.parsed is False
    assert ledger.read().allocations["job:1"] is first.allocations["job:1"]
    assert dict(Ledger(ledger.state_dir).read().allocations) == dict(ledger.read().allocations)


def _allocate_in_another_process(state_dir, key, gpu):
    Ledger(state_dir).allocate(mk(key, [gpu]))


def test_a_cached_parse_is_invalidated_when_another_process_writes(tmp_path):
    ledger = Ledger(tmp_path / "state")
    ledger.allocate(mk("job:1", [0]))
    assert set(ledger.read().allocations) == {"job:1"}
    proc = multiprocessing.get_context("spawn").Process(
        target=_allocate_in_another_process, args=(ledger.state_dir, "job:2", 1))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    state = ledger.read()
    assert set(state.allocations) == {"job:1", "job:2"} and state.generation == 2
    with pytest.raises(LedgerConflict, match="is held by job:2"):
        ledger.allocate(mk("job:3", [1]))
    ledger.allocate(mk("job:3", [2]))
    assert Ledger(ledger.state_dir).read().generation == 3


def test_a_write_between_the_parse_before_the_lock_and_the_lock_is_seen(tmp_path, monkeypatch):
    """The parse made before the lock is stale when another writer gets the lock first: what the
    transaction sees is what is read under the lock."""
    ledger = Ledger(tmp_path / "state")
    ledger.allocate(mk("job:1", [0]))
    before = ledger.read()
    real_locked = fsutil.locked
    other_wrote = []

    def another_writer_first(*args, **kwargs):
        if not other_wrote:
            other_wrote.append(True)
            Ledger(ledger.state_dir).allocate(mk("job:2", [1]))
        return real_locked(*args, **kwargs)

    monkeypatch.setattr(fsutil, "locked", another_writer_first)
    with pytest.raises(LedgerConflict, match="is held by job:2"):
        with ledger.transaction() as txn:
            assert set(txn.allocations) == {"job:1", "job:2"} and txn.generation == 2
            txn.allocate(mk("job:3", [1]))
    assert ledger.last_times.parsed is True
    # the record both versions hold was not built again
    assert ledger.read().allocations["job:1"] is before.allocations["job:1"]
    assert set(Ledger(ledger.state_dir).read().allocations) == {"job:1", "job:2"}


def test_a_hand_edit_that_keeps_size_inode_and_mtime_is_still_caught(tmp_path):
    """The parse is keyed by the bytes, not by stat(): an in-place edit of one digit, with the
    mtime put back, is a checksum mismatch on the next read and transaction."""
    ledger = Ledger(tmp_path / "state")
    ledger.allocate(mk("job:1", [0], cpus=[4]))
    ledger.allocate(mk("job:2", [1], cpus=[5]))
    ledger.read()
    st_before = os.stat(ledger.path)
    data = raw(ledger)
    edited = data.replace(b'"cpus":[5]', b'"cpus":[4]')
    assert edited != data and len(edited) == len(data)
    with open(ledger.path, "r+b") as f:
        f.write(edited)
    os.utime(ledger.path, ns=(st_before.st_atime_ns, st_before.st_mtime_ns))
    st_after = os.stat(ledger.path)
    assert (st_after.st_ino, st_after.st_size, st_after.st_mtime_ns) == \
        (st_before.st_ino, st_before.st_size, st_before.st_mtime_ns)
    with pytest.raises(LedgerCorrupt, match="checksum mismatch"):
        ledger.read()
    with pytest.raises(LedgerCorrupt, match="checksum mismatch"):
        with ledger.transaction():
            pytest.fail("a corrupt ledger must not reach the block")
    assert raw(ledger) == edited


def test_a_known_record_whose_text_changed_is_checked_again(tmp_path):
    """Only a record with exactly the known text is reused: a changed record (here a valid
    checksum over a bad value) is built and checked, and refused."""
    ledger = Ledger(tmp_path / "state")
    ledger.allocate(mk("job:1", [0]))
    ledger.read()
    doc = on_disk(ledger)
    doc["allocations"]["job:1"]["cpus"] = "0-1"
    write_doc(ledger, doc)
    with pytest.raises(LedgerCorrupt, match="allocation 'job:1': cpus must be a list"):
        ledger.read()


def test_parse_document_reuses_only_identical_records():
    a, b = mk("job:1", [0]), mk("job:2", [1])
    old = parse_document(LedgerState(generation=1, allocations={"job:1": a, "job:2": b}).encode(),
                         "x")
    b2 = mk("job:2", [2])
    new = parse_document(LedgerState(generation=2, allocations={"job:1": a, "job:2": b2}).encode(),
                         "x", known=old)
    assert new.allocations["job:1"] is old.allocations["job:1"]
    assert new.allocations["job:2"] == b2 and new.allocations["job:2"] is not old.allocations["job:2"]
    assert new == parse_document(LedgerState(generation=2,
                                             allocations={"job:1": a, "job:2": b2}).encode(), "x")


# -- occupancy -------------------------------------------------------------------------------------
@settings(max_examples=80, deadline=None)
@given(st.lists(resource_sets, max_size=5))
def test_occupancy_is_the_union_of_the_allocations(sets):
    allocs = {f"job:{i}": mk(f"job:{i}", sorted(r["gpus"]), nvswitches=sorted(r["nvswitches"]),
                             cpus=sorted(r["cpus"]), fm=r["fm"], memory=r["memory"])
              for i, r in enumerate(sets)}
    union = Occupancy.union(a.occupancy() for a in allocs.values())
    state = LedgerState(generation=1, allocations=allocs)
    assert state.occupancy() == union
    assert dict(state.occupancy().memory_mib) == dict(union.memory_mib)
    assert LedgerTxn(state).occupancy() == union


# -- the temp file made before the lock ------------------------------------------------------------
def test_the_temp_file_is_made_before_the_lock_and_never_left(tmp_path, monkeypatch):
    ledger = Ledger(tmp_path / "state", lock_timeout=0.1)
    ledger.allocate(mk("job:1", [0]))
    seen = []
    real_locked = fsutil.locked

    def look_then_lock(*args, **kwargs):
        seen.append(sorted(os.listdir(ledger.state_dir)))
        return real_locked(*args, **kwargs)

    monkeypatch.setattr(fsutil, "locked", look_then_lock)
    ledger.release("job:9")                             # writes nothing
    ledger.allocate(mk("job:2", [1]))                   # writes
    assert [len(names) for names in seen] == [3, 3]    # ledger.json, ledger.lock, the temp file
    assert all(any(n.startswith(".ledger.json.") for n in names) for names in seen)
    assert sorted(os.listdir(ledger.state_dir)) == ["ledger.json", "ledger.lock"]
    with real_locked(ledger.lock_path, timeout=1, timed_out=RuntimeError, failed=RuntimeError):
        with pytest.raises(LedgerLockTimeout):
            ledger.allocate(mk("job:3", [2]))
    assert sorted(os.listdir(ledger.state_dir)) == ["ledger.json", "ledger.lock"]
    assert set(ledger.read().allocations) == {"job:1", "job:2"}


def test_a_transaction_works_when_the_temp_file_cannot_be_made_early(tmp_path, monkeypatch):
    """pending_write failing (a read-only state dir, say) is not an error by itself: a
    transaction that writes nothing goes through, one that writes uses atomic_write."""
    ledger = Ledger(tmp_path / "state")
    ledger.allocate(mk("job:1", [0]))

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(fsutil, "pending_write", refuse)
    assert ledger.release("job:9") is None
    ledger.allocate(mk("job:2", [1]))
    assert ledger.last_times.write.fsync_s > 0
    assert set(Ledger(ledger.state_dir).read().allocations) == {"job:1", "job:2"}
    assert sorted(os.listdir(ledger.state_dir)) == ["ledger.json", "ledger.lock"]


def test_a_writer_killed_while_it_waits_for_the_lock_leaves_no_temp_file_for_long(tmp_path):
    """Its empty temp file is made before the lock; the next transaction removes it (its pid
    is dead), and never one of a live writer."""
    import signal
    import subprocess
    import sys
    import time

    from slurm_dgxvm import fsutil
    from slurm_dgxvm.ledger import LOCK_FILE, Ledger
    ledger = Ledger(tmp_path)
    with ledger.transaction():
        pass                                               # the state dir and the lock file
    waiter = ("import sys; from slurm_dgxvm.ledger import Ledger\n"
              "with Ledger(sys.argv[1], lock_timeout=60).transaction(): pass\n")
    with fsutil.locked(tmp_path / LOCK_FILE, timeout=5, timed_out=RuntimeError,
                       failed=RuntimeError):
        proc = subprocess.Popen([sys.executable, "-c", waiter, str(tmp_path)])
        deadline = time.monotonic() + 30
        while not list(tmp_path.glob(".ledger.json.*.tmp")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [p.name.split(".")[3] for p in tmp_path.glob(".ledger.json.*.tmp")] == \
            [str(proc.pid)]
        live = tmp_path / f".ledger.json.{os.getpid()}.x.tmp"     # a live writer's: kept
        live.write_text("")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with ledger.transaction():
        pass
    assert [p.name for p in tmp_path.glob(".ledger.json.*.tmp")] == [live.name]
