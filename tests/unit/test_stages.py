"""The stage timer: what a create's or teardown's record says each stage took."""

from __future__ import annotations

import pytest

from slurm_dgxvm.observe.stages import CREATE_STAGES, STAGES, TEARDOWN_STAGES, StageTimer, ordered


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_each_stage_has_its_own_time_rounded_to_the_ms():
    clock = Clock()
    t = StageTimer(clock)
    with t.stage("placement"):
        clock.now += 0.0123456
    with t.stage("seed"):
        clock.now += 1.5
    assert t.seconds() == {"placement": 0.012, "seed": 1.5}
    assert t.failed is None and t.completed() == t.seconds()


def test_a_stage_entered_twice_adds_up_in_the_order_first_entered():
    clock = Clock()
    t = StageTimer(clock)
    for stage, took in (("seed", 1.0), ("disks", 0.25), ("seed", 2.0)):
        with t.stage(stage):
            clock.now += took
    assert list(t.seconds().items()) == [("seed", 3.0), ("disks", 0.25)]


def test_a_failed_stage_keeps_its_time_and_is_named():
    clock = Clock()
    t = StageTimer(clock)
    with t.stage("start"):
        clock.now += 0.5
    with pytest.raises(TimeoutError), t.stage("ready"):
        clock.now += 300.0
        raise TimeoutError("guest never answered")
    assert t.failed == "ready"
    assert t.seconds() == {"start": 0.5, "ready": 300.0}     # the stages it reached
    assert t.completed() == {"start": 0.5}                   # those that finished


def test_the_stage_names_are_the_documented_ones():
    # the record, the AdminComment, dgxvm report and dgxvm metrics all use these names
    assert CREATE_STAGES == ("preflight", "placement", "seed", "disks", "define", "fm",
                             "ib", "jobnet", "start", "ready")
    assert TEARDOWN_STAGES == ("shutdown", "destroy", "undefine", "reset", "release")
    assert STAGES == {"create": CREATE_STAGES, "teardown": TEARDOWN_STAGES}


def test_ordered_follows_the_run_order_and_keeps_unknown_stages_last():
    stages = {"ready": 8.0, "zz-later": 1.0, "placement": 0.01, "aa-later": 2.0}
    assert ordered(stages, "create") == [("placement", 0.01), ("ready", 8.0),
                                         ("aa-later", 2.0), ("zz-later", 1.0)]
