"""GPU faults injected into simulated trees: each kind changes exactly the files a real host would
show changed, read back through SysfsRoot's path shapes; ``clear`` undoes them; the marker
records them; a tree that is not simulated is never touched."""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
import threading
from datetime import datetime

import pytest
from click.testing import CliRunner

from slurm_dgxvm.cli.main import cli, main
from slurm_dgxvm.errors import SimulateError
from slurm_dgxvm.simulate import FAULT_KINDS, MACHINES, inject, inject_all, parse_fault, render
from slurm_dgxvm.topology.discover import discover
from slurm_dgxvm.topology.sysfs import (
    PCI_AER_CORRECTABLE, PCI_AER_FATAL, PCI_AER_NONFATAL, PCI_CONFIG, PCI_DEVICE, PCI_RESET,
    SIMULATED_MARKER, SysfsRoot,
)

H100_GPUS = ["0000:1b:00.0", "0000:43:00.0", "0000:52:00.0", "0000:61:00.0", "0000:9d:00.0",
             "0000:c3:00.0", "0000:d1:00.0", "0000:df:00.0"]
GPU = "0000:43:00.0"          # GPU 1 of the DGX H100


@pytest.fixture
def tree(tmp_path):
    return SysfsRoot(render("dgx-h100", tmp_path / "sim"))


def snapshot(root: SysfsRoot) -> dict[str, tuple]:
    """Every entry below the root (links not followed, FIFOs not opened), the marker aside."""
    entries = {}
    for dirpath, dirnames, filenames in os.walk(root.root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root.root)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                entries[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                entries[rel] = ("dir",)
            elif stat.S_ISFIFO(st.st_mode):
                entries[rel] = ("fifo",)
            elif rel != SIMULATED_MARKER:
                with open(p, "rb") as f:
                    entries[rel] = ("file", f.read())
    return entries


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


def device_dir(root: SysfsRoot, bdf: str = GPU) -> str:
    """The GPU's directory under sys/devices, relative to the root."""
    return os.path.relpath(os.path.realpath(root.path(PCI_DEVICE, bdf=bdf)), root.root)


def aer(root: SysfsRoot, shape: str, bdf: str = GPU) -> dict[str, int]:
    return {name: int(count) for name, count in
            (line.split(" ") for line in root.path(shape, bdf=bdf).read_text().splitlines())}


def faults(root: SysfsRoot) -> list[tuple[str, str]]:
    return [(f["gpu"], f["kind"]) for f in root.simulated().get("faults", [])]


# -- each kind, exactly its files ------------------------------------------------------------------
def test_fell_off_bus_makes_config_read_all_ones_and_nothing_else(tree):
    d, before = device_dir(tree), snapshot(tree)
    inject(tree.root, 1, "fell-off-bus")
    assert changed(before, snapshot(tree)) == {f"{d}/config"}
    cfg = tree.path(PCI_CONFIG, bdf=GPU).read_bytes()
    assert cfg == b"\xff" * 256
    assert struct.unpack_from("<H", cfg, 0) == (0xffff,)
    assert tree.pci_attr(GPU, "vendor") == "0x10de"      # the kernel's cached ids stay


@pytest.mark.parametrize("kind,shape,bucket,total", [
    ("aer-fatal", PCI_AER_FATAL, "MalfTLP", "TOTAL_ERR_FATAL"),
    ("aer-nonfatal", PCI_AER_NONFATAL, "CmpltTO", "TOTAL_ERR_NONFATAL"),
    ("aer-correctable", PCI_AER_CORRECTABLE, "RxErr", "TOTAL_ERR_COR"),
])
def test_an_aer_fault_counts_one_error_in_one_bucket_and_the_total(tree, kind, shape, bucket,
                                                                    total):
    before_counts, before = aer(tree, shape), snapshot(tree)
    inject(tree.root, GPU, kind)
    assert changed(before, snapshot(tree)) == {f"{device_dir(tree)}/{os.path.basename(shape)}"}
    after = aer(tree, shape)
    assert list(after) == list(before_counts)                        # same lines, same order
    assert {k: v for k, v in after.items() if v} == {bucket: 1, total: 1}
    inject(tree.root, GPU, kind)
    assert (aer(tree, shape)[bucket], aer(tree, shape)[total]) == (2, 2)


def test_reset_fail_makes_the_reset_write_fail_with_eisdir(tree):
    d, before = device_dir(tree), snapshot(tree)
    inject(tree.root, 1, "reset-fail")
    assert changed(before, snapshot(tree)) == {f"{d}/reset"}
    with pytest.raises(OSError) as exc:
        with open(tree.path(PCI_RESET, bdf=GPU), "w") as f:
            f.write("1")
    assert exc.value.errno == errno.EISDIR


def test_reset_hang_makes_the_reset_open_block_until_someone_reads(tree):
    d, before = device_dir(tree), snapshot(tree)
    inject(tree.root, 1, "reset-hang")
    assert changed(before, snapshot(tree)) == {f"{d}/reset"}
    path = tree.path(PCI_RESET, bdf=GPU)
    assert stat.S_ISFIFO(os.lstat(path).st_mode)
    with pytest.raises(OSError) as exc:            # no reader: a non-blocking open says so at once
        os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    assert exc.value.errno == errno.ENXIO
    done = threading.Event()

    def reset():
        with open(path, "w") as f:                 # what a naive reader does: it blocks here
            f.write("1")
        done.set()

    t = threading.Thread(target=reset, daemon=True)
    t.start()
    assert not done.wait(0.5)                      # a bounded wait sees the hang
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)    # a reader lets the writer through
    try:
        t.join(5)
        assert done.is_set()
    finally:
        os.close(fd)


def test_missing_takes_the_gpu_off_the_bus_its_driver_and_its_group(tree):
    d, before = device_dir(tree), snapshot(tree)
    group = tree.pci_link_name(GPU, "iommu_group")
    inject(tree.root, 1, "missing")
    assert changed(before, snapshot(tree)) == {
        f"sys/bus/pci/devices/{GPU}", f"sys/bus/pci/drivers/vfio-pci/{GPU}",
        f"sys/kernel/iommu_groups/{group}/devices/{GPU}"}
    assert GPU not in tree.pci_addresses()
    assert not tree.exists(PCI_DEVICE, bdf=GPU)
    assert os.path.isdir(tree.root / d)                 # kept, for clear


@pytest.mark.parametrize("kind", ["fell-off-bus", "reset-fail", "reset-hang", "missing"])
def test_clear_restores_every_file_the_fault_changed(tree, kind):
    before = snapshot(tree)
    inject(tree.root, GPU, kind)
    inject(tree.root, GPU, "clear")
    assert changed(before, snapshot(tree)) == set()
    assert tree.path(PCI_RESET, bdf=GPU).is_file()


def test_clear_undoes_all_faults_at_once_but_keeps_the_aer_counters(tree):
    before = snapshot(tree)
    for kind in ("aer-fatal", "fell-off-bus", "reset-hang", "aer-correctable", "missing"):
        inject(tree.root, GPU, kind)
    inject(tree.root, GPU, "clear")
    d = device_dir(tree)
    assert changed(before, snapshot(tree)) == {f"{d}/aer_dev_fatal", f"{d}/aer_dev_correctable"}
    assert aer(tree, PCI_AER_FATAL)["TOTAL_ERR_FATAL"] == 1
    assert aer(tree, PCI_AER_CORRECTABLE)["TOTAL_ERR_COR"] == 1


def test_clear_of_a_written_reset_makes_it_empty_again(tree):
    tree.path(PCI_RESET, bdf=GPU).write_text("1")
    inject(tree.root, GPU, "clear")
    assert tree.path(PCI_RESET, bdf=GPU).read_bytes() == b""


def test_faults_touch_only_their_gpu(tree):
    before = snapshot(tree)
    for kind in FAULT_KINDS:
        if kind != "clear":
            inject(tree.root, GPU, kind)
    others = {k for k in changed(before, snapshot(tree)) if GPU not in k}
    assert others == set()


# -- the marker ------------------------------------------------------------------------------------
def test_the_marker_lists_every_injection_in_order_clear_included(tree):
    assert "faults" not in tree.simulated()                # a fresh tree has none
    inject(tree.root, 1, "aer-fatal")
    inject(tree.root, "0000:52:00.0", "fell-off-bus")
    inject(tree.root, "43:00.0", "clear")
    marker = tree.simulated()
    assert faults(tree) == [(GPU, "aer-fatal"), ("0000:52:00.0", "fell-off-bus"), (GPU, "clear")]
    for f in marker["faults"]:
        assert set(f) == {"gpu", "kind", "at"}
        assert datetime.fromisoformat(f["at"]).utcoffset().total_seconds() == 0
    assert marker["machine"] == "dgx-h100" and marker["note"].startswith("simulated")


def test_the_marker_is_replaced_atomically_and_nothing_temporary_stays(tree):
    inject(tree.root, 1, "fell-off-bus")
    names = os.listdir(tree.root)
    assert sorted(names) == sorted([SIMULATED_MARKER, "dev", "proc", "sys"])
    assert list(tree.root.rglob(".*tmp*")) == []


def test_inject_returns_the_record_it_appended(tree):
    record = inject(tree.root, 7, "aer-nonfatal")
    assert record == tree.simulated()["faults"][-1]
    assert (record["gpu"], record["kind"]) == ("0000:df:00.0", "aer-nonfatal")


# -- naming GPUs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("gpu,bdf", [(1, GPU), ("1", GPU), (" 1 ", GPU), (GPU, GPU),
                                     ("43:00.0", GPU), (7, "0000:df:00.0"),
                                     ("0000:DF:00.0", "0000:df:00.0"), ("DF:00.0", "0000:df:00.0")])
def test_a_gpu_is_named_by_index_or_pci_address(tree, gpu, bdf):
    assert inject(tree.root, gpu, "aer-correctable")["gpu"] == bdf


@pytest.mark.parametrize("key", sorted(MACHINES))
def test_indices_follow_pci_order_as_discovery_numbers_gpus(tmp_path, key):
    root = render(key, tmp_path / "r")
    host = discover(SysfsRoot(root))
    for g in (host.gpus[0], host.gpus[-1]):
        assert inject(root, g.index, "aer-correctable")["gpu"] == g.pci


def test_a_missing_gpu_loses_its_index_and_is_cleared_by_address(tree):
    inject(tree.root, 1, "missing")
    assert inject(tree.root, 1, "aer-correctable")["gpu"] == "0000:52:00.0"   # the next moved down
    with pytest.raises(SimulateError, match="missing from the bus") as exc:
        inject(tree.root, GPU, "aer-fatal")
    assert exc.value.value == GPU
    inject(tree.root, GPU, "missing")                          # again: nothing more to remove
    inject(tree.root, GPU, "clear")
    assert GPU in tree.pci_addresses()
    assert inject(tree.root, 1, "aer-correctable")["gpu"] == GPU


@pytest.mark.parametrize("bad", [8, "8", "0000:18:00.0", "0000:07:00.0", "gpu0", "-1", ""])
def test_an_unknown_gpu_is_refused_naming_it_and_listing_the_valid_ones(tree, bad):
    before = snapshot(tree)
    with pytest.raises(SimulateError) as exc:
        inject(tree.root, bad, "fell-off-bus")
    msg = str(exc.value)
    assert repr(bad) in msg and exc.value.value == bad
    assert "0=0000:1b:00.0" in msg and "7=0000:df:00.0" in msg
    assert changed(before, snapshot(tree)) == set() and faults(tree) == []


def test_the_listing_names_missing_gpus_by_address(tree):
    inject(tree.root, GPU, "missing")
    with pytest.raises(SimulateError, match=f"missing from the bus \\(by address\\): {GPU}"):
        inject(tree.root, 7, "clear")


def test_an_unknown_kind_is_refused_naming_it_and_listing_the_kinds(tree):
    with pytest.raises(SimulateError, match="'melt'") as exc:
        inject(tree.root, 0, "melt")
    assert exc.value.value == "melt"
    assert "fell-off-bus" in str(exc.value) and "clear" in str(exc.value)
    assert faults(tree) == []


# -- never a real /sys -----------------------------------------------------------------------------
def test_a_tree_without_the_marker_is_refused_naming_it_and_left_alone(tree):
    os.unlink(tree.root / SIMULATED_MARKER)
    before = snapshot(tree)
    with pytest.raises(SimulateError, match="not a simulated tree") as exc:
        inject(tree.root, 0, "fell-off-bus")
    assert str(tree.root) in str(exc.value) and exc.value.value == str(tree.root)
    assert changed(before, snapshot(tree)) == set()


@pytest.mark.parametrize("where", ["absent", "a-file"])
def test_a_root_that_is_no_directory_is_refused(tmp_path, where):
    path = tmp_path / where
    if where == "a-file":
        path.write_text("x")
    with pytest.raises(SimulateError, match="not a simulated tree"):
        inject(path, 0, "clear")


# -- many at once, and render(faults=...) ----------------------------------------------------------
def test_inject_all_counts_indices_before_the_first_fault(tree):
    records = inject_all(tree.root, [(1, "missing"), (2, "aer-fatal")])
    assert [r["gpu"] for r in records] == [GPU, "0000:52:00.0"]


def test_inject_all_checks_every_fault_before_changing_anything(tree):
    before = snapshot(tree)
    for bad in ([(0, "fell-off-bus"), (0, "melt")], [(0, "fell-off-bus"), (9, "clear")]):
        with pytest.raises(SimulateError):
            inject_all(tree.root, bad)
    assert changed(before, snapshot(tree)) == set() and faults(tree) == []


def test_render_applies_faults_to_the_fresh_tree(tmp_path):
    root = SysfsRoot(render("dgx-h100", tmp_path / "r", missing_gpus=["0000:1b:00.0"],
                            faults=[(0, "fell-off-bus"), ("0000:52:00.0", "aer-fatal"),
                                    (0, "missing")]))
    assert faults(root) == [(GPU, "fell-off-bus"), ("0000:52:00.0", "aer-fatal"), (GPU, "missing")]
    assert GPU not in root.pci_addresses()
    assert aer(root, PCI_AER_FATAL, "0000:52:00.0")["TOTAL_ERR_FATAL"] == 1
    assert root.simulated()["missing_gpus"] == ["0000:1b:00.0"]


@pytest.mark.parametrize("bad,match", [((8, "missing"), "unknown GPU 8 of dgx-h100"),
                                       (("0000:1b:00.0", "missing"), "unknown GPU"),
                                       ((0, "melt"), "'melt'")])
def test_render_refuses_a_bad_fault_and_leaves_the_output_as_it_was(tmp_path, bad, match):
    out = tmp_path / "r"
    render("dgx2", out)
    with pytest.raises(SimulateError, match=match):
        render("dgx-h100", out, missing_gpus=["0000:1b:00.0"], faults=[bad])
    assert json.loads((out / SIMULATED_MARKER).read_text())["machine"] == "dgx2"
    assert [p.name for p in tmp_path.iterdir()] == ["r"]


def test_a_tree_with_a_hanging_reset_can_be_rendered_over(tmp_path):
    out = tmp_path / "r"
    render("dgx-h100", out, faults=[(0, "reset-hang")])
    render("dgx-h100", out)
    assert "faults" not in SysfsRoot(out).simulated()


# -- discovery on a faulty tree --------------------------------------------------------------------
def test_discovery_reports_a_missing_gpu_and_numbers_the_rest(tree):
    inject(tree.root, 1, "missing")
    host = discover(tree)
    assert [m.pci for m in host.missing_gpus] == [GPU]
    assert [g.pci for g in host.gpus] == [b for b in H100_GPUS if b != GPU]
    assert [g.index for g in host.gpus] == list(range(7))
    assert any(GPU in note and "missing" in note for note in host.notes)
    inject(tree.root, GPU, "clear")
    assert [g.pci for g in discover(tree).gpus] == H100_GPUS


def test_discovery_still_reads_a_tree_with_every_other_fault(tree):
    for i, kind in enumerate(["fell-off-bus", "aer-fatal", "aer-nonfatal", "aer-correctable",
                              "reset-fail", "reset-hang"]):
        inject(tree.root, i, kind)
    host = discover(tree)
    assert [g.pci for g in host.gpus] == H100_GPUS and host.missing_gpus == ()
    assert host.simulated == "dgx-h100"


# -- parsing GPU:KIND ------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [("3:missing", ("3", "missing")),
                                           ("0000:43:00.0:aer-fatal", ("0000:43:00.0", "aer-fatal")),
                                           ("43:00.0:clear", ("43:00.0", "clear"))])
def test_parse_fault_splits_at_the_last_colon(text, expected):
    assert parse_fault(text) == expected


@pytest.mark.parametrize("text,match", [("3", "not GPU:KIND"), ("3:", "not GPU:KIND"),
                                        (":missing", "not GPU:KIND"), ("3:melt", "'melt'")])
def test_parse_fault_refuses_naming_the_text(text, match):
    with pytest.raises(SimulateError, match=match) as exc:
        parse_fault(text)
    assert exc.value.value == text


# -- the command line ------------------------------------------------------------------------------
def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dgxvm: error: "), err
    return lines[0]


@pytest.mark.usefixtures("clean_env")
def test_cli_renders_a_machine_with_faults_and_says_they_are_simulated(tmp_path):
    out = tmp_path / "sim"
    result = CliRunner().invoke(cli, ["simulate", "dgx-h100", "--out", str(out),
                                      "--fault", "1:missing", "--fault", "0000:52:00.0:aer-fatal"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith(f"simulated dgx-h100 written to {out}")
    assert lines[1:] == [f"fault {k} on GPU {g} (simulated), recorded in {out / SIMULATED_MARKER}"
                         for g, k in [(GPU, "missing"), ("0000:52:00.0", "aer-fatal")]]
    root = SysfsRoot(out)
    assert faults(root) == [(GPU, "missing"), ("0000:52:00.0", "aer-fatal")]
    topo = CliRunner().invoke(cli, ["--sysfs-root", str(out), "--state-dir", str(tmp_path / "s"),
                                    "topology", "show", "--json"])
    assert [g["pci"] for g in json.loads(topo.output)["gpus"] if g.get("missing")] == [GPU]


@pytest.mark.usefixtures("clean_env")
def test_cli_injects_into_an_existing_tree_keeping_earlier_faults_and_counts(tmp_path):
    out = tmp_path / "sim"
    render("dgx-h100", out, faults=[(1, "aer-fatal"), (0, "fell-off-bus")])
    config_before = SysfsRoot(out).path(PCI_CONFIG, bdf="0000:1b:00.0").read_bytes()
    result = CliRunner().invoke(cli, ["simulate", "--fault", "43:00.0:aer-fatal",
                                      "--fault", "7:reset-fail", "--into", str(out)])
    assert result.exit_code == 0, result.output
    assert "(simulated)" in result.output and "simulated dgx-h100 written" not in result.output
    root = SysfsRoot(out)
    assert faults(root) == [(GPU, "aer-fatal"), ("0000:1b:00.0", "fell-off-bus"),
                            (GPU, "aer-fatal"), ("0000:df:00.0", "reset-fail")]
    assert aer(root, PCI_AER_FATAL)["TOTAL_ERR_FATAL"] == 2
    assert root.path(PCI_CONFIG, bdf="0000:1b:00.0").read_bytes() == config_before == b"\xff" * 256
    assert root.path(PCI_RESET, bdf="0000:df:00.0").is_dir()


@pytest.mark.usefixtures("clean_env")
@pytest.mark.parametrize("args,rc,words", [
    (["--fault", "0:melt"], 2, ["--fault", "'melt'", "fell-off-bus"]),
    (["--fault", "melt"], 2, ["--fault", "'melt'", "GPU:KIND"]),
    (["--fault", "8:clear"], 3, ["unknown GPU '8'", "0=0000:1b:00.0"]),
    (["--fault", "0000:18:00.0:clear"], 3, ["'0000:18:00.0'"]),
])
def test_cli_bad_faults_fail_naming_the_value(tmp_path, capsys, args, rc, words):
    out = tmp_path / "sim"
    render("dgx-h100", out)
    assert main(["simulate", *args, "--into", str(out)]) == rc
    line = error_line(capsys)
    for w in words:
        assert w in line
    assert "faults" not in SysfsRoot(out).simulated()


@pytest.mark.usefixtures("clean_env")
def test_cli_refuses_to_inject_into_a_tree_that_is_not_simulated(tmp_path, capsys):
    (tmp_path / "sys").mkdir()
    assert main(["simulate", "--fault", "0:fell-off-bus", "--into", str(tmp_path)]) == 3
    line = error_line(capsys)
    assert str(tmp_path) in line and "not a simulated tree" in line
    assert [p.name for p in tmp_path.iterdir()] == ["sys"]


@pytest.mark.usefixtures("clean_env")
def test_cli_a_bad_fault_at_render_time_leaves_no_tree(tmp_path, capsys):
    assert main(["simulate", "dgx2", "--out", str(tmp_path / "sim"), "--fault", "16:missing"]) == 3
    assert "unknown GPU '16' of dgx2" in error_line(capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.usefixtures("clean_env")
@pytest.mark.parametrize("args,words", [
    ([], "give MACHINE --out DIR, or --fault GPU:KIND --into DIR"),
    (["dgx2"], "MACHINE needs --out DIR"),
    (["--out", "X"], "missing MACHINE"),
    (["--into", "X"], "--into DIR needs at least one --fault"),
    (["dgx2", "--out", "X", "--into", "X", "--fault", "0:clear"], "give one of them"),
    (["--missing-gpu", "34:00.0", "--into", "X", "--fault", "0:clear"], "missing MACHINE"),
    (["--ib-vfs", "4", "--into", "X", "--fault", "0:clear"], "missing MACHINE"),
    (["--serial", "4", "--into", "X", "--fault", "0:clear"], "missing MACHINE"),
])
def test_cli_usage_errors_say_what_is_missing(tmp_path, capsys, args, words):
    args = [str(tmp_path / "x") if a == "X" else a for a in args]
    assert main(["simulate", *args]) == 2
    assert words in error_line(capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.usefixtures("clean_env")
def test_cli_ib_vfs_sets_the_vfs_each_compute_hca_enables(tmp_path, capsys):
    out = tmp_path / "sim"
    assert main(["simulate", "dgx-a100", "--out", str(out), "--ib-vfs", "3"]) == 0
    assert (out / "sys/bus/pci/devices/0000:0c:00.0/sriov_numvfs").read_text() == "3\n"
    assert (out / "sys/bus/pci/devices/0000:0c:00.3").exists()
    assert not (out / "sys/bus/pci/devices/0000:0c:00.4").exists()
    assert main(["simulate", "dgx-a100", "--out", str(tmp_path / "b"), "--ib-vfs", "17"]) == 3
    assert "ib_vfs: 17 VFs per HCA port is not 0..16" in error_line(capsys)
