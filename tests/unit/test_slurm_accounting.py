"""The VM record in a job's AdminComment, and `dgxvm report`'s sums over sacct rows."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, strategies as st

from slurm_dgxvm.errors import SlurmCommandError
from slurm_dgxvm.slurm.accounting import (CONFIRM_AFTER_S, PREFIX, converge, decode, decode_all,
                                          encode, failure_fields, format_stages, merge,
                                          parse_stages)
from slurm_dgxvm.slurm.report import render, summarize, summarize_nodes

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


# -- stages in dgxvm report ------------------------------------------------------------------------
@pytest.mark.parametrize("values, p, expected", [
    (list(range(1, 21)), 95, 19),           # rank ceil(0.95 * 20) = 19
    (list(range(1, 101)), 95, 95),
    (list(range(1, 11)), 95, 10),           # rank ceil(9.5) = 10: the largest
    (list(range(1, 11)), 50, 5),            # nearest rank, not the interpolated 5.5
    ([7.0], 95, 7.0),
    ([3, 1, 2], 100, 3),                    # unsorted input
    ([3, 1, 2], 1, 1),
    ([], 95, None),
])
def test_percentile_is_nearest_rank(values, p, expected):
    from slurm_dgxvm.slurm.report import percentile
    assert percentile(values, p) == expected


@pytest.mark.parametrize("p", [0, 101])
def test_a_percentile_outside_1_to_100_is_refused(p):
    from slurm_dgxvm.slurm.report import percentile
    with pytest.raises(ValueError):
        percentile([1.0], p)


def stage_rows() -> list[dict]:
    """20 ended jobs: placement 0.001 .. 0.020 s, ready 1 .. 20 s; teardown shutdown 2 s; one
    job with a stage a later dgxvm added; a failed create (its stages do not count)."""
    rows = [row("alice", "ml", encode({
        "state": "ended", "gpus": "0", "held_s": 60,
        "create_stages": f"placement:{i / 1000},ready:{i}",
        "teardown_stages": "shutdown:2,release:0.1"})) for i in range(1, 21)]
    rows.append(row("bob", "hpc", encode({"state": "running", "gpus": "1",
                                          "create_stages": "placement:0.5,warp:3"})))
    rows.append(row("bob", "hpc", encode({"state": "failed", "cause": "guest not ready",
                                          "create_stages": "placement:0.1,ready:300"})))
    rows.append(row("carol", "hpc", encode({"state": "ended", "gpus": "2", "boot_s": 9})))
    return rows


def test_report_gives_each_stage_its_median_and_p95_over_the_jobs_with_a_vm():
    from slurm_dgxvm.slurm.report import summarize_stages
    got = {(s["op"], s["stage"]): s for s in (x.to_json() for x in summarize_stages(stage_rows()))}
    ready = got[("create", "ready")]
    # 1..20 s: median 10.5, p95 the 19th smallest; the failed create's 300 s is not among them
    assert (ready["jobs"], ready["median_s"], ready["p95_s"]) == (20, 10.5, 19.0)
    placement = got[("create", "placement")]         # 0.001..0.020 and bob's running VM's 0.5
    assert (placement["jobs"], placement["median_s"], placement["p95_s"]) == (21, 0.011, 0.02)
    assert got[("teardown", "shutdown")] == {"op": "teardown", "stage": "shutdown",
                                                  "jobs": 20, "median_s": 2.0, "p95_s": 2.0}
    # a stage no record has is there with no numbers (stable shape); an unknown one follows
    assert got[("teardown", "reset")] == {"op": "teardown", "stage": "reset", "jobs": 0,
                                          "median_s": None, "p95_s": None}
    assert got[("create", "warp")]["jobs"] == 1
    order = [k for k in got]
    assert order[:10] == [("create", s) for s in ("preflight", "placement", "seed", "disks",
                                                  "define", "fm", "ib", "jobnet", "start",
                                                  "ready")]
    assert order[-1] == ("create", "warp")


def test_report_text_has_a_stage_table_beside_the_medians():
    from slurm_dgxvm.slurm.report import summarize_stages
    rows = stage_rows()
    text = render(summarize(rows), "now-7days", summarize_stages(rows))
    lines = text.splitlines()
    assert "stages, over the jobs that got a VM (p95: nearest rank)" in lines
    assert "create    ready         20    10.500s    19.000s" in lines
    assert "teardown  release       20     0.100s     0.100s" in lines
    assert not any(line.startswith("teardown  reset") for line in lines)   # no data: no row
    assert any(line.startswith("alice") for line in lines)                  # the users' table


def test_report_json_has_users_and_stages(tmp_path, monkeypatch, capsys):
    """The CLI through a stand-in sacct printing what sacct -P prints."""
    from slurm_dgxvm.cli.main import main
    from slurm_dgxvm.slurm.commands import Slurm
    bindir = tmp_path / "bin"
    bindir.mkdir()
    lines = ["|".join([r["JobID"], r["User"], r["Account"], "gpu", r["State"], "s", "e",
                       r["ElapsedRaw"], "gres/gpu=1", r["AdminComment"]]) for r in stage_rows()]
    (tmp_path / "sacct.out").write_text("\n".join(lines) + "\n")
    (bindir / "sacct").write_text(f"#!/bin/sh\ncat {tmp_path / 'sacct.out'}\n")
    (bindir / "sacct").chmod(0o755)
    assert len(Slurm.SACCT_FIELDS) == 10          # the stand-in's lines have them all
    cfg = tmp_path / "dgxvm.toml"
    cfg.write_text(f'[slurm]\nbin_dir = "{bindir}"\n')
    assert main(["--config", str(cfg), "report", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"since", "users", "stages", "nodes"}
    assert all(set(s) == {"op", "stage", "jobs", "median_s", "p95_s"} for s in doc["stages"])
    # one-node jobs' records name no node: they count under "-"
    assert [n["node"] for n in doc["nodes"]] == ["-"]
    ready = next(s for s in doc["stages"] if (s["op"], s["stage"]) == ("create", "ready"))
    assert (ready["median_s"], ready["p95_s"]) == (10.5, 19.0)
    assert {u["user"] for u in doc["users"]} == {"alice", "bob", "carol"}


# -- a job on several nodes: one record per node ------------------------------------------------
def test_each_node_replaces_only_its_own_record():
    text = merge(None, "dgxb", {"state": "running", "gpus": "0-3"})
    text = merge(text, "dgxa", {"state": "running", "gpus": "4-7"})
    text = merge(text, "dgxb", {"state": "ended", "gpus": "0-3", "held_s": 60})
    assert [(r["node"], r["state"]) for r in decode_all(text)] == [("dgxa", "running"),
                                                                  ("dgxb", "ended")]
    assert decode(text)["node"] == "dgxa"              # the first one, for older readers
    # what sacctmgr does to the value after the job ends changes nothing
    assert decode_all(text.replace('"', "`").lower()) == decode_all(text)
    # a one-node job's record (no node) and a part that is not ours are kept apart
    old = encode({"state": "running", "domain": "job-9"})
    assert [r.get("node") for r in decode_all(merge(old + " ; junk", "dgxa", {}))] == [None, "dgxa"]
    assert decode_all("not ours") == [] and decode_all(None) == []


def test_a_value_with_the_separator_stays_inside_its_record():
    text = merge(None, "dgxa", {"cause": "a ; dgxvm/1 node=dgxb state=forged"})
    [rec] = decode_all(text)
    assert rec["cause"] == "a ; dgxvm/1 node=dgxb state=forged"


class Comment:
    """A job's AdminComment as slurmctld holds it: reads and whole-value writes, with another
    node's Prolog writing in between on the schedule the test gives."""

    def __init__(self, interleave=()):
        self.value = None
        self.writes = 0
        self.interleave = list(interleave)   # callables run before the n-th read

    def read(self):
        if self.interleave:
            self.interleave.pop(0)()
        return self.value

    def write(self, text):
        self.writes += 1
        self.value = text


def test_two_prologs_writing_at_once_both_stay():
    """dgxb read the empty value before dgxa wrote and writes after dgxa's first check: dgxa's
    later check sees its record gone and writes it again, keeping dgxb's."""
    c = Comment()
    stale = {}
    c.interleave = [lambda: None,                                   # dgxa's first read
                    lambda: stale.setdefault("b", c.value),         # dgxb reads (after dgxa wrote)
                    lambda: c.write(merge(None, "dgxb", {"state": "running"}))]  # dgxb, stale
    writes = converge(c.read, c.write, "dgxa", {"state": "running"}, sleep=lambda s: None)
    assert writes == 2
    assert sorted(r["node"] for r in decode_all(c.value)) == ["dgxa", "dgxb"]


def test_converge_waits_between_its_checks_and_gives_up_on_a_value_it_cannot_keep():
    c = Comment()
    slept = []
    assert converge(c.read, c.write, "dgxa", {"state": "ended"}, sleep=slept.append) == 1
    assert len(slept) == len(CONFIRM_AFTER_S)
    for s, base in zip(slept, CONFIRM_AFTER_S):
        assert base * 0.5 <= s <= base * 1.5
    # another writer that always wins: an error naming the node, never a loop without end
    loser = Comment()
    loser.read = lambda: encode({"node": "dgxb", "state": "running"})
    with pytest.raises(SlurmCommandError, match="node dgxa's record was overwritten"):
        converge(loser.read, loser.write, "dgxa", {"state": "ended"}, sleep=lambda s: None,
                 tries=4)
    assert loser.writes == 4


def test_report_counts_each_nodes_vm():
    two = merge(merge(None, "dgxa", {"state": "ended", "gpus": "0-7", "held_s": 3600,
                                     "boot_s": 10}),
                "dgxb", {"state": "ended", "gpus": "0-7", "held_s": 3600, "boot_s": 12})
    half = merge(merge(None, "dgxa", {"state": "ended", "gpus": "0", "held_s": 360}),
                 "dgxb", {"state": "failed", "cause": "x"})
    rows = [{"User": "alice", "Account": "a", "AdminComment": two, "ElapsedRaw": "3600"},
            {"User": "alice", "Account": "a", "AdminComment": half, "ElapsedRaw": "360"}]
    [s] = summarize(rows)
    assert (s.jobs, s.vms, s.failures, round(s.gpu_hours, 3)) == (2, 3, 1, 16.1)
    nodes = {n.node: n.to_json() for n in summarize_nodes(rows)}
    assert nodes == {"dgxa": {"node": "dgxa", "vms": 2, "gpu_hours": 8.1, "failures": 0},
                     "dgxb": {"node": "dgxb", "vms": 1, "gpu_hours": 8.0, "failures": 1}}
    text = render(summarize(rows), "now-1days", (), summarize_nodes(rows))
    assert "per node" in text and "dgxb" in text
