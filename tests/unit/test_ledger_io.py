"""How the ledger writes and reads its file cheaply without losing a guarantee: the records are
serialised once for both the checksum and the file, and an unchanged record keeps its text."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from slurm_dgxvm.ledger import Allocation, Ledger, LedgerState, checksum_of, parse_document
from test_ledger import gpu_pci, mk, on_disk, raw, write_doc


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
