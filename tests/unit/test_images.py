"""The image store: install/get/list/remove/default, source checks, failure cleanup, VM disks.

Real ``qemu-img`` on small images made in tmp_path (it is a hard dependency of the project, like
libvirt); a fake qemu-img script only where a failure (ENOSPC) has to be provoked.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from slurm_dgxvm import images
from slurm_dgxvm.errors import (DiskError, EXIT_BAD_INPUT, EXIT_HOST, ImageError, ImageInUse,
                                BadName)
from slurm_dgxvm.images import (Image, ImageStore, create_disk, create_overlay, image_info)
from slurm_dgxvm.images.profile import runtime_of

MiB = 1024 * 1024
GiB = 1024 * MiB


def qemu_img(*args) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def info(path) -> dict:
    return json.loads(qemu_img("info", "--output=json", str(path)))


def write_raw(path: Path, size: int = 2 * MiB, *, data: bytes = b"dgxvm test disk") -> Path:
    """A small raw disk: an MBR boot signature and some data, the rest a hole."""
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(446)
        f.write(data[:64])
        f.seek(510)
        f.write(b"\x55\xaa")
    return path


@pytest.fixture
def store(tmp_path) -> ImageStore:
    return ImageStore(tmp_path / "store")


@pytest.fixture
def qcow2(tmp_path) -> Path:
    """A 64 MiB qcow2 holding the raw disk's data (converted, so it has real clusters)."""
    src = tmp_path / "qsrc"
    src.mkdir()
    r = write_raw(src / "base.raw", 64 * MiB)
    out = src / "noble.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(r), str(out))
    r.unlink()
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(store: ImageStore) -> list[str]:
    """Dot-entries of the store other than the lock: partial installs, removals, temp files."""
    if not store.root.exists():
        return []
    return sorted(n for n in os.listdir(store.root) if n.startswith(".") and n != ".lock")


# -- install ---------------------------------------------------------------------------------------
def test_install_qcow2_copies_checks_and_describes_it(store, qcow2):
    seen = []
    img = store.install(qcow2, progress=lambda done, total: seen.append((done, total)))
    assert img.name == "noble"                            # the file's stem
    assert img.format == "qcow2"
    assert img.virtual_size == 64 * MiB
    assert img.sha256 == sha256(qcow2)
    assert img.version == img.sha256[:12]
    assert img.path == str(store.root / "noble" / "disk.qcow2")
    assert Path(img.path).read_bytes() == qcow2.read_bytes()
    assert img.kernel is img.initrd is img.cmdline is None and img.boot == "disk"
    assert img.source == str(qcow2)
    assert img.actual_size > 0
    assert store.get("noble") == img
    assert store.list() == [img]
    # progress: from 0 to the whole file, never backwards
    assert seen[0] == (0, qcow2.stat().st_size) and seen[-1] == (qcow2.stat().st_size,) * 2
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    # readable by the qemu user, not writable by it
    assert stat.S_IMODE(os.stat(store.root / "noble").st_mode) == 0o755
    for f in ("disk.qcow2", "image.json"):
        assert stat.S_IMODE(os.stat(store.root / "noble" / f).st_mode) == 0o644
    assert leftovers(store) == []
    assert info(img.path)["format"] == "qcow2"


def test_install_raw_keeps_holes_and_content(store, tmp_path):
    src = write_raw(tmp_path / "big.img", 32 * MiB)
    img = store.install(src, name="big-1.0")
    assert (img.name, img.format, img.virtual_size) == ("big-1.0", "raw", 32 * MiB)
    assert Path(img.path).name == "disk.raw"
    assert Path(img.path).read_bytes() == src.read_bytes()
    assert img.actual_size < 32 * MiB                     # the holes were not filled in


def test_install_to_json_is_the_profile(store, qcow2):
    doc = store.install(qcow2).to_json()
    assert set(doc) == {"name", "path", "format", "virtual_size", "actual_size", "version",
                        "sha256", "boot", "kernel", "initrd", "cmdline", "installed", "source",
                        "container_runtime", "gpu_devices", "readiness", "shared_connection"}
    json.dumps(doc)


def test_explicit_version_wins(store, qcow2):
    assert store.install(qcow2, version="2024.05").version == "2024.05"


def test_sibling_manifest_gives_the_version(store, qcow2):
    (qcow2.parent / "manifest.json").write_text(json.dumps(
        {"name": "other", "version": "7.1", "disk": qcow2.name}))
    img = store.install(qcow2)
    assert img.version == "7.1"
    assert img.name == "noble"                            # a disk given directly keeps its stem


def test_sibling_manifest_about_another_disk_is_ignored(store, qcow2):
    (qcow2.parent / "manifest.json").write_text(json.dumps({"version": "7.1",
                                                            "disk": "something-else.qcow2"}))
    img = store.install(qcow2)
    assert img.version == img.sha256[:12]


def _builder_output(tmp_path, qcow2, **extra) -> Path:
    out = tmp_path / "build"
    out.mkdir()
    os.rename(qcow2, out / "disk.qcow2")
    (out / "boot").mkdir()
    (out / "boot" / "vmlinuz").write_bytes(b"kernel" * 100)
    (out / "boot" / "initrd.img").write_bytes(b"initrd" * 100)
    manifest = {"name": "dgx-guest", "version": "1.2.3", "disk": "disk.qcow2",
                "kernel": "boot/vmlinuz", "initrd": "boot/initrd.img",
                "cmdline": "root=/dev/vda1 console=ttyS0", **extra}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.mark.parametrize("via", ["file", "directory"])
def test_install_from_a_manifest(store, tmp_path, qcow2, via):
    out = _builder_output(tmp_path, qcow2)
    img = store.install(out / "manifest.json" if via == "file" else out)
    assert (img.name, img.version, img.format) == ("dgx-guest", "1.2.3", "qcow2")
    assert img.boot == "kernel"
    assert img.kernel == str(store.root / "dgx-guest" / "vmlinuz")
    assert img.initrd == str(store.root / "dgx-guest" / "initrd.img")
    assert Path(img.kernel).read_bytes() == b"kernel" * 100
    assert Path(img.initrd).read_bytes() == b"initrd" * 100
    assert img.cmdline == "root=/dev/vda1 console=ttyS0"
    assert img.source == str(out / "manifest.json")
    assert stat.S_IMODE(os.stat(img.kernel).st_mode) == 0o644


def test_options_win_over_the_manifest(store, tmp_path, qcow2):
    out = _builder_output(tmp_path, qcow2)
    img = store.install(out, name="mine", version="9", cmdline="quiet")
    assert (img.name, img.version, img.cmdline) == ("mine", "9", "quiet")


def test_manifest_sha256_is_verified(store, tmp_path, qcow2):
    out = _builder_output(tmp_path, qcow2, sha256="0" * 64)
    with pytest.raises(ImageError, match="does not match the manifest"):
        store.install(out)
    assert store.list() == [] and leftovers(store) == []
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["sha256"] = "sha256:" + sha256(out / "disk.qcow2")
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert store.install(out).name == "dgx-guest"


@pytest.mark.parametrize("manifest, reason", [
    ("not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"name": "x"}', "has no disk"),
    ('{"disk": "missing.qcow2"}', "no such file"),
    ('{"disk": 5}', "must be a path"),
])
def test_bad_manifests_are_refused(store, tmp_path, manifest, reason):
    (tmp_path / "m.json").write_text(manifest)
    with pytest.raises(ImageError, match=reason):
        store.install(tmp_path / "m.json")


def test_a_directory_without_manifest_is_refused(store, tmp_path):
    with pytest.raises(ImageError, match="without manifest.json"):
        store.install(tmp_path)


def test_an_installed_name_is_refused(store, qcow2):
    store.install(qcow2)
    with pytest.raises(ImageError, match="already installed; remove it first"):
        store.install(qcow2)
    with pytest.raises(ImageError, match="already installed"):
        store.install(qcow2, name="noble")
    assert store.install(qcow2, name="noble2").name == "noble2"


@pytest.mark.parametrize("name", ["../x", "a/b", "/abs", ".hidden", "..", "a b", "x" * 64, "a..b"])
def test_bad_names_are_refused_and_nothing_is_written(store, qcow2, tmp_path, name):
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(BadName) as exc:
        store.install(qcow2, name=name)
    assert exc.value.exit_code == EXIT_BAD_INPUT
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not store.root.exists() or os.listdir(store.root) in ([], [".lock"])


def test_the_name_default_is_reserved(store, qcow2):
    with pytest.raises(ImageError, match="reserved"):
        store.install(qcow2, name="default")


def test_a_file_stem_that_is_not_a_name_is_refused(store, tmp_path, qcow2):
    bad = tmp_path / "my image.qcow2"
    os.rename(qcow2, bad)
    with pytest.raises(BadName):
        store.install(bad)
    assert store.install(bad, name="my-image").name == "my-image"


def test_a_missing_source_is_named(store, tmp_path):
    with pytest.raises(ImageError) as exc:
        store.install(tmp_path / "nope.qcow2")
    assert str(tmp_path / "nope.qcow2") in str(exc.value) and "no such file" in str(exc.value)


def test_a_directory_or_device_is_not_an_image(store, tmp_path):
    with pytest.raises(ImageError, match="not a regular file"):
        store.install("/dev/null", name="null")


# "raw" is qemu-img's name for "anything it does not recognise": a raw file has to look like a disk
def test_random_bytes_are_not_a_disk(store, tmp_path):
    junk = bytearray(os.urandom(2 * MiB))
    junk[510:512] = b"\0\0"                               # no MBR signature by chance
    junk[1080:1082] = b"\0\0"
    junk[0:4] = b"JUNK"
    (tmp_path / "junk.img").write_bytes(bytes(junk))
    with pytest.raises(ImageError, match="not a disk image: no partition table"):
        store.install(tmp_path / "junk.img")
    assert leftovers(store) == [] and store.list() == []


@pytest.mark.parametrize("size, reason", [(4096, "at least"), (2 * MiB + 100, "sectors")])
def test_small_or_odd_sized_raw_files_are_refused(store, tmp_path, size, reason):
    f = tmp_path / "x.raw"
    with open(f, "wb") as out:
        out.truncate(size)
        out.seek(510)
        out.write(b"\x55\xaa")
    with pytest.raises(ImageError, match=reason):
        store.install(f)


def test_a_text_file_is_refused(store, tmp_path):
    (tmp_path / "notes.txt").write_text("hello\n" * 1000)
    with pytest.raises(ImageError, match="not a disk image"):
        store.install(tmp_path / "notes.txt")


def test_a_bare_ext4_filesystem_is_a_raw_disk(store, tmp_path):
    f = tmp_path / "rootfs.img"
    with open(f, "wb") as out:
        out.truncate(4 * MiB)
        out.seek(1080)
        out.write(b"\x53\xef")
    assert store.install(f).format == "raw"


def test_other_formats_are_refused_with_a_hint(store, tmp_path):
    qemu_img("create", "-f", "vmdk", str(tmp_path / "x.vmdk"), "16M")
    with pytest.raises(ImageError, match="format vmdk is not supported.*qemu-img convert"):
        store.install(tmp_path / "x.vmdk")


def test_a_qcow2_with_a_scribbled_header_is_refused(store, qcow2):
    with open(qcow2, "r+b") as f:
        f.write(b"XXXX")                                  # the QFI\xfb magic
    with pytest.raises(ImageError, match="not see a qcow2 header"):
        store.install(qcow2)


def test_a_truncated_qcow2_is_refused_as_corrupt(store, qcow2):
    os.truncate(qcow2, 100_000)
    with pytest.raises(ImageError) as exc:
        store.install(qcow2)
    assert "corrupt" in str(exc.value) and str(qcow2) in str(exc.value)
    assert leftovers(store) == [] and store.list() == []


def test_a_qcow2_with_a_broken_l1_table_is_refused(store, qcow2):
    with open(qcow2, "r+b") as f:                         # L1 table offset: far past the end
        f.seek(40)
        f.write((1 << 50).to_bytes(8, "big"))
    with pytest.raises(ImageError, match=str(qcow2)):
        store.install(qcow2)


def test_a_qcow2_with_a_backing_file_is_refused(store, qcow2, tmp_path):
    over = tmp_path / "over.qcow2"
    qemu_img("create", "-f", "qcow2", "-F", "qcow2", "-b", str(qcow2), str(over))
    with pytest.raises(ImageError, match="backing file"):
        store.install(over)


def test_image_info_returns_qemu_img_info(qcow2):
    doc = image_info(qcow2)
    assert doc["format"] == "qcow2" and doc["virtual-size"] == 64 * MiB


def test_missing_qemu_img_is_named(monkeypatch, qcow2):
    monkeypatch.setattr(images.qemu_img, "QEMU_IMG", "/nonexistent/qemu-img")
    with pytest.raises(ImageError, match="not found; install qemu-utils"):
        image_info(qcow2)


@pytest.mark.parametrize("kwargs, reason", [
    ({"kernel": "K"}, "both a kernel and an initrd"),
    ({"initrd": "I"}, "both a kernel and an initrd"),
    ({"cmdline": "quiet"}, "needs a kernel"),
    ({"kernel": "K", "initrd": "missing"}, "initrd: no such file"),
    ({"kernel": "EMPTY", "initrd": "I"}, "kernel: empty file"),
    ({"version": "a\nb"}, "one line"),
])
def test_direct_kernel_boot_arguments_are_checked(store, qcow2, tmp_path, kwargs, reason):
    (tmp_path / "K").write_bytes(b"k" * 10)
    (tmp_path / "I").write_bytes(b"i" * 10)
    (tmp_path / "EMPTY").write_bytes(b"")
    kwargs = {k: (str(tmp_path / v) if k in ("kernel", "initrd") else v)
              for k, v in kwargs.items()}
    with pytest.raises(ImageError, match=reason):
        store.install(qcow2, **kwargs)
    assert store.list() == [] and leftovers(store) == []


def test_kernel_and_initrd_given_as_options(store, qcow2, tmp_path):
    (tmp_path / "K").write_bytes(b"k" * 10)
    (tmp_path / "I").write_bytes(b"i" * 10)
    img = store.install(qcow2, kernel=tmp_path / "K", initrd=tmp_path / "I", cmdline="ro")
    assert img.boot == "kernel" and img.cmdline == "ro"
    assert Path(img.kernel).read_bytes() == b"k" * 10


# -- failures leave nothing behind -----------------------------------------------------------------
def test_disk_full_leaves_no_partial_directory(store, qcow2, monkeypatch):
    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(images.copy, "_write_all", full)
    with pytest.raises(ImageError) as exc:
        store.install(qcow2)
    assert "no space left" in str(exc.value) and str(store.root) in str(exc.value)
    assert exc.value.exit_code == EXIT_BAD_INPUT
    assert leftovers(store) == [] and store.list() == []
    assert not (store.root / "noble").exists()


def test_a_write_error_names_the_store(store, qcow2, monkeypatch):
    def eio(fd, data):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(images.copy, "_write_all", eio)
    with pytest.raises(ImageError, match="cannot write into the image store .*Input/output"):
        store.install(qcow2)
    assert leftovers(store) == []


def test_ctrl_c_during_the_copy_leaves_nothing(store, qcow2):
    def interrupt(done, total):
        if done:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        store.install(qcow2, progress=interrupt)
    assert leftovers(store) == [] and store.list() == []


def test_a_failure_after_the_copy_leaves_nothing(store, qcow2, monkeypatch):
    real = images.store.image_info
    calls = []

    def second_check_fails(path):
        calls.append(path)
        if len(calls) == 2:                               # the check of the copy
            raise ImageError(name=str(path), reason="simulated")
        return real(path)
    monkeypatch.setattr(images.store, "image_info", second_check_fails)
    with pytest.raises(ImageError, match="simulated"):
        store.install(qcow2)
    assert ".partial-" in str(calls[1])
    assert leftovers(store) == [] and store.list() == []


def test_leftovers_of_dead_processes_are_swept(store, qcow2):
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    store.root.mkdir(parents=True)
    stale = store.root / f".old.partial-{p.pid}"
    stale.mkdir()
    (stale / "disk.qcow2").write_bytes(b"x")
    mine = store.root / f".busy.partial-{os.getpid()}"    # a live process's: kept
    mine.mkdir()
    store.install(qcow2)
    assert not stale.exists() and mine.exists()
    assert [i.name for i in store.list()] == ["noble"]


# -- get / list / default --------------------------------------------------------------------------
def test_get_unknown_names_what_is_installed(store, qcow2):
    store.install(qcow2, name="b")
    store.install(qcow2, name="a")
    with pytest.raises(ImageError, match="no image named zz; installed: a, b"):
        store.get("zz")
    assert [i.name for i in store.list()] == ["a", "b"]


def test_get_on_an_empty_store(store):
    assert store.list() == [] and store.default_name() is None
    with pytest.raises(ImageError, match="no image named x; installed: none"):
        store.get("x")


def test_default_handling(store, qcow2):
    with pytest.raises(ImageError) as exc:
        store.get()
    assert str(exc.value) == ("no default image; install one with "
                              "`dgxvm image install SRC --default`")
    store.install(qcow2, name="one")
    with pytest.raises(ImageError, match="no default image"):
        store.get()                                       # the first image is not implicitly it
    store.install(qcow2, name="two", default=True)
    assert store.default_name() == "two" and store.get().name == "two"
    store.set_default("one")
    assert store.get().name == "one"
    assert (store.root / "default").read_text() == "one\n"
    with pytest.raises(ImageError, match="no image named three"):
        store.set_default("three")
    store.remove("two")
    assert store.default_name() == "one"                  # another image's removal: unchanged
    store.remove("one")
    assert store.default_name() is None and not (store.root / "default").exists()


def test_a_stale_default_is_explained(store, qcow2):
    store.install(qcow2, default=True)
    import shutil
    shutil.rmtree(store.root / "noble")                   # behind dgxvm's back
    with pytest.raises(ImageError, match="default image noble is not installed"):
        store.get()


def test_garbage_in_the_default_file_is_an_error(store, qcow2):
    store.install(qcow2)
    (store.root / "default").write_text("../../etc\n")
    with pytest.raises(ImageError, match="not an image name"):
        store.get()


def test_get_verifies_the_disk_is_still_there(store, qcow2):
    img = store.install(qcow2)
    os.unlink(img.path)
    with pytest.raises(ImageError, match="missing or not a regular file"):
        store.get("noble")


def test_broken_entries_are_skipped_by_list_and_reported_by_scan(store, qcow2, caplog):
    store.install(qcow2, name="good")
    (store.root / "empty").mkdir()
    (store.root / "badjson").mkdir()
    (store.root / "badjson" / "image.json").write_text("{")
    escape = store.install(qcow2, name="escape")
    prof = json.loads((store.root / "escape" / "image.json").read_text())
    prof["disk"] = "../good/disk.qcow2"                   # a hand edit pointing elsewhere
    (store.root / "escape" / "image.json").write_text(json.dumps(prof))
    (store.root / "stray-file").write_text("x")
    with caplog.at_level(logging.WARNING, logger="dgxvm.images"):
        assert [i.name for i in store.list()] == ["good"]
    assert "empty is broken" in caplog.text
    imgs, broken = store.scan()
    assert [i.name for i in imgs] == ["good"]
    assert [b.name for b in broken] == ["badjson", "empty", "escape"]
    reasons = {b.name: b.reason for b in broken}
    assert "no image.json" in reasons["empty"]
    assert "not valid JSON" in reasons["badjson"]
    assert "disk" in reasons["escape"]
    assert escape.name == "escape"
    with pytest.raises(ImageError):
        store.get("escape")
    store.remove("empty")                                 # broken entries can be removed
    store.remove("escape")
    assert [b.name for b in store.scan()[1]] == ["badjson"]


# -- remove ----------------------------------------------------------------------------------------
def test_remove_in_use_is_refused(store, qcow2):
    store.install(qcow2)
    with pytest.raises(ImageInUse) as exc:
        store.remove("noble", in_use_by=["job-7", "vm-b", "job-7"])
    assert str(exc.value) == "image noble is in use by job-7, vm-b; delete those VMs first"
    assert exc.value.exit_code == EXIT_BAD_INPUT
    assert store.get("noble")


def test_remove_deletes_everything(store, qcow2, tmp_path):
    (tmp_path / "K").write_bytes(b"k")
    (tmp_path / "I").write_bytes(b"i")
    store.install(qcow2, kernel=tmp_path / "K", initrd=tmp_path / "I")
    store.remove("noble")
    assert store.list() == [] and leftovers(store) == []
    assert not (store.root / "noble").exists()


def test_remove_unknown_and_bad_names(store):
    with pytest.raises(ImageError, match="no image named x"):
        store.remove("x")
    with pytest.raises(BadName):
        store.remove("../etc")


# -- per-VM disks ----------------------------------------------------------------------------------
@pytest.fixture
def image(store, qcow2) -> Image:
    return store.install(qcow2)


def test_create_overlay(image, tmp_path):
    vm = tmp_path / "vm"
    vm.mkdir()
    create_overlay(image, vm / "os.qcow2", 2)
    doc = info(vm / "os.qcow2")
    assert doc["format"] == "qcow2" and doc["virtual-size"] == 2 * GiB
    assert doc["backing-filename"] == image.path and doc["backing-filename-format"] == "qcow2"
    assert stat.S_IMODE(os.stat(vm / "os.qcow2").st_mode) == 0o600
    assert os.listdir(vm) == ["os.qcow2"]


def test_an_overlay_is_never_smaller_than_its_image(image, tmp_path):
    create_overlay(image, tmp_path / "os.qcow2", 0)
    assert info(tmp_path / "os.qcow2")["virtual-size"] == image.virtual_size


def test_an_overlay_of_a_raw_image(store, tmp_path):
    img = store.install(write_raw(tmp_path / "r.raw"))
    create_overlay(img, tmp_path / "os.qcow2", 1)
    assert info(tmp_path / "os.qcow2")["backing-filename-format"] == "raw"


def test_an_existing_disk_is_never_overwritten(image, tmp_path):
    (tmp_path / "os.qcow2").write_text("precious")
    with pytest.raises(DiskError, match="already exists"):
        create_overlay(image, tmp_path / "os.qcow2", 1)
    assert (tmp_path / "os.qcow2").read_text() == "precious"


def test_overlay_in_a_missing_directory(image, tmp_path):
    with pytest.raises(DiskError, match="does not exist"):
        create_overlay(image, tmp_path / "nodir" / "os.qcow2", 1)


@pytest.fixture
def full_qemu_img(tmp_path, monkeypatch) -> Path:
    """A qemu-img that writes half a file and then fails as on a full disk."""
    fake = tmp_path / "fake-qemu-img"
    fake.write_text("#!/bin/sh\n"
                    "for last; do :; done\n"                     # last arg: the size
                    "eval out=\\${$(($#-1))}\n"                  # the one before: the file
                    "printf 'QFI' > \"$out\"\n"
                    "echo \"qemu-img: $out: Could not write: No space left on device\" >&2\n"
                    "exit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(images.qemu_img, "QEMU_IMG", str(fake))
    return fake


def test_overlay_failure_removes_the_partial_file(image, tmp_path, full_qemu_img):
    vm = tmp_path / "vm"
    vm.mkdir()
    with pytest.raises(DiskError) as exc:
        create_overlay(image, vm / "os.qcow2", 4)
    assert str(vm / "os.qcow2") in str(exc.value)
    assert "No space left on device" in str(exc.value)
    assert exc.value.exit_code == EXIT_HOST
    assert os.listdir(vm) == []


def test_create_disk(tmp_path):
    create_disk(tmp_path / "data.qcow2", 3)
    doc = info(tmp_path / "data.qcow2")
    assert doc["format"] == "qcow2" and doc["virtual-size"] == 3 * GiB
    assert "backing-filename" not in doc


def test_create_disk_failures(tmp_path, full_qemu_img):
    with pytest.raises(DiskError, match="No space left"):
        create_disk(tmp_path / "data.qcow2", 3)
    assert [p.name for p in tmp_path.iterdir()] == ["fake-qemu-img"]
    with pytest.raises(DiskError, match="at least 1 GiB"):
        create_disk(tmp_path / "data.qcow2", 0)


def test_remove_with_a_garbled_default_file(store, qcow2):
    store.install(qcow2)
    (store.root / "default").write_text("?!\n")
    store.remove("noble")
    assert store.list() == [] and leftovers(store) == []
    assert (store.root / "default").read_text() == "?!\n"     # not ours to fix


def test_a_profile_without_its_kernel_key_is_a_broken_entry_not_a_crash(store, qcow2):
    """A hand-edited image.json that lost "kernel" once passed the check and then crashed
    `dgxvm image show` with a KeyError."""
    store.install(qcow2, name="good")
    store.install(qcow2, name="edited")
    prof = json.loads((store.root / "edited" / "image.json").read_text())
    del prof["kernel"]
    (store.root / "edited" / "image.json").write_text(json.dumps(prof))
    imgs, broken = store.scan()
    assert [i.name for i in imgs] == ["good"]
    assert [b.name for b in broken] == ["edited"] and "'kernel'" in broken[0].reason
    with pytest.raises(ImageError, match="is invalid"):
        store.get("edited")


# -- the container runtime in the profile ----------------------------------------------------------
def test_an_image_installed_without_saying_has_no_container_runtime(store, qcow2):
    img = store.install(qcow2)
    assert (img.container_runtime, img.gpu_devices) == ("none", "none")
    prof = json.loads((store.root / "noble" / "image.json").read_text())
    assert (prof["container_runtime"], prof["gpu_devices"]) == ("none", "none")
    assert prof["schema_version"] == 1
    assert runtime_of(store.root, "noble") == ("none", "none")


def test_the_manifest_gives_the_container_runtime(store, tmp_path, qcow2):
    out = _builder_output(tmp_path, qcow2, container_runtime="runc", gpu_devices="none")
    img = store.install(out)
    assert (img.container_runtime, img.gpu_devices) == ("runc", "none")
    assert img.to_json()["container_runtime"] == "runc"
    assert store.get("dgx-guest") == img
    assert runtime_of(str(store.root), "dgx-guest") == ("runc", "none")


def test_a_manifest_without_the_keys_or_with_nulls_means_none(store, tmp_path, qcow2):
    out = _builder_output(tmp_path, qcow2, container_runtime=None)
    img = store.install(out)
    assert (img.container_runtime, img.gpu_devices) == ("none", "none")


@pytest.mark.parametrize("key, value", [
    ("container_runtime", "singularity"), ("container_runtime", "RUNC"),
    ("container_runtime", ""), ("container_runtime", 1),
    ("gpu_devices", "amd"), ("gpu_devices", ["nvidia"]),
])
def test_unknown_runtime_values_in_a_manifest_are_refused_naming_them(store, tmp_path, qcow2,
                                                                      key, value):
    out = _builder_output(tmp_path, qcow2, **{key: value})
    with pytest.raises(ImageError) as exc:
        store.install(out)
    msg = str(exc.value)
    assert f"manifest {key} {value!r} is not one of" in msg and str(out / "manifest.json") in msg
    assert exc.value.exit_code == EXIT_BAD_INPUT
    assert store.list() == [] and leftovers(store) == []


def test_the_options_win_over_the_manifests_runtime(store, tmp_path, qcow2):
    out = _builder_output(tmp_path, qcow2, container_runtime="runc", gpu_devices="none")
    img = store.install(out, container_runtime="podman", gpu_devices="cdi")
    assert (img.container_runtime, img.gpu_devices) == ("podman", "cdi")
    store.remove("dgx-guest")
    img = store.install(out, gpu_devices="nvidia")            # one option: the other stays
    assert (img.container_runtime, img.gpu_devices) == ("runc", "nvidia")


@pytest.mark.parametrize("runtime", ["runc", "podman", "docker", "enroot", "none"])
def test_every_runtime_is_recorded(store, qcow2, runtime):
    img = store.install(qcow2, container_runtime=runtime, gpu_devices="nvidia")
    assert store.get("noble").container_runtime == runtime
    assert runtime_of(store.root, "noble") == (runtime, "nvidia") == (img.container_runtime,
                                                                      img.gpu_devices)


@pytest.mark.parametrize("kwargs, what", [
    ({"container_runtime": "lxc"}, "--container-runtime"),
    ({"gpu_devices": "all"}, "--gpu-devices"),
])
def test_unknown_runtime_options_are_refused_naming_them(store, qcow2, kwargs, what):
    ((key, value),) = kwargs.items()
    with pytest.raises(ImageError, match=f"image {what}: {key} '{value}' is not one of"):
        store.install(qcow2, **kwargs)
    assert store.list() == [] and leftovers(store) == []


def test_an_old_profile_without_the_keys_loads_as_none(store, qcow2):
    """image.json files written before the runtime fields (same schema_version 1) stay valid."""
    store.install(qcow2, container_runtime="runc", gpu_devices="cdi")
    path = store.root / "noble" / "image.json"
    prof = json.loads(path.read_text())
    del prof["container_runtime"], prof["gpu_devices"]
    path.write_text(json.dumps(prof))
    img = store.get("noble")
    assert (img.container_runtime, img.gpu_devices) == ("none", "none")
    assert runtime_of(store.root, "noble") == ("none", "none")
    assert store.scan()[1] == []


def test_a_profile_with_an_unknown_runtime_is_broken(store, qcow2):
    store.install(qcow2)
    path = store.root / "noble" / "image.json"
    prof = json.loads(path.read_text())
    prof["container_runtime"] = "lxc"
    path.write_text(json.dumps(prof))
    (broken,) = store.scan()[1]
    assert "container_runtime 'lxc' is not one of" in broken.reason
    with pytest.raises(ImageError, match="container_runtime 'lxc'"):
        runtime_of(store.root, "noble")


def test_runtime_of_missing_broken_and_bad_names(store, qcow2, tmp_path):
    with pytest.raises(ImageError, match="image nope: not installed in"):
        runtime_of(store.root, "nope")                    # no store at all
    store.install(qcow2)
    with pytest.raises(ImageError, match="not installed"):
        runtime_of(store.root, "other")
    for bad in ("../noble", "", "a/b", "default/.."):
        with pytest.raises(ImageError):
            runtime_of(store.root, bad)
    (store.root / "empty").mkdir()
    with pytest.raises(ImageError, match="no image.json"):
        runtime_of(store.root, "empty")
    os.unlink(store.root / "noble" / "disk.qcow2")
    with pytest.raises(ImageError, match="missing or not a regular file"):
        runtime_of(store.root, "noble")


def test_runtime_of_needs_only_read_access(qcow2):
    """An ordinary user can ask: the store is 0755, image.json 0644, nothing is written; a
    store it cannot reach is an ImageError, not a traceback."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run the check as another user")
    with tempfile.TemporaryDirectory(dir="/tmp") as top:     # tmp_path's parents are 0700
        os.chmod(top, 0o755)
        store = ImageStore(Path(top) / "store")
        store.install(qcow2, container_runtime="runc")
        before = sorted(os.listdir(store.root))
        script = ("import sys; from slurm_dgxvm.images.profile import runtime_of; "
                  "from slurm_dgxvm.errors import ImageError\n"
                  "try: print(*runtime_of(sys.argv[1], 'noble'))\n"
                  "except ImageError as e: print('ImageError', e)")

        def as_nobody(root):
            r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                sys.executable, "-c", script, str(root)],
                               capture_output=True, text=True, cwd="/",
                               env={**os.environ,
                                    "PYTHONPATH": str(Path(images.__file__).parents[2])})
            assert r.returncode == 0, r.stderr
            return r.stdout
        assert as_nobody(store.root).split() == ["runc", "none"]
        assert sorted(os.listdir(store.root)) == before
        os.chmod(store.root, 0o700)
        assert as_nobody(store.root).startswith("ImageError image noble: cannot read")
