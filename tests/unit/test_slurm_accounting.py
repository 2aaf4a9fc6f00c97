"""The VM record in a job's AdminComment, and `dgxvm report`'s sums over sacct rows."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from slurm_dgxvm.slurm.accounting import (PREFIX, decode, encode, failure_fields, format_stages,
                                          parse_stages)
from slurm_dgxvm.slurm.report import render, summarize

MANGLED_BY_SACCTMGR = "\"'"


def test_round_trip_and_order():
    fields = {"cause": "Image 'x' \"missing\" | 100% = bad", "state": "refused",
              "domain": "job-7", "aligned": True, "remapped": False, "zz": 1, "none": None}
    text = encode(fields)
    assert text.startswith(f"{PREFIX} state=refused domain=job-7 aligned=yes remapped=no cause=")
    assert "none=" not in text and text.endswith(" zz=1")
    back = decode(text)
    assert back["cause"] == fields["cause"] and back["aligned"] == "yes" and back["zz"] == "1"


@given(st.dictionaries(st.sampled_from(["cause", "domain", "image", "ended", "extra"]),
                       st.text(min_size=1, max_size=40)))
def test_any_value_survives_and_nothing_sacctmgr_mangles_appears(fields):
    text = encode(fields)
    assert not any(ch in text for ch in MANGLED_BY_SACCTMGR)
    assert "|" not in text and "\n" not in text          # sacct -P's delimiter, one line
    assert decode(text) == fields
    # sacctmgr (the Epilog's only way) lowercases what it stores: the record must survive it
    assert decode(text.lower()) == fields


@pytest.mark.parametrize("text", [None, "", "hello", "dgxvm/2 state=x", "dgxvm/1x"])
def test_other_admin_comments_are_not_ours(text):
    assert decode(text) is None


def test_failure_fields():
    f = failure_fields(domain="job-3", state="refused", stage="placing", cause="no fit",
                       slurm_gpus=(0, 1))
    assert decode(encode(f)) == {"state": "refused", "domain": "job-3", "slurm_gpus": "0-1",
                                 "ended": "refused at placing", "cause": "no fit"}


def test_stages_are_one_compact_word_in_run_order_that_survives_sacctmgr():
    stages = {"ready": 8.25, "placement": 0.0041, "seed": 1.5, "start": 2.0, "define": 0.1,
              "disks": 0.5, "preflight": 0.0302}
    text = encode({"state": "ended", "create_stages": format_stages(stages, "create"),
                   "teardown_stages": format_stages({"release": 0.2, "shutdown": 5.0},
                                                    "teardown")})
    assert "create_stages=preflight:0.03,placement:0.004,seed:1.5,disks:0.5,define:0.1," \
           "start:2,ready:8.25 teardown_stages=shutdown:5,release:0.2" in text
    back = decode(text.lower())                       # as sacctmgr stores it
    assert parse_stages(back["create_stages"]) == {
        "preflight": 0.03, "placement": 0.004, "seed": 1.5, "disks": 0.5, "define": 0.1,
        "start": 2.0, "ready": 8.25}
    assert parse_stages(back["teardown_stages"]) == {"shutdown": 5.0, "release": 0.2}


def test_no_stages_is_no_word_and_an_old_record_has_none():
    assert format_stages({}, "create") is None
    assert "stages" not in encode({"state": "ended", "create_stages": None})
    old = decode("dgxvm/1 state=ended domain=job-13 gpus=0-3 boot_s=9.4 teardown_s=5.2")
    assert parse_stages(old.get("create_stages")) == {} == parse_stages(old.get("teardown_stages"))


@pytest.mark.parametrize("text, stages", [
    ("placement:0.1,seed:x,ready:8", {"placement": 0.1, "ready": 8.0}),     # a damaged pair
    ("placement,ready:8", {"ready": 8.0}),
    (":1,ready:-1,start:inf,define:nan", {}),             # no name, negative, not finite
    ("", {}),
])
def test_a_damaged_stages_word_loses_the_damaged_pairs_only(text, stages):
    assert parse_stages(text) == stages


def test_a_failure_record_keeps_the_stages_its_create_reached():
    f = failure_fields(domain="job-3", state="failed", stage="waiting for the guest",
                       cause="guest not ready", create_stages={"placement": 0.01, "ready": 300.0})
    assert decode(encode(f))["create_stages"] == "placement:0.01,ready:300"


def row(user, account, comment, elapsed="60"):
    return {"JobID": "1", "User": user, "Account": account, "State": "COMPLETED",
            "ElapsedRaw": elapsed, "AdminComment": comment}


def test_report_sums_per_user_and_account():
    rows = [
        row("alice", "ml", encode({"state": "ended", "gpus": "0-3", "held_s": 3600,
                                   "boot_s": 9.0, "teardown_s": 1.0})),
        row("alice", "ml", encode({"state": "ended", "gpus": "8", "held_s": 1800,
                                   "boot_s": 11.0, "teardown_s": 3.0})),
        row("alice", "ml", encode({"state": "refused", "cause": "bad image"})),
        row("alice", "ml", encode({"state": "running", "gpus": "4-5"}), elapsed="360"),
        row("bob", "hpc", encode({"state": "failed", "cause": "libvirt down"})),
        row("bob", "hpc", "some other admin comment"),
        row("carol", "hpc", ""),
    ]
    out = {(s.user, s.account): s.to_json() for s in summarize(rows)}
    assert set(out) == {("alice", "ml"), ("bob", "hpc")}
    a = out[("alice", "ml")]
    # 4 GPUs x 1 h + 1 GPU x 0.5 h + 2 GPUs x 0.1 h (running: the elapsed time so far)
    assert a["gpu_hours"] == pytest.approx(4.7)
    assert (a["jobs"], a["vms"], a["failures"], a["refused"]) == (4, 3, 1, 1)
    assert a["median_boot_s"] == 10.0 and a["median_teardown_s"] == 2.0
    b = out[("bob", "hpc")]
    assert (b["jobs"], b["vms"], b["failures"], b["refused"], b["gpu_hours"]) == (1, 0, 1, 0, 0)
    assert b["median_boot_s"] is None
    text = render(summarize(rows), "now-1days")
    assert "alice" in text and "4.700" in text and "1 (1 refused)" in text


def test_report_of_nothing_says_so():
    assert render([], "2026-01-01") == "no dgxvm jobs in Slurm's accounting since 2026-01-01\n"
