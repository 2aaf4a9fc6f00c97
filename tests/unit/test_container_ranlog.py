"""containers.ranlog: the images a job ran, written by the job's user, read by the Epilog into
the job's accounting record. The reader trusts nothing the user wrote."""

from __future__ import annotations

import os

from slurm_dgxvm.containers import ranlog
from slurm_dgxvm.slurm.accounting import decode, encode

D1 = "sha256:" + "a" * 64
D2 = "sha256:" + "b" * 64


def test_what_runs_wrote_comes_back_distinct_in_order(tmp_path):
    (tmp_path / ranlog.FILE).write_text("")
    assert ranlog.append(tmp_path, D1, "127.0.0.1:5000/test/busy:1")
    assert ranlog.append(tmp_path, D2, "nvcr.io#nvidia/pytorch:24.01-py3")
    assert ranlog.append(tmp_path, D1, "127.0.0.1:5000/test/busy:1")
    got = ranlog.read(tmp_path)
    assert got == [("127.0.0.1:5000/test/busy:1", D1), ("nvcr.io/nvidia/pytorch:24.01-py3", D2)]
    value = ranlog.field(got)
    assert value == f"127.0.0.1:5000/test/busy:1@{D1},nvcr.io/nvidia/pytorch:24.01-py3@{D2}"
    # and it survives the AdminComment's encoding
    assert decode(encode({"state": "ended", "containers": value}))["containers"] == value


def test_hostile_lines_are_skipped(tmp_path):
    (tmp_path / ranlog.FILE).write_text(
        "not a line\n"
        f"{D1}\n"
        f"sha256:xyz busybox\n"
        f"{D1} bad ref with spaces\n"
        f"{D1} UPPER/Case:1\n"
        f"{D2} busybox:1 bad/name\n"
        f"{D2} busybox:1 name two\n"
        f"{D2} ok/image:2\n")
    assert ranlog.read(tmp_path) == [("docker.io/ok/image:2", D2)]


def test_a_named_container_is_found_by_its_first_run(tmp_path):
    """dgxvm run --container-name NAME without --container-image finds the image NAME was
    made from; a bad name on a line is not a name."""
    (tmp_path / ranlog.FILE).write_text("")
    assert ranlog.append(tmp_path, D1, "127.0.0.1:5000/test/busy:1", "env1")
    assert ranlog.append(tmp_path, D2, "ok/image:2", "env2")
    assert ranlog.append(tmp_path, D2, "ok/image:2", "env1")     # a later run, another image
    assert ranlog.append(tmp_path, D2, "ok/image:2")
    with open(tmp_path / ranlog.FILE, "a") as f:
        f.write(f"{D1} busybox:1 ../x\n")
    assert ranlog.named(tmp_path, "env1") == ("127.0.0.1:5000/test/busy:1", D1)
    assert ranlog.named(tmp_path, "env2") == ("docker.io/ok/image:2", D2)
    assert ranlog.named(tmp_path, "../x") is None and ranlog.named(tmp_path, "nope") is None
    # accounting still lists each image once
    assert ranlog.read(tmp_path) == [("127.0.0.1:5000/test/busy:1", D1),
                                     ("docker.io/ok/image:2", D2)]


def test_a_symlink_or_a_huge_file_is_not_followed_or_read_whole(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text(f"{D1} stolen/image:1\n")
    vm = tmp_path / "vm"
    vm.mkdir()
    os.symlink(secret, vm / ranlog.FILE)
    assert ranlog.read(vm) == []
    assert not ranlog.append(vm, D2, "x/y:1")
    assert secret.read_text() == f"{D1} stolen/image:1\n"
    os.unlink(vm / ranlog.FILE)
    lines = "".join(f"sha256:{i:064x} img/n{i}:1\n" for i in range(5000))
    (vm / ranlog.FILE).write_text(lines)
    got = ranlog.read(vm)
    assert len(got) == ranlog.MAX_IMAGES
    assert not ranlog.append(vm, D2, "x/y:1")        # full: a run does not grow it further


def test_no_log_is_no_images(tmp_path):
    assert ranlog.read(tmp_path) == []
    assert ranlog.field([]) is None
    assert not ranlog.append(tmp_path, D1, "x/y:1")   # an older VM: nothing is created
    assert not (tmp_path / ranlog.FILE).exists()
