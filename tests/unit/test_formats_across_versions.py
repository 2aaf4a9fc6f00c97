"""What an earlier release wrote, this one reads: a package upgrade on a node with running jobs
leaves their ledger entries, VM records, GPU health, counters and host setup record for the new
dgxvm (their Epilogs and `dgxvm host revert` run on it), and `dgxvm report` reads VM records of
old jobs from Slurm's accounting. tests/data/formats/<version>/ holds each format as that
release wrote it (tests/data/formats/generate.py); a format change must keep reading them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from slurm_dgxvm.observe import opstats
from slurm_dgxvm.health.store import HealthStore
from slurm_dgxvm.host.setup_record import SetupRecord
from slurm_dgxvm.ledger import Ledger
from slurm_dgxvm.records import VmRecord
from slurm_dgxvm.slurm import accounting

FORMATS = Path(__file__).resolve().parents[1] / "data" / "formats"
VERSIONS = sorted(p.name for p in FORMATS.iterdir() if p.is_dir())


def test_the_first_release_formats_are_kept():
    assert "0.1.0" in VERSIONS


@pytest.fixture(params=VERSIONS)
def written(request, tmp_path) -> Path:
    """A state dir holding what that version wrote."""
    state = tmp_path / "state"
    shutil.copytree(FORMATS / request.param, state)
    return state


def test_its_ledger_is_read_with_every_allocation(written):
    doc = json.loads((written / "ledger.json").read_text())
    state = Ledger(written).read()
    assert set(state.allocations) == set(doc["allocations"])
    for key, alloc in state.allocations.items():
        assert alloc.to_json() == doc["allocations"][key]


def test_its_vm_record_is_read_whole(written):
    doc = json.loads((written / "vm-record.json").read_text())
    rec = VmRecord.from_json(doc, str(written / "vm-record.json"))
    assert rec.to_json() == doc
    assert rec.allocation.key == rec.ledger_key


def test_its_accounting_comment_is_decoded_by_dgxvm_report(written):
    fields = accounting.decode((written / "admin-comment.txt").read_text().strip())
    assert fields is not None and fields["state"] == "running" and fields["gpus"]
    assert accounting.parse_stages(fields.get("create_stages"))


def test_its_gpu_health_keeps_the_quarantine(written):
    doc = json.loads((written / "gpu-health.json").read_text())
    want = {pci for pci, d in doc["devices"].items() if d["state"] == "quarantined"}
    assert want and set(HealthStore(written).quarantined()) == want


def test_its_counters_are_read(written):
    doc = json.loads((written / "opstats.json").read_text())
    assert opstats.read(written).to_json() == doc


def test_its_host_setup_record_is_read_for_revert(written):
    doc = json.loads((written / "host-setup.json").read_text())
    record = SetupRecord.load(written / "host-setup.json")
    assert record is not None and record.doc["changes"] == doc["changes"]
    assert {c["kind"] for c in doc["changes"]} >= {"bind", "hugepages", "file"}
