"""GPU health: what the host reads of a passed-through device, its reset, the verdict, and the
quarantine record — against a simulated DGX-2 tree with real injected faults (sysfs files a
real host has: config space, reset, AER counters)."""

from __future__ import annotations

import json
import time

import pytest

from slurm_dgxvm.errors import HealthStoreError, NotQuarantined
from slurm_dgxvm.health import (AerCounts, HealthStore, check, judge, probe, reset_devices)
from slurm_dgxvm.health.store import FILE
from slurm_dgxvm.simulate import render
from slurm_dgxvm.simulate.faults import inject
from slurm_dgxvm.topology import SysfsRoot, discover


@pytest.fixture
def dgx2(tmp_path):
    """A fresh simulated DGX-2 of the test's own (faults change it), and its host."""
    root = render("dgx2", tmp_path / "sys")
    sysfs = SysfsRoot(root)
    return root, sysfs, discover(sysfs)


def test_a_healthy_gpu_reads_present_nvidia_and_no_aer_errors(dgx2):
    _root, sysfs, host = dgx2
    facts = probe(sysfs, host.gpus[0].pci)
    assert facts.present and facts.vendor == 0x10DE and facts.config_error is None
    assert facts.aer == AerCounts(0, 0, 0)
    assert judge(facts).ok


@pytest.mark.parametrize("kind, reason", [
    ("fell-off-bus", "config space reads all ones (fell off the bus)"),
    ("missing", "not on the PCI bus"),
    ("aer-fatal", "1 new fatal AER error(s) (TOTAL_ERR_FATAL 0 -> 1)"),
    ("aer-nonfatal", "1 new uncorrectable non-fatal AER error(s) (TOTAL_ERR_NONFATAL 0 -> 1)"),
])
def test_each_fault_a_host_can_see_fails_the_gpu_with_its_reason(dgx2, kind, reason):
    root, sysfs, host = dgx2
    pci = host.gpus[3].pci
    inject(root, pci, kind)
    verdict = judge(probe(sysfs, pci))
    assert not verdict.ok and verdict.reason == reason
    assert judge(probe(sysfs, host.gpus[4].pci)).ok           # its neighbour is untouched


def test_correctable_aer_errors_are_noted_never_a_fault(dgx2):
    root, sysfs, host = dgx2
    pci = host.gpus[0].pci
    inject(root, pci, "aer-correctable")
    verdict = judge(probe(sysfs, pci), baseline=AerCounts())
    assert verdict.ok and "1 new correctable" in verdict.note


def test_aer_errors_already_counted_in_the_baseline_do_not_quarantine_again(dgx2):
    root, sysfs, host = dgx2
    pci = host.gpus[0].pci
    inject(root, pci, "aer-fatal")
    facts = probe(sysfs, pci)
    assert judge(facts, baseline=facts.aer).ok                 # e.g. after an admin's clear
    inject(root, pci, "aer-fatal")
    assert judge(probe(sysfs, pci), baseline=facts.aer).reason.startswith("1 new fatal")


def test_counters_below_the_baseline_mean_a_reboot_and_count_from_zero(dgx2):
    _root, sysfs, host = dgx2
    facts = probe(sysfs, host.gpus[0].pci)                      # all zero
    assert judge(facts, baseline=AerCounts(5, 2, 1)).ok


def test_resets_run_in_parallel_and_each_is_timed(dgx2):
    root, sysfs, host = dgx2
    pcis = [g.pci for g in host.gpus[:8]]
    results = reset_devices(sysfs, pcis, timeout_s=5)
    assert list(results) == pcis
    assert all(r.ok and r.seconds >= 0 and r.method == "flr bus" for r in results.values())


def test_a_refused_reset_fails_with_the_kernels_error(dgx2):
    root, sysfs, host = dgx2
    pci = host.gpus[2].pci
    inject(root, pci, "reset-fail")
    r = reset_devices(sysfs, [pci], timeout_s=5)[pci]
    assert not r.ok and "is a directory" in r.error
    assert judge(probe(sysfs, pci), reset=r).reason.startswith("reset failed: writing ")


def test_a_reset_that_never_returns_is_bounded_and_does_not_hold_up_the_others(dgx2):
    root, sysfs, host = dgx2
    hung = [g.pci for g in host.gpus[:4]]
    for pci in hung:
        inject(root, pci, "reset-hang")
    healthy = host.gpus[5].pci
    t0 = time.monotonic()
    results = reset_devices(sysfs, [*hung, healthy], timeout_s=0.5)
    elapsed = time.monotonic() - t0
    assert elapsed < 4 * 0.5                                   # waited once, not once each
    assert all(not results[p].ok and "did not finish within 0.5s" in results[p].error
               for p in hung)
    assert results[healthy].ok


# -- the record ------------------------------------------------------------------------------------
def test_a_check_quarantines_with_who_and_why_and_keeps_the_first_reason(dgx2, tmp_path):
    root, sysfs, host = dgx2
    store = HealthStore(tmp_path / "state")
    bad, good = host.gpus[1].pci, host.gpus[0].pci
    inject(root, bad, "reset-fail")
    result = check(sysfs, store, [good, bad], by="teardown of job-7 (job 7)", job=7, vm="job-7",
                   reset=True, reset_timeout_s=5)
    assert [v.pci for v in result.bad] == [bad] and list(result.newly) == [bad]
    assert set(result.reset_s) == {good, bad}
    devs = store.read()
    assert devs[bad].quarantined and devs[bad].job == 7 and devs[bad].vm == "job-7"
    assert devs[bad].reason.startswith("reset failed")
    assert devs[bad].history[-1]["by"] == "teardown of job-7 (job 7)"
    assert devs[good].state == "ok" and devs[good].resets == 1
    assert devs[good].last_reset["ok"] is True and devs[good].aer == AerCounts()
    # a second failure does not overwrite why it was quarantined first
    inject(root, bad, "fell-off-bus")
    again = check(sysfs, store, [bad], by="dgxvm health")
    assert not again.newly and store.read()[bad].reason.startswith("reset failed")
    # readable by everyone (dgxvm gpu show as a user)
    assert (tmp_path / "state" / FILE).stat().st_mode & 0o777 == 0o644


def test_clear_gives_the_device_back_with_its_history_and_a_new_aer_baseline(dgx2, tmp_path):
    root, sysfs, host = dgx2
    store = HealthStore(tmp_path / "state")
    pci = host.gpus[0].pci
    inject(root, pci, "aer-fatal")
    assert check(sysfs, store, [pci], by="dgxvm health").newly
    d = store.clear(pci, by="admin alice", facts=probe(sysfs, pci), note="reseated")
    assert d.state == "ok" and d.aer.fatal == 1
    assert [e["event"] for e in d.history] == ["quarantined", "cleared"]
    assert d.history[-1]["reason"] == "reseated" and d.history[-1]["by"] == "admin alice"
    assert check(sysfs, store, [pci], by="dgxvm health").bad == ()   # old errors not recounted
    with pytest.raises(NotQuarantined, match=pci):
        store.clear(pci, by="admin alice")


def test_a_corrupt_record_is_an_error_never_no_quarantine(tmp_path):
    store = HealthStore(tmp_path)
    (tmp_path / FILE).write_text('{"format": "dgxvm-gpu-health", "version": 1, "devices": ')
    with pytest.raises(HealthStoreError, match="corrupt"):
        store.quarantined()
    with pytest.raises(HealthStoreError):
        store.quarantine("0000:34:00.0", "x", by="t")
    assert (tmp_path / FILE).read_text().endswith('"devices": ')      # left for the admin


def test_no_record_yet_means_every_device_is_healthy(tmp_path):
    assert HealthStore(tmp_path / "none").quarantined() == {}
    doc = HealthStore(tmp_path / "x")
    doc.quarantine("0000:34:00.0", "by hand", by="admin")
    raw = json.loads((tmp_path / "x" / FILE).read_text())
    assert raw["format"] == "dgxvm-gpu-health" and raw["devices"]["0000:34:00.0"]["state"] == \
        "quarantined"


# -- the admin's diagnostics ([health] diag_command) -----------------------------------------------
def _script(tmp_path, body: str) -> str:
    p = tmp_path / "diag.sh"
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(0o755)
    return str(p)


def test_diagnostics_that_name_a_device_quarantine_only_that_one(dgx2, tmp_path):
    _root, sysfs, host = dgx2
    a, b = host.gpus[0].pci, host.gpus[1].pci
    diag = _script(tmp_path, f'echo "args: $*" >&2\necho "{b} dcgm diag level 1: memory test '
                             f'failed"\nexit 1\n')
    result = check(sysfs, HealthStore(tmp_path / "s"), [a, b], by="t", diag_command=diag)
    assert [v.pci for v in result.bad] == [b]
    assert result.newly[b].reason == "diagnostics: dcgm diag level 1: memory test failed"


def test_diagnostics_that_fail_without_naming_fail_every_device_and_exit_0_passes(dgx2, tmp_path):
    _root, sysfs, host = dgx2
    devs = [g.pci for g in host.gpus[:2]]
    ok = check(sysfs, HealthStore(tmp_path / "ok"), devs, by="t",
               diag_command=_script(tmp_path, "exit 0\n"))
    assert ok.bad == ()
    bad = check(sysfs, HealthStore(tmp_path / "bad"), devs, by="t",
                diag_command=_script(tmp_path, "echo 'no GPU found'\nexit 3\n"))
    assert [v.reason for v in bad.bad] == ["diagnostics exit 3: no GPU found"] * 2


def test_diagnostics_that_cannot_run_are_no_pass(dgx2, tmp_path):
    _root, sysfs, host = dgx2
    pci = host.gpus[0].pci
    result = check(sysfs, HealthStore(tmp_path / "s"), [pci], by="t",
                   diag_command=str(tmp_path / "missing-diag"))
    assert result.bad[0].reason.startswith("diagnostics could not run: ")
    slow = check(sysfs, HealthStore(tmp_path / "t"), [pci], by="t", diag_timeout_s=0.3,
                 diag_command=_script(tmp_path, "exec sleep 5\n"))
    assert "did not finish in 0.3s" in slow.bad[0].reason
