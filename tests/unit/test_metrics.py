"""``dgxvm metrics``: the node's state in Prometheus's text format, read back by a small parser
that holds the output to the format's rules (HELP and TYPE before a family's samples, a family's
samples together, histogram buckets cumulative up to +Inf = _count, escaped label values), and
written the way node_exporter's textfile collector needs (a rename, never a part)."""

from __future__ import annotations

import math
import os
import re

import pytest

from slurm_dgxvm import config as config_mod
from slurm_dgxvm.observe import metrics, opstats
from slurm_dgxvm.cli.main import main
from slurm_dgxvm.errors import FabricError, GuestTimeout, HostError, NoFit
from slurm_dgxvm.ledger import Allocation, domain_key
from slurm_dgxvm.lifecycle import Env
from slurm_dgxvm.placement import Policy, Request, place
from slurm_dgxvm.records import VmRecord
from slurm_dgxvm.observe.stages import StageTimer

pytestmark = pytest.mark.usefixtures("clean_env")

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
SAMPLE = re.compile(rf"^({NAME})(?:\{{(.*)\}})? (\S+)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), value)


def parse(text: str) -> dict[str, dict]:
    """``{family: {"type", "help", "samples": {(name, frozenset(labels)): value}}}``; an
    AssertionError for anything the format does not allow."""
    assert text.endswith("\n")
    families: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            kind, name, rest = line[2:6], *line[7:].split(" ", 1)
            assert re.fullmatch(NAME, name), line
            if name != current:
                assert name not in families, f"{name}: its lines are not together"
                families[name] = {"samples": {}}
                current = name
            assert families[name]["samples"] == {}, f"{line}: after the family's samples"
            families[name]["help" if kind == "HELP" else "type"] = rest
            continue
        if line.startswith("#"):
            continue                                         # a comment
        m = SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name, raw_labels, raw_value = m.groups()
        family = families[current]
        allowed = {current} if family["type"] != "histogram" else \
            {current + s for s in ("_bucket", "_sum", "_count")}
        assert name in allowed, f"{name} under the family {current}"
        labels = []
        rest = raw_labels or ""
        while rest:
            lm = LABEL.match(rest)
            assert lm, f"bad labels in {line!r}"
            labels.append((lm.group(1), _unescape(lm.group(2))))
            rest = rest[lm.end():]
        value = float(raw_value.replace("+Inf", "inf"))
        key = (name, frozenset(labels))
        assert key not in family["samples"], f"duplicate sample {line!r}"
        family["samples"][key] = value
    for name, fam in families.items():
        assert fam.get("type") in ("gauge", "counter", "histogram"), name
        assert fam.get("help"), name
        if fam["type"] == "counter":
            assert name.endswith("_total")
        if fam["type"] == "histogram":
            _check_histogram(name, fam["samples"])
    return families


def _check_histogram(name: str, samples: dict) -> None:
    series: dict[frozenset, list[tuple[float, float]]] = {}
    for (sample, labels), value in samples.items():
        if sample == name + "_bucket":
            le = dict(labels)["le"]
            rest = frozenset(kv for kv in labels if kv[0] != "le")
            series.setdefault(rest, []).append((float(le.replace("+Inf", "inf")), value))
    for rest, buckets in series.items():
        buckets.sort()
        counts = [n for _, n in buckets]
        assert counts == sorted(counts), f"{name}{dict(rest)}: buckets not cumulative"
        assert buckets[-1][0] == math.inf, f"{name}{dict(rest)}: no +Inf bucket"
        assert samples[(name + "_count", rest)] == counts[-1]
        assert (name + "_sum", rest) in samples


def value(families, family, sample=None, **labels) -> float:
    return families[family]["samples"][(sample or family, frozenset(labels.items()))]


# -- the node ---------------------------------------------------------------------------------------
@pytest.fixture
def env(tmp_path, trees) -> Env:
    return Env(config_mod.from_dict({"host": {"sysfs_root": str(trees["dgx2"]),
                                              "state_dir": str(tmp_path / "state")}}))


def add_vm(env, name, state, *, hold=True, record=True, count=4):
    p = place(env.host, env.ledger.read().occupancy(), Request(count=count), Policy())
    alloc = Allocation.from_placement(domain_key(name), p, owner="domain", domain=name, user="u")
    if hold:
        env.ledger.allocate(alloc)
    if record:
        env.vms.make_dir(name)
        env.vms.save(VmRecord(name=name, uuid="u", state=state, owner="domain",
                              ledger_key=alloc.key, job_id=None, user="u", uid=0, gid=0,
                              workdir=None, image="img", image_version="1", address=None,
                              mac="52:54:00:00:00:01", network="dgxvm", allocation=alloc,
                              placement=p))


def scrape(env) -> dict:
    text = metrics.render(metrics.collect(env.host, env.ledger.read(), env.vms,
                                          opstats.read(env.cfg.host.state_dir),
                                          quarantined=frozenset(env.health.quarantined())),
                          simulated=env.host.simulated)
    return parse(text)


def test_vms_by_state_come_from_records_directories_and_the_ledger(env):
    add_vm(env, "a", "running")
    add_vm(env, "b", "running", count=2)
    add_vm(env, "c", "stopped", hold=False)          # stopped outside dgxvm: GPUs given back
    add_vm(env, "d", "creating", count=2)
    add_vm(env, "e", None, record=False, count=1)    # a ledger entry a crash left
    env.vms.make_dir("f")                            # a directory without a record
    env.vms.make_dir("g")
    (env.vms.dir("g") / "record.json").write_text("{not json")
    m = scrape(env)
    assert {dict(labels)["state"]: v for (_, labels), v in m["dgxvm_vms"]["samples"].items()} == \
        {"creating": 1, "running": 2, "stopped": 1, "deleting": 0, "no-record": 2, "corrupt": 1}


def test_gpus_held_free_and_quarantined(env):
    add_vm(env, "a", "running")                      # 4
    add_vm(env, "b", "running", count=2)             # 2
    add_vm(env, "c", "stopped", hold=False)          # holds nothing
    m = scrape(env)
    assert value(m, "dgxvm_gpus", state="held") == 6
    assert value(m, "dgxvm_gpus", state="free") == 10
    assert value(m, "dgxvm_gpus", state="quarantined") == 0
    assert value(m, "dgxvm_gpus", state="missing") == 0
    # one free GPU and one held GPU quarantined: the free one leaves "free"; the held one
    # stays held until its VM ends
    held = next(iter(env.ledger.read().allocations.values())).gpu_pcis[0]
    free = next(g.pci for g in env.host.gpus
                if g.pci not in env.ledger.read().occupancy().gpus)
    env.health.quarantine(held, "x", by="t")
    env.health.quarantine(free, "y", by="t")
    m = scrape(env)
    assert value(m, "dgxvm_gpus", state="held") == 6
    assert value(m, "dgxvm_gpus", state="free") == 9
    assert value(m, "dgxvm_gpus", state="quarantined") == 1


def test_a_gpu_missing_from_the_bus_is_missing_not_free(tmp_path, trees):
    env = Env(config_mod.from_dict({"host": {"sysfs_root": str(trees["dgx2-degraded"]),
                                             "state_dir": str(tmp_path / "state")}}))
    m = scrape(env)
    assert value(m, "dgxvm_gpus", state="missing") == 1
    assert value(m, "dgxvm_gpus", state="free") == 15


def test_a_simulated_host_says_so(env):
    text = metrics.render(metrics.collect(env.host, env.ledger.read(), env.vms, opstats.OpStats()),
                          simulated=env.host.simulated)
    assert text.startswith("# SIMULATED host: sysfs written by `dgxvm simulate dgx2`\n")
    assert value(parse(text), "dgxvm_host_info", machine="dgx2", simulated="dgx2") == 1


def test_stage_times_operations_and_failures_from_the_counters(env):
    state = env.cfg.host.state_dir
    clock = [0.0]

    def timer(stages, failed=None):
        t = StageTimer(lambda: clock[0])
        for name, seconds in stages.items():
            try:
                with t.stage(name):
                    clock[0] += seconds
                    if name == failed:
                        raise RuntimeError
            except RuntimeError:
                pass
        return t
    opstats.observe(state, "create", timer({"placement": 0.004, "ready": 7.0}))
    opstats.observe(state, "create", timer({"placement": 0.2, "ready": 12.0}))
    opstats.observe(state, "create", timer({"placement": 0.01, "ready": 300.0}, failed="ready"),
                    failure=GuestTimeout(name="x", timeout=300, reason="r", tail=""))
    opstats.observe(state, "create", timer({"placement": 0.001}), failure=NoFit(count=4,
                                                                                reason="r"))
    opstats.observe(state, "teardown", timer({"shutdown": 4.0, "release": 0.1}))
    opstats.count_failure(state, "prolog", FabricError(partition=1, reason="r"))
    m = scrape(env)
    name = "dgxvm_stage_duration_seconds"
    assert m[name]["type"] == "histogram"
    create_ready = {"op": "create", "stage": "ready"}
    assert value(m, name, name + "_count", **create_ready) == 2    # the failed one never finished
    assert value(m, name, name + "_sum", **create_ready) == 19.0
    assert value(m, name, name + "_bucket", le="10.0", **create_ready) == 1
    assert value(m, name, name + "_bucket", le="+Inf", **create_ready) == 2
    assert value(m, name, name + "_count", op="create", stage="placement") == 4
    assert value(m, name, name + "_bucket", le="0.01", op="create", stage="placement") == 3
    assert value(m, name, name + "_count", op="teardown", stage="shutdown") == 1
    ops = "dgxvm_operations_total"
    assert value(m, ops, op="create", result="ok") == 2
    assert value(m, ops, op="create", result="failed") == 2
    assert value(m, ops, op="teardown", result="failed") == 0     # listed before any happened
    fails = "dgxvm_failures_total"
    assert m[fails]["samples"] == {
        (fails, frozenset({"op": "create", "fault": "node", "cause": "vm"}.items())): 1,
        (fails, frozenset({"op": "create", "fault": "job", "cause": "no_fit"}.items())): 1,
        (fails, frozenset({"op": "prolog", "fault": "node", "cause": "host"}.items())): 1}


def test_a_fresh_node_lists_every_family(env):
    m = scrape(env)
    assert set(m) == {"dgxvm_host_info", "dgxvm_vms", "dgxvm_gpus",
                      "dgxvm_stage_duration_seconds", "dgxvm_operations_total",
                      "dgxvm_failures_total", "dgxvm_warm_vms", "dgxvm_warm_claims_total"}
    assert m["dgxvm_stage_duration_seconds"]["samples"] == {}
    assert value(m, "dgxvm_warm_vms") == 0
    for outcome in ("hit", "miss", "destroyed"):                   # listed before any happened
        assert value(m, "dgxvm_warm_claims_total", outcome=outcome) == 0


def test_warm_vms_their_claims_and_the_ones_destroyed_for_another_job(env):
    state = env.cfg.host.state_dir
    add_vm(env, "warm-1", "running", count=2)
    add_vm(env, "warm-2", "running", count=2)
    add_vm(env, "job-9", "running", count=2)
    opstats.count(state, "warm", "hit", stage="claim", seconds=0.8)
    opstats.count(state, "warm", "miss")
    opstats.count(state, "warm", "miss")
    opstats.count(state, "warm", "destroyed", 2)
    m = scrape(env)
    assert m["dgxvm_warm_vms"]["type"] == "gauge" and value(m, "dgxvm_warm_vms") == 2
    claims = "dgxvm_warm_claims_total"
    assert m[claims]["type"] == "counter"
    assert [value(m, claims, outcome=o) for o in ("hit", "miss", "destroyed")] == [1, 2, 2]
    name = "dgxvm_stage_duration_seconds"
    assert value(m, name, name + "_sum", op="warm", stage="claim") == 0.8
    ops = m["dgxvm_operations_total"]["samples"]
    assert not any(dict(labels).get("op") == "warm" for _n, labels in ops)


def test_label_values_and_help_are_escaped():
    family = metrics.Family("dgxvm_x", "gauge", 'back\\slash and\nnewline',
                            (metrics.Sample("dgxvm_x", (("v", 'a "q" \\ b\nc'),), 1.5),))
    text = metrics.render([family])
    assert "# HELP dgxvm_x back\\\\slash and\\nnewline\n" in text
    assert text.count("\n") == 3                     # HELP, TYPE, the sample: nothing split
    assert value(parse(text), "dgxvm_x", v='a "q" \\ b\nc') == 1.5


# -- the textfile ------------------------------------------------------------------------------------
def test_the_textfile_is_replaced_never_rewritten_in_place(tmp_path):
    path = tmp_path / "dgxvm.prom"
    metrics.write_textfile(path, "old_metric 1\n")
    inode = path.stat().st_ino
    with open(path) as reader:                       # a scrape in progress
        metrics.write_textfile(path, "new_metric 2\n")
        assert reader.read() == "old_metric 1\n"     # it still reads the whole old file
    assert path.read_text() == "new_metric 2\n" and path.stat().st_ino != inode
    assert os.listdir(tmp_path) == ["dgxvm.prom"]    # no temp file left behind
    assert path.stat().st_mode & 0o777 == 0o644      # node_exporter runs as its own user


def test_a_textfile_that_cannot_be_written_is_a_host_error_naming_it(tmp_path):
    path = tmp_path / "absent" / "dgxvm.prom"
    with pytest.raises(HostError) as info:
        metrics.write_textfile(path, "x 1\n")
    assert str(path) in str(info.value) and info.value.exit_code == 3


# -- the command -------------------------------------------------------------------------------------
def cli(tmp_path, trees, *args) -> int:
    return main(["--sysfs-root", str(trees["dgx2"]), "--state-dir", str(tmp_path / "state"),
                 "metrics", *args])


def test_the_command_writes_the_textfile(tmp_path, trees, capsys):
    path = tmp_path / "textfile" / "dgxvm.prom"
    path.parent.mkdir()
    assert cli(tmp_path, trees, "--textfile", str(path)) == 0
    assert capsys.readouterr().out == ""
    m = parse(path.read_text())
    assert value(m, "dgxvm_gpus", state="free") == 16


def test_the_command_prints_with_a_dash(tmp_path, trees, capsys):
    assert cli(tmp_path, trees, "--textfile", "-") == 0
    assert value(parse(capsys.readouterr().out), "dgxvm_gpus", state="held") == 0


@pytest.mark.parametrize("name", ["dgxvm.txt", "dgxvm.prom.tmp", "dgxvm"])
def test_a_textfile_node_exporter_would_not_read_is_refused(tmp_path, trees, capsys, name):
    assert cli(tmp_path, trees, "--textfile", str(tmp_path / name)) == 2
    err = capsys.readouterr().err
    assert err.startswith("dgxvm: error: ") and name in err and "*.prom" in err
    assert not (tmp_path / name).exists()


def test_corrupt_counters_are_an_error_naming_the_file(tmp_path, trees, capsys):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / opstats.FILE).write_text("{not json")
    assert cli(tmp_path, trees) == 5
    assert str(tmp_path / "state" / opstats.FILE) in capsys.readouterr().err


# the parser above is what holds the output to the format: it must refuse what the format does
@pytest.mark.parametrize("text", [
    "x 1\n",                                                            # no HELP/TYPE
    "# HELP x h\n# TYPE x gauge\nx 1",                                  # no final newline
    "# HELP x h\n# TYPE x gauge\nx 1\n# HELP y h\n# TYPE y gauge\ny 1\nx{a=\"1\"} 2\n",  # split
    "# HELP x h\n# TYPE x counter\nx 1\n",                              # counter without _total
    "# HELP x h\n# TYPE x gauge\nx{a=1} 1\n",                           # unquoted label value
    "# HELP h h\n# TYPE h histogram\nh_bucket{le=\"1.0\"} 2\nh_bucket{le=\"+Inf\"} 1\n"
    "h_sum 1\nh_count 1\n",                                             # not cumulative
    "# HELP h h\n# TYPE h histogram\nh_bucket{le=\"1.0\"} 1\nh_sum 1\nh_count 1\n",  # no +Inf
    "# HELP h h\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 1\n",  # count
])
def test_the_parser_refuses_what_the_format_does_not_allow(text):
    with pytest.raises((AssertionError, KeyError)):
        parse(text)
