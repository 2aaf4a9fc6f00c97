"""containers.ranlog: the images a job ran, written by the job's user, read by the Epilog into
the job's accounting record. The reader trusts nothing the user wrote."""

from __future__ import annotations

import json
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
    assert 0 < len(got) <= ranlog.MAX_BYTES // len(lines.splitlines()[0])   # the first 64 KiB
    assert ranlog.field(got).count("@") == ranlog.MAX_IMAGES
    assert not ranlog.append(vm, D2, "x/y:1")        # full: a run does not grow it further


def test_no_log_is_no_images(tmp_path):
    assert ranlog.read(tmp_path) == []
    assert ranlog.field([]) is None
    assert not ranlog.append(tmp_path, D1, "x/y:1")   # an older VM: nothing is created
    assert not (tmp_path / ranlog.FILE).exists()


# -- what reaches the record: only images the user's cache holds --------------------------------
UID, GID = 54341, 54342


def _entry(cache, digest, meta=None):
    algo, hex_ = digest.split(":")
    d = cache / algo / hex_
    d.mkdir(parents=True)
    (d / "image.json").write_text(json.dumps(meta or {"digest": digest}))


def _owned(cache):
    for p in [cache, *cache.rglob("*")]:
        os.lchown(p, UID, GID)


def test_only_images_in_the_users_cache_reach_the_record(traversable_tmp):
    cache = traversable_tmp / "cache"
    cache.mkdir(mode=0o700)
    d3, d4, d5 = ("sha256:" + c * 64 for c in "cde")
    _entry(cache, D1)                                    # pulled: kept
    _entry(cache, D2, {"digest": d3})                    # an entry that is another image
    (cache / "sha256" / ("c" * 64)).mkdir()              # no image.json: a pull not finished
    (cache / "sha256" / ("d" * 64)).symlink_to(cache / "sha256" / ("a" * 64))
    os.mkfifo(cache / "sha256" / ("e" * 64))             # a FIFO where an entry would be
    _owned(cache)
    images = [("r/one:1", D1), ("r/two:1", D2), ("r/three:1", d3), ("r/four:1", d4),
              ("r/five:1", d5), ("r/never:1", "sha256:" + "f" * 64)]
    assert ranlog.in_cache(images, str(cache), UID, GID) == [("r/one:1", D1)]


def test_a_cache_that_does_not_answer_or_is_absent_names_no_image(traversable_tmp):
    cache = traversable_tmp / "cache"
    cache.mkdir(mode=0o700)
    _entry(cache, D1)
    _owned(cache)
    assert ranlog.in_cache([("r/one:1", D1)], None, UID, GID) == []
    assert ranlog.in_cache([("r/one:1", D1)], str(cache), 0, 0) == []       # never as root
    os.chmod(cache, 0)                                                     # the user's choice
    assert ranlog.in_cache([("r/one:1", D1)], str(cache), UID, GID) == []
    os.chmod(cache, 0o700)
    os.chown(cache, UID + 1, GID)                                          # not the user's
    assert ranlog.in_cache([("r/one:1", D1)], str(cache), UID, GID) == []


def test_lines_naming_images_never_pulled_push_no_real_image_out(traversable_tmp):
    cache = traversable_tmp / "cache"
    cache.mkdir(mode=0o700)
    _entry(cache, D2)
    _owned(cache)
    vmdir = traversable_tmp / "vm"
    vmdir.mkdir()
    (vmdir / ranlog.FILE).write_text("".join(f"sha256:{i:064d} forged/x:{i}\n"
                                             for i in range(ranlog.MAX_IMAGES + 4)))
    assert ranlog.append(vmdir, D2, "real/image:2")
    kept = ranlog.in_cache(ranlog.read(vmdir), str(cache), UID, GID)
    assert ranlog.field(kept) == f"docker.io/real/image:2@{D2}"
    many = [(f"r/{i}:1", f"sha256:{i:064d}") for i in range(ranlog.MAX_IMAGES + 2)]
    assert ranlog.field(many).count("@") == ranlog.MAX_IMAGES
