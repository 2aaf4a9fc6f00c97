"""The ``dgxvm`` command line on simulated hosts.

Happy paths run through click's CliRunner on ``cli``; error cases through ``main(argv)``, the entry
point that turns errors into one ``dgxvm: error:`` line and an exit code.
"""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from slurm_dgxvm import __version__
from slurm_dgxvm import config as config_mod
from slurm_dgxvm.cli.main import cli, main
from slurm_dgxvm.ledger import Allocation, Ledger
from slurm_dgxvm.placement import EMPTY, Request, place

PLAN_KEYS = {"gpus", "slurm_gpus", "aligned", "numa_nodes", "cpus", "vcpus", "memory_mib",
             "nvswitches", "fm_partition"}


pytestmark = pytest.mark.usefixtures("clean_env")  # tests/unit/conftest.py


@pytest.fixture
def state(tmp_path):
    return tmp_path / "state"


@pytest.fixture
def run(tree, state):
    """``run(*args)`` -> click Result of ``dgxvm --sysfs-root TREE --state-dir STATE args``."""
    def _run(*args, env=None):
        return CliRunner().invoke(cli, ["--sysfs-root", str(tree), "--state-dir", str(state),
                                        *args], env=env, catch_exceptions=False)
    return _run


def error_line(capsys) -> str:
    """The one error line main() wrote to stderr (and nothing else there)."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dgxvm: error: "), err
    return lines[0]


# -- topology show ---------------------------------------------------------------------------------
def test_topology_show_draws_both_baseboards_and_every_gpu(run):
    result = run("topology", "show")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "SIMULATED" in out
    assert "Baseboard 0" in out and "Baseboard 1" in out
    shown = [int(i) for line in out.splitlines() if line.startswith("    GPU ")
             for i in line.split()[1:]]
    assert shown == list(range(16))
    assert "Held by (ledger): nothing" in out


@pytest.mark.parametrize("machine", ["dgx-h100"])
def test_topology_show_on_a_single_board_machine_has_no_second_board(run):
    out = run("topology", "show").output
    assert "Baseboard 0" in out and "Baseboard 1" not in out
    assert "shared-nvswitch" in out


@pytest.mark.parametrize("machine", ["dgx2-degraded"])
def test_topology_show_marks_a_missing_gpu(run):
    out = run("topology", "show").output
    assert "1 MISSING" in out and "MISSING GPU 0000:39:00.0" in out


def test_topology_show_json(run, host):
    result = run("topology", "show", "--json")
    assert result.exit_code == 0
    doc = json.loads(result.output)
    assert doc["machine"] == "dgx2" and doc["nvswitch_model"] == "full-passthrough"
    assert doc["simulated"] == "dgx2"
    assert [g["index"] for g in doc["gpus"]] == list(range(16))
    assert all({"index", "pci", "numa_node", "board", "healthy", "held_by"} <= set(g)
               for g in doc["gpus"])
    assert all({"pci", "board", "held_by"} <= set(s) for s in doc["nvswitches"])
    assert [n["id"] for n in doc["numa_nodes"]] == [0, 1]
    assert {t["gpus"]: t["vcpus"] for t in doc["vm_sizes"]} == {1: 4, 2: 10, 4: 22, 8: 46,
                                                                 16: 92}
    assert doc["allocations"] == {}


# -- plan ------------------------------------------------------------------------------------------
def test_plan_json_remaps_slurm_gpus_to_an_aligned_block(run, state):
    result = run("plan", "--gpu-count", "4", "--slurm-gpus", "5,6,7,11", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert PLAN_KEYS <= set(doc)
    assert doc["gpus"] == [4, 5, 6, 7] and doc["slurm_gpus"] == [5, 6, 7, 11]
    assert doc["aligned"] is True and doc["remapped"] is True
    assert doc["numa_nodes"] == [0] and doc["vcpus"] == len(doc["cpus"]) == 22
    assert doc["nvswitches"] == ["0000:65:00.0", "0000:66:00.0", "0000:67:00.0"]
    assert doc["fm_partition"] is None
    assert doc["memory_mib"] > 0 and doc["simulated"] == "dgx2"
    assert not (state / "ledger.json").exists()


def test_plan_text_says_remapped(run):
    out = run("plan", "--gpu-count", "4", "--slurm-gpus", "5,6,7,11").output
    assert "Slurm chose  5-7,11  -> remapped" in out
    assert "GPUs         4-7" in out
    assert "0000:65:00.0, 0000:66:00.0, 0000:67:00.0" in out


def test_plan_with_size_suffixes(run):
    doc = json.loads(run("plan", "--gpu-count", "2", "--memory", "64G", "--disk-size", "200",
                         "--vcpus", "8", "--json").output)
    assert doc["memory_mib"] == 65536 and doc["disk_gib"] == 200 and doc["vcpus"] == 8


@pytest.mark.parametrize("machine", ["dgx-h100"])
def test_plan_on_h100_names_the_fm_partition(run):
    doc = json.loads(run("plan", "--gpu-count", "8", "--json").output)
    assert doc["fm_partition"] == 0 and doc["nvswitches"] == []


@pytest.mark.parametrize("machine", ["dgx-h100"])
def test_plan_with_ib_vf_names_each_gpus_vf_and_takes_nothing(run, state):
    doc = json.loads(run("plan", "--gpu-count", "2", "--ib", "vf", "--json").output)
    assert doc["ib_mode"] == "vf"
    assert doc["ib"] == [{"gpu": 0, "hca": "0000:18:00.0", "pci": "0000:18:00.1", "vf": 0},
                         {"gpu": 2, "hca": "0000:4f:00.0", "pci": "0000:4f:00.1", "vf": 0}]
    out = run("plan", "--gpu-count", "1", "--gpu-index", "3", "--ib", "port").output
    assert "InfiniBand   GPU 3: HCA 0000:5e:00.0 whole" in out
    assert not (state / "ledger.json").exists()


def test_plan_with_ib_vf_on_a_dgx2_is_refused_naming_the_flag(tree, state, capsys):
    code = main(["--sysfs-root", str(tree), "--state-dir", str(state), "plan", "--gpu-count",
                 "2", "--ib", "vf"])
    assert code == 2 and "--ib vf needs an SR-IOV VF enabled" in error_line(capsys)


BAD_INPUT = [
    # (args after `plan`, text the error line must contain, exit code)
    (["--gpu-count", "4", "--slurm-gpus", "0-3,x"], "'0-3,x'", 2),
    (["--gpu-count", "1", "--slurm-gpus", "-1"], "'-1'", 2),
    (["--gpu-count", "4", "--slurm-gpus", "99,1,2,3"], "99", 2),
    (["--gpu-count", "4", "--slurm-gpus", "1,1,2,3"], "'1,1,2,3'", 2),
    (["--gpu-count", "4", "--slurm-gpus", ""], "''", 2),
    (["--gpu-count", "4", "--gpu-index", "3"], "--gpu-index 3", 2),
    (["--gpu-count", "17"], "17", 2),
    (["--gpu-count", "3"], "3 is not a VM size", 2),
    (["--gpu-count", "0"], "0", 2),
    (["--gpu-count", "4", "--vcpus", "1000"], "--vcpus 1000", 2),
    (["--gpu-count", "1", "--vcpus", "5"], "--vcpus 5", 2),
    (["--gpu-count", "4", "--memory", "99T"], "--memory 103809024", 2),   # 99 TiB in MiB
    (["--gpu-count", "4", "--memory", "lots"], "'lots'", 2),
    (["--gpu-count", "four"], "'four'", 2),
    (["--gpu-count", "4", "--gpu-index", "0", "--slurm-gpus", "0-3"], "--gpu-index", 2),
    (["--gpu-count", "4", "--bogus"], "--bogus", 2),
    (["--gpu-count", "2", "--ib", "rdma"], "'rdma'", 2),
]


@pytest.mark.parametrize("args, names, code", BAD_INPUT,
                         ids=[" ".join(a) or "empty" for a, _, _ in BAD_INPUT])
def test_bad_plan_input_is_one_error_line_and_writes_nothing(tree, state, capsys, args, names,
                                                             code):
    rc = main(["--sysfs-root", str(tree), "--state-dir", str(state), "plan", *args])
    assert rc == code
    assert names in error_line(capsys)
    assert not (state / "ledger.json").exists()


def test_unknown_config_key_is_an_error_naming_key_and_file(tree, state, tmp_path, capsys):
    cfg = tmp_path / "dgxvm.toml"
    cfg.write_text("[placement]\nalignmnet = \"prefer\"\n")
    rc = main(["--config", str(cfg), "--sysfs-root", str(tree), "--state-dir", str(state),
               "plan", "--gpu-count", "4"])
    assert rc == 2
    line = error_line(capsys)
    assert "placement.alignmnet" in line and str(cfg) in line
    assert not (state / "ledger.json").exists()


def test_a_sysfs_root_that_is_not_there_is_a_host_error(tmp_path, state, capsys):
    rc = main(["--sysfs-root", str(tmp_path / "nope"), "--state-dir", str(state),
               "topology", "show"])
    assert rc == 3
    assert str(tmp_path / "nope") in error_line(capsys)


def test_no_fit_exits_4(tree, host, state, capsys):
    p = place(host, EMPTY, Request(count=16))
    Ledger(state).allocate(Allocation.from_placement("domain:all", p, owner="domain", domain="all"))
    rc = main(["--sysfs-root", str(tree), "--state-dir", str(state), "plan", "--gpu-count", "1"])
    assert rc == 4
    assert "only 0 GPU(s) free" in error_line(capsys)


# -- held blocks -----------------------------------------------------------------------------------
def test_a_block_held_in_the_ledger_is_avoided_by_plan_and_shown_by_topology(run, host, state):
    held = place(host, EMPTY, Request(count=4, gpu_index=4))
    Ledger(state).allocate(Allocation.from_placement("domain:held", held, owner="domain",
                                                     domain="held"))
    doc = json.loads(run("plan", "--gpu-count", "4", "--slurm-gpus", "4,5,6,7", "--json").output)
    assert not set(doc["gpus"]) & {4, 5, 6, 7}
    assert not set(doc["cpus"]) & set(held.cpus)
    assert not set(doc["nvswitches"]) & set(held.nvswitches)
    assert doc["remapped"] is True and doc["aligned"] is True

    out = run("topology", "show").output
    assert "domain:held" in out
    held_row = next(line for line in out.splitlines() if line.startswith("    held  "))
    assert held_row.split()[1:] == [".", ".", ".", ".", "A", "A", "A", "A"]

    topo = json.loads(run("topology", "show", "--json").output)
    by_pci = {g["pci"]: g["held_by"] for g in topo["gpus"]}
    assert [by_pci[g.pci] for g in host.gpus[4:8]] == ["domain:held"] * 4
    assert by_pci[host.gpus[0].pci] is None
    switches = {s["pci"]: s["held_by"] for s in topo["nvswitches"]}
    assert {k for k, v in switches.items() if v} == set(held.nvswitches)
    assert set(topo["allocations"]) == {"domain:held"}


def test_plan_with_gpu_index_of_a_held_block_is_no_fit(host, tree, state, capsys):
    held = place(host, EMPTY, Request(count=4, gpu_index=4))
    Ledger(state).allocate(Allocation.from_placement("domain:held", held, owner="domain",
                                                     domain="held"))
    rc = main(["--sysfs-root", str(tree), "--state-dir", str(state), "plan", "--gpu-count", "4",
               "--gpu-index", "4"])
    assert rc == 4
    line = error_line(capsys)
    assert "--gpu-index 4" in line and "4-7 are in use" in line


# -- environment bindings --------------------------------------------------------------------------
@pytest.mark.parametrize("machine", ["dgx-a100"])
def test_environment_names_sysfs_root_and_state_dir(tree, host, state):
    held = place(host, EMPTY, Request(count=4))
    Ledger(state).allocate(Allocation.from_placement("domain:x", held, owner="domain",
                                                     domain="x"))
    env = {config_mod.ENV_SYSFS_ROOT: str(tree), config_mod.ENV_STATE_DIR: str(state)}
    result = CliRunner().invoke(cli, ["plan", "--gpu-count", "4", "--json"], env=env)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["machine"] == "dgx-a100"
    assert doc["gpus"] == [4, 5, 6, 7] and doc["fm_partition"] == 8   # 0-3 held via the env dir


def test_command_line_wins_over_the_environment(tree, trees, state):
    env = {config_mod.ENV_SYSFS_ROOT: str(trees["dgx-h100"])}
    result = CliRunner().invoke(cli, ["--sysfs-root", str(tree), "--state-dir", str(state),
                                      "topology", "show", "--json"], env=env)
    assert json.loads(result.output)["machine"] == "dgx2"


# -- gres-conf, version ----------------------------------------------------------------------------
def test_gres_conf_prints_one_line_per_gpu(run, host):
    result = run("gres-conf", "--node-name", "dgx01")
    assert result.exit_code == 0
    lines = [line for line in result.output.splitlines() if not line.startswith("#")]
    assert lines == [f"NodeName=dgx01 Name=gpu File=/dev/vfio/{g.iommu_group} "
                     f"Cores={'0-23' if g.index < 8 else '24-47'}" for g in host.gpus]


def test_version_show(run):
    result = run("version", "show")
    assert result.exit_code == 0
    assert result.output.startswith(f"dgxvm {__version__} (python ")
    doc = json.loads(run("version", "show", "--json").output)
    assert doc["dgxvm"] == __version__ and "python" in doc
    assert re.match(r"\d+\.\d+", doc["click"])


# -- simulate --------------------------------------------------------------------------------------
def test_simulate_writes_a_tree_that_topology_reads(tmp_path):
    out = tmp_path / "sim"
    result = CliRunner().invoke(cli, ["simulate", "dgx-h100", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert str(out) in result.output
    topo = CliRunner().invoke(cli, ["--sysfs-root", str(out), "--state-dir",
                                    str(tmp_path / "s"), "topology", "show", "--json"])
    assert json.loads(topo.output)["machine"] == "dgx-h100"


def test_simulate_of_an_unknown_machine_fails_naming_it(tmp_path, capsys):
    rc = main(["simulate", "dgx-9000", "--out", str(tmp_path / "sim")])
    assert rc == 2
    line = error_line(capsys)
    assert "'dgx-9000'" in line and "dgx2" in line
    assert not (tmp_path / "sim").exists()


def test_simulate_refuses_a_non_empty_foreign_directory(tmp_path, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    rc = main(["simulate", "dgx2", "--out", str(out)])
    assert rc == 3
    line = error_line(capsys)
    assert str(out) in line and "refusing" in line
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]
    assert (out / "thesis.tex").read_text() == "years of work"


def test_simulate_with_a_missing_gpu_option(tmp_path):
    out = tmp_path / "sim"
    result = CliRunner().invoke(cli, ["simulate", "dgx2", "--out", str(out),
                                      "--missing-gpu", "39:00.0"])
    assert result.exit_code == 0, result.output
    topo = CliRunner().invoke(cli, ["--sysfs-root", str(out), "--state-dir",
                                    str(tmp_path / "s"), "topology", "show", "--json"])
    gpus = json.loads(topo.output)["gpus"]
    assert [g["pci"] for g in gpus if g.get("missing")] == ["0000:39:00.0"]


def test_main_returns_zero_on_success(tree, state, capsys):
    assert main(["--sysfs-root", str(tree), "--state-dir", str(state), "version", "show"]) == 0
    captured = capsys.readouterr()
    assert re.match(r"dgxvm \S+ \(python ", captured.out) and captured.err == ""
