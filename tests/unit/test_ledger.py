"""The node-local allocation ledger: round trips, conflicts, corruption, locking, concurrency."""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import shutil
import stat
import tempfile

import filelock
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from slurm_dgxvm.errors import LedgerConflict, LedgerCorrupt, LedgerLockTimeout
from slurm_dgxvm.ledger import (
    Allocation,
    Ledger,
    LedgerState,
    checksum_of,
    domain_key,
    job_key,
)
from slurm_dgxvm.placement.model import NumaCell, Occupancy, Placement


# -- helpers ---------------------------------------------------------------------------------------
def gpu_pci(i: int) -> str:
    return f"0000:{0x30 + i:02x}:00.0"


def sw_pci(i: int) -> str:
    return f"0000:{0xb0 + i:02x}:00.0"


def mk(key: str, gpus=(), *, nvswitches=(), cpus=(), fm=None, memory=None, owner=None,
       created=1700000000.5) -> Allocation:
    """An allocation built directly (no Placement)."""
    owner = owner or key.split(":", 1)[0]
    name = key.split(":", 1)[1]
    return Allocation(
        key=key,
        owner=owner,
        job_id=int(name) if owner == "job" else None,
        domain=f"dgxvm-{name}",
        user="alice" if owner == "job" else None,
        machine="dgx2",
        gpus=tuple(gpus),
        gpu_pcis=tuple(gpu_pci(g) for g in gpus),
        slurm_gpus=tuple(gpus) if owner == "job" else None,
        aligned=True,
        nvswitches=tuple(sw_pci(s) for s in nvswitches),
        fm_partition=fm,
        cpus=tuple(cpus),
        memory_mib=dict(memory or {}),
        created=created,
    )


def on_disk(ledger: Ledger) -> dict:
    with open(ledger.path) as f:
        return json.load(f)


def raw(ledger: Ledger) -> bytes:
    with open(ledger.path, "rb") as f:
        return f.read()


def write_doc(ledger: Ledger, doc: dict, *, fix_checksum: bool = True) -> bytes:
    """Hand-write a document (as an admin or a bug would), optionally with a valid checksum."""
    if fix_checksum:
        doc = dict(doc, checksum=checksum_of(doc["allocations"]))
    data = json.dumps(doc, indent=2).encode()
    os.makedirs(ledger.state_dir, exist_ok=True)
    with open(ledger.path, "wb") as f:
        f.write(data)
    return data


@pytest.fixture
def ledger(tmp_path) -> Ledger:
    return Ledger(tmp_path / "state", lock_timeout=5.0)


# -- Allocation ------------------------------------------------------------------------------------
def test_allocation_json_round_trip():
    a = mk("job:17", [0, 1, 2, 3], nvswitches=[0, 1, 2], cpus=[0, 1, 48, 49], fm=None,
           memory={0: 4096, 1: 2048})
    text = json.dumps(a.to_json())
    b = Allocation.from_json(json.loads(text))
    assert b == a
    assert hash(b) == hash(a)
    assert b.to_json() == a.to_json()
    assert a.to_json()["memory_mib"] == {"0": 4096, "1": 2048}
    assert isinstance(b.gpus, tuple) and isinstance(b.gpu_pcis, tuple)


def test_allocation_domain_round_trip_with_nulls():
    a = mk("domain:myvm", [4, 5], fm=3, memory={1: 1024})
    assert a.job_id is None and a.user is None and a.slurm_gpus is None
    assert Allocation.from_json(json.loads(json.dumps(a.to_json()))) == a


def test_allocation_with_ib_functions_round_trips_and_old_records_read_without_them():
    a = dataclasses.replace(mk("job:17", [0]), ib_functions=("0000:18:00.1",))
    assert a.to_json()["ib_functions"] == ["0000:18:00.1"]
    assert Allocation.from_json(json.loads(json.dumps(a.to_json()))) == a
    old = mk("job:18", [1]).to_json()
    assert "ib_functions" not in old and Allocation.from_json(old).ib_functions == ()


@pytest.mark.parametrize("bad,why", [([], "present but empty"), (["x", "x"], "twice"),
                                     ("0000:18:00.1", "list"), ([3], "strings")])
def test_bad_ib_functions_in_a_record_are_refused(bad, why):
    rec = dict(mk("job:1", [0]).to_json(), ib_functions=bad)
    with pytest.raises(ValueError, match=why):
        Allocation.from_json(rec)


def test_one_ib_function_is_never_recorded_for_two_vms(ledger):
    vf = ("0000:18:00.1",)
    with ledger.transaction() as txn:
        txn.allocate(dataclasses.replace(mk("job:1", [0]), ib_functions=vf))
    with pytest.raises(LedgerConflict) as info:
        with ledger.transaction() as txn:
            txn.allocate(dataclasses.replace(mk("job:2", [1]), ib_functions=vf))
    assert info.value.resource == "ib_function" and info.value.holder == "job:1"
    assert ledger.read().occupancy().ib_functions == frozenset(vf)


def test_allocation_occupancy():
    a = mk("job:5", [0, 1], nvswitches=[2], cpus=[3, 4], fm=7, memory={0: 100})
    assert a.occupancy() == Occupancy(
        gpus=frozenset({gpu_pci(0), gpu_pci(1)}), nvswitches=frozenset({sw_pci(2)}),
        cpus=frozenset({3, 4}), memory_mib={0: 100}, fm_partitions=frozenset({7}))


def test_allocation_from_placement_matches_placement_occupancy():
    p = Placement(
        machine="dgx-a100", gpus=(0, 1), gpu_pcis=(gpu_pci(0), gpu_pci(1)), slurm_gpus=(0, 3),
        aligned=True, remapped=True, reason="best fit", nvswitches=(), fm_partition=9,
        cells=(NumaCell(host_node=3, gpus=(0, 1), cpus=(48, 49, 50), vcpus=(0, 1, 2),
                        memory_mib=8192),),
        emulator_cpus=(63,), hugepage_kib=None, disk_gib=50, nics=())
    a = Allocation.from_placement("job:9", p, owner="job", job_id=9, domain="dgxvm-9",
                                  user="bob", now=123.0)
    assert a.occupancy() == p.occupancy()
    assert (a.gpus, a.slurm_gpus, a.fm_partition, a.cpus, dict(a.memory_mib), a.created) == (
        (0, 1), (0, 3), 9, (48, 49, 50), {3: 8192}, 123.0)
    assert a.machine == "dgx-a100" and a.user == "bob" and a.domain == "dgxvm-9"


@pytest.mark.parametrize("change, needle", [
    ({"owner": "vm"}, "owner"),
    ({"job_id": None}, "job_id"),
    ({"gpus": (0,)}, "gpu_pcis has"),
    ({"cpus": (1, 1)}, "twice"),
    ({"memory_mib": {"0": 1}}, "NUMA node"),
    ({"aligned": 1}, "aligned"),
    ({"key": ""}, "key"),
])
def test_allocation_rejects_bad_values(change, needle):
    good = mk("job:1", [0, 1], cpus=[1, 2])
    fields = {f.name: getattr(good, f.name) for f in dataclasses.fields(good)}
    fields.update(change)
    with pytest.raises(ValueError, match=needle):
        Allocation(**fields)


def test_keys():
    assert job_key(1234) == "job:1234"
    assert domain_key("myvm") == "domain:myvm"


# -- the ledger: round trips -----------------------------------------------------------------------
def test_missing_file_is_empty_generation_zero(ledger):
    state = ledger.read()
    assert state.generation == 0 and dict(state.allocations) == {}
    assert state.occupancy() == Occupancy()
    assert not os.path.exists(ledger.state_dir)  # reading creates nothing


def test_round_trip_through_a_reopened_ledger(ledger):
    a = mk("job:1", [0, 1], nvswitches=[0], cpus=[0, 1], memory={0: 1024})
    b = mk("domain:myvm", [2, 3], cpus=[2, 3], fm=1, memory={0: 512, 1: 512})
    assert ledger.allocate(a) == a
    ledger.allocate(b)
    state = Ledger(ledger.state_dir).read()
    assert state.generation == 2
    assert dict(state.allocations) == {"job:1": a, "domain:myvm": b}
    assert state.holder_of_gpu(gpu_pci(2)) == "domain:myvm"
    assert state.holder_of_gpu(gpu_pci(9)) is None
    assert state.occupancy() == Occupancy.union([a.occupancy(), b.occupancy()])
    assert state.occupancy().memory_mib == {0: 1536, 1: 512}


def test_on_disk_json_equals_in_memory_after_each_op(ledger):
    ops = [
        ("allocate", mk("job:1", [0], cpus=[0])),
        ("allocate", mk("job:2", [1], cpus=[1], fm=2)),
        ("release", "job:1"),
        ("allocate", mk("domain:x", [0, 2], nvswitches=[1], memory={0: 64})),
        ("release", "job:2"),
        ("release", "domain:x"),
    ]
    model: dict[str, Allocation] = {}
    for n, (op, arg) in enumerate(ops, start=1):
        if op == "allocate":
            ledger.allocate(arg)
            model[arg.key] = arg
        else:
            assert ledger.release(arg) == model.pop(arg)
        state = ledger.read()
        doc = on_disk(ledger)
        assert doc == state.to_json()
        assert doc == LedgerState(generation=n, allocations=model).to_json()
        assert doc["format"] == "dgxvm-ledger" and doc["version"] == 1
        assert doc["generation"] == n
        assert doc["checksum"] == checksum_of(doc["allocations"])
        assert doc["checksum"].startswith("sha256:")
        assert dict(state.allocations) == model
    assert on_disk(ledger)["allocations"] == {}


def test_transaction_several_ops_one_write(ledger):
    with ledger.transaction() as txn:
        assert txn.generation == 0
        txn.allocate(mk("job:1", [0]))
        txn.allocate(mk("job:2", [1]))
        assert set(txn.allocations) == {"job:1", "job:2"}
        assert txn.occupancy().gpus == {gpu_pci(0), gpu_pci(1)}
        with pytest.raises(TypeError):
            txn.allocations["job:3"] = mk("job:3", [2])  # a read view
    assert ledger.read().generation == 1


def test_unchanged_transaction_writes_nothing(ledger):
    ledger.allocate(mk("job:1", [0]))
    before = raw(ledger)
    mtime = os.stat(ledger.path).st_mtime_ns
    with ledger.transaction() as txn:
        txn.allocate(mk("job:2", [1]))
        txn.release("job:2")
    with ledger.transaction():
        pass
    assert raw(ledger) == before
    assert os.stat(ledger.path).st_mtime_ns == mtime
    assert ledger.read().generation == 1


def test_txn_unusable_after_block(ledger):
    with ledger.transaction() as txn:
        pass
    with pytest.raises(RuntimeError):
        txn.allocate(mk("job:1", [0]))


def test_no_temp_files_left(ledger):
    for i in range(3):
        ledger.allocate(mk(f"job:{i}", [i]))
    ledger.release("job:0")
    assert sorted(os.listdir(ledger.state_dir)) == ["ledger.json", "ledger.lock"]


# -- conflicts -------------------------------------------------------------------------------------
@pytest.mark.parametrize("second, reason", [
    (mk("job:1", [5]), "already recorded"),
    (mk("job:2", [9, 3]), f"GPU {gpu_pci(3)} is held by job:1"),
    (mk("job:2", [9], nvswitches=[4, 1]), f"NVSwitch {sw_pci(1)} is held by job:1"),
    (mk("job:2", [9], cpus=[40, 17]), "CPU 17 is held by job:1"),
    (mk("job:2", [9], fm=6), "FM partition 6 is held by job:1"),
    (mk("domain:job", [9], fm=6), "FM partition 6 is held by job:1"),
])
def test_conflicts_raise_and_leave_the_file_byte_identical(ledger, second, reason):
    first = mk("job:1", [2, 3], nvswitches=[0, 1], cpus=[16, 17], fm=6, memory={0: 100})
    ledger.allocate(first)
    before = raw(ledger)
    with pytest.raises(LedgerConflict) as info:
        ledger.allocate(second)
    err = info.value
    assert err.key == second.key
    assert err.reason == reason
    assert err.holder == "job:1"
    assert reason in str(err)
    assert err.exit_code == 5
    assert raw(ledger) == before
    assert dict(ledger.read().allocations) == {"job:1": first}


def test_conflict_inside_a_transaction_discards_the_whole_transaction(ledger):
    ledger.allocate(mk("job:1", [0]))
    before = raw(ledger)
    with pytest.raises(LedgerConflict):
        with ledger.transaction() as txn:
            txn.allocate(mk("job:2", [1]))
            txn.allocate(mk("job:3", [0]))
    assert raw(ledger) == before


def test_memory_is_shared_not_exclusive(ledger):
    ledger.allocate(mk("job:1", [0], memory={0: 1000}))
    ledger.allocate(mk("job:2", [1], memory={0: 2000}))
    assert ledger.read().occupancy().memory_mib == {0: 3000}


def test_released_resources_can_be_taken_again(ledger):
    ledger.allocate(mk("job:1", [0], cpus=[1], fm=2, nvswitches=[0]))
    ledger.release("job:1")
    ledger.allocate(mk("job:2", [0], cpus=[1], fm=2, nvswitches=[0]))
    assert list(ledger.read().allocations) == ["job:2"]


# -- release ---------------------------------------------------------------------------------------
def test_release_unknown_key_is_a_logged_noop(ledger, caplog):
    ledger.allocate(mk("job:1", [0]))
    before = raw(ledger)
    with caplog.at_level(logging.WARNING, logger="dgxvm.ledger"):
        assert ledger.release("job:999") is None
    assert raw(ledger) == before
    records = [r for r in caplog.records if r.name == "dgxvm.ledger"]
    assert len(records) == 1
    assert records[0].levelno == logging.WARNING
    assert "job:999" in records[0].getMessage()


def test_release_on_empty_ledger_creates_no_file(ledger, caplog):
    with caplog.at_level(logging.WARNING, logger="dgxvm.ledger"):
        assert ledger.release("job:1") is None
    assert not os.path.exists(ledger.path)
    assert "job:1" in caplog.text


# -- exceptions ------------------------------------------------------------------------------------
def test_exception_inside_transaction_writes_nothing(ledger):
    ledger.allocate(mk("job:1", [0]))
    before = raw(ledger)

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with ledger.transaction() as txn:
            txn.allocate(mk("job:2", [1]))
            txn.release("job:1")
            raise Boom
    assert raw(ledger) == before
    assert sorted(os.listdir(ledger.state_dir)) == ["ledger.json", "ledger.lock"]
    # the lock was released
    ledger.allocate(mk("job:3", [2]))
    assert set(ledger.read().allocations) == {"job:1", "job:3"}


# -- corruption ------------------------------------------------------------------------------------
def _valid_doc(ledger: Ledger) -> dict:
    ledger.allocate(mk("job:1", [0, 1], cpus=[0, 1]))
    ledger.allocate(mk("job:2", [2, 3], cpus=[2, 3]))
    return on_disk(ledger)


def _bad_json(ledger, doc):
    data = b'{"format": "dgxvm-ledger", oops}'
    return data


def _empty(ledger, doc):
    return b""


def _hand_edited_record(ledger, doc):
    doc["allocations"]["job:2"]["gpus"] = [2, 4]
    return json.dumps(doc, indent=2).encode()


def _wrong_version(ledger, doc):
    doc["version"] = 2
    return json.dumps(doc).encode()


def _wrong_format(ledger, doc):
    doc["format"] = "something-else"
    return json.dumps(doc).encode()


def _missing_field(ledger, doc):
    del doc["allocations"]["job:2"]["cpus"]
    doc["checksum"] = checksum_of(doc["allocations"])
    return json.dumps(doc).encode()


def _wrong_type(ledger, doc):
    doc["allocations"]["job:2"]["cpus"] = "2-3"
    doc["checksum"] = checksum_of(doc["allocations"])
    return json.dumps(doc).encode()


def _gpu_held_twice(ledger, doc):
    doc["allocations"]["job:2"]["gpu_pcis"][0] = gpu_pci(1)
    doc["checksum"] = checksum_of(doc["allocations"])
    return json.dumps(doc).encode()


def _key_mismatch(ledger, doc):
    doc["allocations"]["job:2"]["key"] = "job:3"
    doc["checksum"] = checksum_of(doc["allocations"])
    return json.dumps(doc).encode()


def _not_an_object(ledger, doc):
    return b"[]"


@pytest.mark.parametrize("damage, reason", [
    (_bad_json, "invalid JSON at line 1 column 28"),
    (_empty, "empty file"),
    (_hand_edited_record, "checksum mismatch"),
    (_wrong_version, "unsupported version 2"),
    (_wrong_format, "format is 'something-else'"),
    (_missing_field, "allocation 'job:2': missing field(s) cpus"),
    (_wrong_type, "allocation 'job:2': cpus must be a list"),
    (_gpu_held_twice, f"GPU {gpu_pci(1)} is held by both job:1 and job:2"),
    (_key_mismatch, "allocation 'job:2' records key 'job:3'"),
    (_not_an_object, "top level is list"),
])
def test_corrupt_ledger_raises_and_is_left_unchanged(ledger, damage, reason):
    doc = _valid_doc(ledger)
    data = damage(ledger, doc)
    with open(ledger.path, "wb") as f:
        f.write(data)

    with pytest.raises(LedgerCorrupt) as info:
        ledger.read()
    assert info.value.path == ledger.path
    assert info.value.reason.startswith(reason), info.value.reason
    assert info.value.exit_code == 5
    assert "left as it is" in str(info.value)

    entered = False
    with pytest.raises(LedgerCorrupt):
        with ledger.transaction():
            entered = True
    assert not entered
    with pytest.raises(LedgerCorrupt):
        ledger.allocate(mk("job:9", [9]))
    with pytest.raises(LedgerCorrupt):
        ledger.release("job:1")
    assert raw(ledger) == data
    assert sorted(os.listdir(ledger.state_dir)) == ["ledger.json", "ledger.lock"]


def test_checksum_mismatch_reason_is_exact(ledger):
    doc = _valid_doc(ledger)
    with open(ledger.path, "wb") as f:
        f.write(_hand_edited_record(ledger, doc))
    with pytest.raises(LedgerCorrupt) as info:
        ledger.read()
    assert info.value.reason == "checksum mismatch"
    assert info.value.recorded != info.value.computed


def test_hand_written_valid_document_is_accepted(ledger):
    a = mk("job:1", [0], memory={2: 10})
    write_doc(ledger, {"format": "dgxvm-ledger", "version": 1, "generation": 41, "checksum": "",
                       "allocations": {"job:1": a.to_json()}})
    state = ledger.read()
    assert state.generation == 41 and dict(state.allocations) == {"job:1": a}
    ledger.allocate(mk("job:2", [1]))
    assert ledger.read().generation == 42


# -- replacing a corrupt ledger (dgxvm reconcile --rebuild-ledger) ---------------------------------
def test_a_corrupt_ledger_is_replaced_and_kept_aside_byte_for_byte(ledger):
    ledger.allocate(mk("job:1", [0]))
    ledger.allocate(mk("job:2", [1]))
    torn = raw(ledger)[:-40]                    # a power cut in the middle of a write
    with open(ledger.path, "wb") as f:
        f.write(torn)
    with pytest.raises(LedgerCorrupt):
        ledger.read()
    kept = mk("job:2", [1])
    with ledger.locked():
        aside = ledger.replace_corrupt(LedgerState(allocations={"job:2": kept}),
                                       now=1767225600.0)
    assert aside == ledger.path + ".corrupt-20260101T000000Z"
    with open(aside, "rb") as f:
        assert f.read() == torn
    state = ledger.read()
    assert dict(state.allocations) == {"job:2": kept}
    assert state.generation == 1                # nothing readable of the torn one's
    with ledger.locked():                       # twice in one second: a second name
        with open(ledger.path, "wb") as f:
            f.write(b"")
        again = ledger.replace_corrupt(LedgerState(), now=1767225600.0)
    assert again == aside + "-2" and os.path.exists(aside)


def test_a_hand_edit_keeps_its_generation_going(ledger):
    doc = _valid_doc(ledger)
    with open(ledger.path, "wb") as f:
        f.write(_hand_edited_record(ledger, doc))
    with ledger.locked():
        ledger.replace_corrupt(LedgerState())
    assert ledger.read().generation == doc["generation"] + 1


def test_a_ledger_that_parses_is_never_replaced(ledger):
    from slurm_dgxvm.errors import LedgerError
    ledger.allocate(mk("job:1", [0]))
    before = raw(ledger)
    with ledger.locked(), pytest.raises(LedgerError, match="not corrupt"):
        ledger.replace_corrupt(LedgerState())
    assert raw(ledger) == before
    assert sorted(os.listdir(ledger.state_dir)) == ["ledger.json", "ledger.lock"]


def test_locked_holds_the_writers_off(ledger):
    other = Ledger(ledger.state_dir, lock_timeout=0.05)
    with ledger.locked():
        with pytest.raises(LedgerLockTimeout):
            other.allocate(mk("job:1", [0]))
    other.allocate(mk("job:1", [0]))


# -- locking ---------------------------------------------------------------------------------------
def test_lock_timeout(tmp_path):
    ledger = Ledger(tmp_path / "state", lock_timeout=0.2)
    ledger.allocate(mk("job:1", [0]))
    before = raw(ledger)
    held = filelock.FileLock(ledger.lock_path)
    with held:
        with pytest.raises(LedgerLockTimeout) as info:
            ledger.allocate(mk("job:2", [1]))
        assert info.value.timeout == 0.2
        assert info.value.exit_code == 5
        assert ledger.last_lock_wait_s >= 0.2
        # reading needs no lock
        assert list(ledger.read().allocations) == ["job:1"]
    assert raw(ledger) == before
    ledger.allocate(mk("job:2", [1]))  # free again


def test_critical_section_is_measured(ledger):
    assert ledger.last_lock_wait_s is None and ledger.last_held_s is None
    ledger.allocate(mk("job:1", [0]))
    assert 0 <= ledger.last_lock_wait_s < 5
    assert 0 < ledger.last_held_s < 5
    with ledger.transaction():
        pass
    assert ledger.last_held_s >= 0


def test_file_and_dir_modes(tmp_path):
    old = os.umask(0o077)
    try:
        ledger = Ledger(tmp_path / "a" / "state")
        ledger.allocate(mk("job:1", [0]))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(ledger.path).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(ledger.state_dir).st_mode) == 0o755
    ledger.release("job:1")  # a rewrite keeps the mode
    assert stat.S_IMODE(os.stat(ledger.path).st_mode) == 0o644


# -- concurrency -----------------------------------------------------------------------------------
def _worker(state_dir, key, gpu, barrier, results):
    try:
        barrier.wait(timeout=60)
        Ledger(state_dir, lock_timeout=60).allocate(mk(key, [gpu], cpus=[gpu]))
        results.put(("ok", key, None))
    except LedgerConflict as e:
        results.put(("conflict", key, e.reason))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        results.put(("error", key, repr(e)))


def test_concurrent_allocations_from_eight_processes(tmp_path):
    state_dir = str(tmp_path / "state")
    ctx = multiprocessing.get_context("spawn")
    # seven distinct GPUs, and one process that wants GPU 3 again
    jobs = [(f"job:{i}", i) for i in range(7)] + [("job:103", 3)]
    barrier = ctx.Barrier(len(jobs))
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(state_dir, key, gpu, barrier, results))
             for key, gpu in jobs]
    for p in procs:
        p.start()
    outcome = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    assert [o for o in outcome if o[0] == "error"] == []
    conflicts = [o for o in outcome if o[0] == "conflict"]
    assert len(conflicts) == 1
    loser = conflicts[0][1]
    assert loser in ("job:3", "job:103")
    winner = "job:103" if loser == "job:3" else "job:3"
    assert conflicts[0][2] == f"GPU {gpu_pci(3)} is held by {winner}"

    state = Ledger(state_dir).read()
    expected = {key: mk(key, [gpu], cpus=[gpu]) for key, gpu in jobs if key != loser}
    assert dict(state.allocations) == expected
    assert state.generation == 7
    assert state.holder_of_gpu(gpu_pci(3)) == winner


# -- hypothesis: a random allocate/release history on a reopened ledger ----------------------------
KEYS = ["job:1", "job:2", "job:3", "domain:a", "domain:b"]
resource_sets = st.fixed_dictionaries({
    "gpus": st.sets(st.integers(0, 7), max_size=3),
    "nvswitches": st.sets(st.integers(0, 5), max_size=2),
    "cpus": st.sets(st.integers(0, 15), max_size=3),
    "fm": st.one_of(st.none(), st.integers(0, 3)),
    "memory": st.dictionaries(st.integers(0, 1), st.integers(0, 4096), max_size=2),
})


def _exclusive_of(a: Allocation) -> set:
    return ({("gpu", p) for p in a.gpu_pcis} | {("sw", p) for p in a.nvswitches}
            | {("cpu", c) for c in a.cpus}
            | ({("fm", a.fm_partition)} if a.fm_partition is not None else set()))


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="dgxvm-ledger-")
        self.state_dir = os.path.join(self.dir, "state")
        self.model: dict[str, Allocation] = {}
        self.generation = 0

    def teardown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def ledger(self) -> Ledger:
        return Ledger(self.state_dir, lock_timeout=5.0)  # reopened at every step

    def snapshot(self) -> bytes | None:
        try:
            with open(os.path.join(self.state_dir, "ledger.json"), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    @rule(key=st.sampled_from(KEYS), res=resource_sets)
    def allocate(self, key, res):
        gpus = sorted(res["gpus"])
        alloc = mk(key, gpus, nvswitches=sorted(res["nvswitches"]), cpus=sorted(res["cpus"]),
                   fm=res["fm"], memory=res["memory"])
        taken = set().union(*(_exclusive_of(a) for a in self.model.values()))
        should_conflict = key in self.model or bool(_exclusive_of(alloc) & taken)
        before = self.snapshot()
        try:
            self.ledger().allocate(alloc)
        except LedgerConflict:
            assert should_conflict
            assert self.snapshot() == before
        else:
            assert not should_conflict
            self.model[key] = alloc
            self.generation += 1

    @rule(key=st.sampled_from(KEYS))
    def release(self, key):
        expected = self.model.pop(key, None)
        before = self.snapshot()
        assert self.ledger().release(key) == expected
        if expected is None:
            assert self.snapshot() == before
        else:
            self.generation += 1

    @invariant()
    def ledger_matches_model(self):
        state = self.ledger().read()
        assert dict(state.allocations) == self.model
        assert state.generation == self.generation

    @invariant()
    def nothing_held_twice(self):
        state = self.ledger().read()
        seen: set = set()
        for a in state.allocations.values():
            mine = _exclusive_of(a)
            assert not (mine & seen)
            seen |= mine


LedgerMachine.TestCase.settings = settings(
    max_examples=50, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestLedgerStateMachine = LedgerMachine.TestCase
