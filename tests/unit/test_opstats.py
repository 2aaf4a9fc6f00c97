"""The node's operation counters (``<state_dir>/opstats.json``): what every create and teardown
adds, and that counting never fails the VM it counts."""

from __future__ import annotations

import json
import logging
import math

import filelock
import pytest

from slurm_dgxvm.observe import opstats
from slurm_dgxvm.errors import FabricError, GuestTimeout, NoFit, OpStatsCorrupt
from slurm_dgxvm.observe.stages import StageTimer


def timer_of(stages: dict[str, float], failed: str | None = None) -> StageTimer:
    """A timer that saw ``stages`` (seconds), the last one failed when ``failed``."""
    clock = [0.0]
    t = StageTimer(lambda: clock[0])
    for name, seconds in stages.items():
        try:
            with t.stage(name):
                clock[0] += seconds
                if name == failed:
                    raise RuntimeError(name)
        except RuntimeError:
            pass
    return t


def test_each_create_adds_its_stages_its_result_and_its_failure(tmp_path):
    opstats.observe(tmp_path, "create", timer_of({"placement": 0.004, "ready": 8.0}))
    opstats.observe(tmp_path, "create", timer_of({"placement": 0.02, "ready": 9.0}))
    failed = timer_of({"placement": 0.003, "seed": 0.5, "ready": 300.0}, failed="ready")
    opstats.observe(tmp_path, "create", failed,
                    failure=GuestTimeout(name="j", timeout=300, reason="no agent", tail=""))
    opstats.observe(tmp_path, "create", timer_of({"placement": 0.001}),
                    failure=NoFit(count=4, reason="fragmented"))
    s = opstats.read(tmp_path)
    assert s.ops == {("create", "ok"): 2, ("create", "failed"): 2}
    assert s.failures == {("create", "node", "vm"): 1, ("create", "job", "no_fit"): 1}
    placement = s.stages[("create", "placement")]
    assert placement.count == 4 and placement.sum == pytest.approx(0.028)
    # the stage that failed ran for a time that says nothing about the stage: not observed
    assert s.stages[("create", "ready")].count == 2
    assert s.stages[("create", "seed")].count == 1


def test_buckets_are_cumulative_and_the_last_is_every_observation(tmp_path):
    h = opstats.Histogram()
    for seconds in (0.004, 0.01, 0.011, 7.0, 601.0):
        h.observe(seconds)
    cum = dict(h.cumulative())
    assert cum[0.01] == 2                # le is inclusive: 0.01 counts in le="0.01"
    assert cum[0.05] == 3 and cum[5.0] == 3 and cum[10.0] == 4 and cum[600.0] == 4
    assert cum[math.inf] == 5 == h.count
    assert [le for le, _ in h.cumulative()] == [*opstats.BUCKETS, math.inf]


def test_the_file_round_trips_and_says_what_it_is(tmp_path):
    opstats.observe(tmp_path, "teardown", timer_of({"shutdown": 2.0, "release": 0.1}))
    opstats.count_failure(tmp_path, "prolog", FabricError(partition=1, reason="x"))
    doc = json.loads((tmp_path / opstats.FILE).read_text())
    assert doc["format"] == "dgxvm-opstats" and doc["buckets"] == list(opstats.BUCKETS)
    again = opstats.OpStats.from_json(doc)
    assert again == opstats.read(tmp_path)
    assert again.failures == {("prolog", "node", "host"): 1}
    assert again.ops == {("teardown", "ok"): 1}          # a hook's failure is no operation


def test_a_counter_that_cannot_be_written_does_not_raise(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="dgxvm.opstats"):
        opstats.observe(blocker / "state", "create", timer_of({"placement": 0.1}))
    assert "not updated (the VM is not affected)" in caplog.text


def test_a_held_lock_is_waited_for_briefly_then_given_up(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(opstats, "LOCK_TIMEOUT_S", 0.1)
    opstats.observe(tmp_path, "create", timer_of({"placement": 0.1}))
    with filelock.FileLock(str(tmp_path / opstats.LOCK)), \
            caplog.at_level(logging.WARNING, logger="dgxvm.opstats"):
        opstats.observe(tmp_path, "create", timer_of({"placement": 0.1}))
    assert "not acquired within 0.1s" in caplog.text
    assert opstats.read(tmp_path).ops == {("create", "ok"): 1}


@pytest.mark.parametrize("damage", [
    "{not json",
    json.dumps({"format": "dgxvm-opstats", "version": 1, "buckets": [1, 2], "stages": [],
                "ops": [], "failures": []}),                    # another bucket layout
    json.dumps({"format": "dgxvm-opstats", "version": 1, "buckets": list(opstats.BUCKETS),
                "stages": [], "ops": [{"op": "create", "result": "ok", "count": -1}],
                "failures": []}),
])
def test_a_corrupt_file_is_an_error_to_read_and_is_moved_aside_by_the_next_count(tmp_path,
                                                                                  damage):
    path = tmp_path / opstats.FILE
    path.write_text(damage)
    with pytest.raises(OpStatsCorrupt) as info:
        opstats.read(tmp_path)
    assert str(path) in str(info.value) and info.value.exit_code == 5
    opstats.observe(tmp_path, "create", timer_of({"placement": 0.1}))
    assert (tmp_path / (opstats.FILE + ".corrupt")).read_text() == damage
    assert opstats.read(tmp_path).ops == {("create", "ok"): 1}


def test_no_file_is_no_counts(tmp_path):
    assert opstats.read(tmp_path / "absent") == opstats.OpStats()
