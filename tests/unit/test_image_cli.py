"""``dgxvm image show|install|remove|default`` through click's CliRunner.

The commands take a click object with ``config`` and ``image_users()``; here it is a stub, and the
group is mounted on a bare root group the way the main CLI mounts it (``cli.add_command(image)``).
Errors are checked as main() sees them: the DgxvmError and its exit code.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import click
import pytest
from click.testing import CliRunner

from slurm_dgxvm.config import Config, ImagesConfig
from slurm_dgxvm.errors import EXIT_BAD_INPUT, BadName, DgxvmError, HypervisorError, ImageInUse
from slurm_dgxvm.cli.images import _Bar, image
from slurm_dgxvm.images import ImageStore

MiB = 1024 * 1024


@click.group()
def root():
    """Stands in for dgxvm's top-level group."""


root.add_command(image)


@pytest.fixture
def users() -> dict:
    return {}


@pytest.fixture
def obj(tmp_path, users):
    return SimpleNamespace(config=Config(images=ImagesConfig(store=str(tmp_path / "store"))),
                           image_users=lambda: users)


@pytest.fixture
def run(obj):
    def _run(*args):
        return CliRunner().invoke(root, ["image", *args], obj=obj)
    return _run


@pytest.fixture
def qcow2(tmp_path) -> Path:
    raw = tmp_path / "base.raw"
    with open(raw, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(510)
        f.write(b"\x55\xaa")
    out = tmp_path / "jammy.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out)],
                   check=True)
    return out


def exit_code(result) -> int:
    """The exit status main() would give: a DgxvmError's own code, else click's."""
    if isinstance(result.exception, DgxvmError):
        return result.exception.exit_code
    return result.exit_code


def test_show_an_empty_store(run):
    r = run("show")
    assert r.exit_code == 0, r.output
    assert "no images in" in r.output and "dgxvm image install SRC --default" in r.output
    doc = json.loads(run("show", "--json").output)
    assert doc["images"] == [] and doc["broken"] == [] and doc["default"] is None


def test_install_then_show(run, qcow2, users):
    r = run("install", str(qcow2), "--default", "--version", "22.04.4")
    assert r.exit_code == 0, r.output
    assert r.output.startswith("installed image jammy: qcow2, 8.0 MiB virtual")
    assert "version 22.04.4" in r.output and r.output.rstrip().endswith("(default)")
    assert "installing" not in r.output                  # no progress bar: stderr is no terminal
    assert run("install", str(qcow2), "--name", "jammy-2").exit_code == 0
    users["jammy"] = ["job-12", "build-vm"]
    out = run("show").output
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "FORMAT", "VIRTUAL", "ON", "DISK", "VERSION", "BOOT",
                                "READY", "RUNTIME", "GPU", "DEVICES", "INSTALLED", "USED", "BY"]
    assert lines[1].startswith("* jammy ") and "22.04.4" in lines[1]
    assert lines[1].rstrip().endswith("build-vm, job-12")
    assert lines[2].startswith("  jammy-2 ") and lines[2].rstrip().endswith("-")
    assert "disk" in lines[1] and "qcow2" in lines[1] and "8.0 MiB" in lines[1]
    assert lines[-1] == "* default image"


def test_show_json(run, qcow2, users, tmp_path):
    run("install", str(qcow2), "--default")
    users["jammy"] = ["vm-a"]
    doc = json.loads(run("show", "--json").output)
    assert doc["store"] == str(tmp_path / "store") and doc["default"] == "jammy"
    (img,) = doc["images"]
    assert img["name"] == "jammy" and img["default"] is True and img["used_by"] == ["vm-a"]
    assert img["format"] == "qcow2" and img["virtual_size"] == 8 * MiB and img["boot"] == "disk"
    assert img["path"] == str(tmp_path / "store" / "jammy" / "disk.qcow2")
    assert img["container_runtime"] == "none" and img["gpu_devices"] == "none"


def test_show_lists_broken_entries(run, qcow2, tmp_path):
    run("install", str(qcow2))
    (tmp_path / "store" / "halfcopied").mkdir()
    r = run("show")
    assert r.exit_code == 0
    assert "  halfcopied  BROKEN: no image.json" in r.output
    doc = json.loads(run("show", "--json").output)
    assert [b["name"] for b in doc["broken"]] == ["halfcopied"]
    assert [i["name"] for i in doc["images"]] == ["jammy"]


def test_show_without_libvirt_still_shows_the_store(obj, run, qcow2):
    run("install", str(qcow2))

    def down():
        raise HypervisorError(uri="qemu:///system", reason="connection refused")
    obj.image_users = down
    r = run("show")
    assert r.exit_code == 0
    assert "cannot tell which VMs use the images" in r.output  # (CliRunner mixes stderr in)
    assert [ln for ln in r.output.splitlines() if ln.startswith("  jammy")][0].endswith("?")


def test_install_errors_are_dgxvm_errors(run, tmp_path, qcow2):
    r = run("install", str(tmp_path / "missing.qcow2"))
    assert exit_code(r) == EXIT_BAD_INPUT and "no such file" in str(r.exception)
    r = run("install", str(qcow2), "--name", "../x")
    assert isinstance(r.exception, BadName) and exit_code(r) == EXIT_BAD_INPUT
    r = run("install", str(qcow2), "--cmdline", "quiet")
    assert "needs a kernel" in str(r.exception)


def test_install_direct_kernel_boot(run, qcow2, tmp_path):
    (tmp_path / "vmlinuz").write_bytes(b"k" * 10)
    (tmp_path / "initrd").write_bytes(b"i" * 10)
    r = run("install", str(qcow2), "--kernel", str(tmp_path / "vmlinuz"),
            "--initrd", str(tmp_path / "initrd"), "--cmdline", "root=/dev/vda1")
    assert r.exit_code == 0, r.output
    assert "boots from kernel" in r.output
    doc = json.loads(run("show", "--json").output)
    assert doc["images"][0]["cmdline"] == "root=/dev/vda1"


def test_remove_in_use_is_refused(run, qcow2, users, obj):
    run("install", str(qcow2))
    users["jammy"] = ["job-3"]
    r = run("remove", "jammy")
    assert isinstance(r.exception, ImageInUse)
    assert exit_code(r) == 2
    assert "in use by job-3" in str(r.exception)
    assert ImageStore(obj.config.images.store).get("jammy")
    users.clear()
    r = run("remove", "jammy")
    assert r.exit_code == 0 and r.output == "removed image jammy\n"
    assert json.loads(run("show", "--json").output)["images"] == []


def test_remove_unknown(run):
    r = run("remove", "nope")
    assert exit_code(r) == EXIT_BAD_INPUT and "no image named nope" in str(r.exception)


def test_default_command(run, qcow2):
    run("install", str(qcow2))
    run("install", str(qcow2), "--name", "other")
    r = run("default", "other")
    assert r.exit_code == 0 and "default image is now other" in r.output
    assert json.loads(run("show", "--json").output)["default"] == "other"


def test_progress_bar_counts_to_the_total(monkeypatch):
    import io
    bars = []
    real = click.progressbar

    def capture(**kw):
        kw["file"] = io.StringIO()
        bars.append(real(**kw))
        return bars[-1]
    monkeypatch.setattr(click, "progressbar", capture)
    bar = _Bar("installing x")
    for done in (0, 10, 60, 100):
        bar(done, 100)
    assert bars[0].pos == 100 and bars[0].length == 100
    bar.close()


def test_help_lists_the_verbs():
    out = CliRunner().invoke(root, ["image", "--help"]).output
    for verb in ("show", "install", "remove", "default"):
        assert verb in out


# -- the container runtime ---------------------------------------------------------------------
def test_install_records_the_container_runtime_and_show_prints_it(run, qcow2, tmp_path):
    r = run("install", str(qcow2), "--container-runtime", "runc", "--gpu-devices", "cdi")
    assert r.exit_code == 0, r.output
    assert "container runtime runc, GPU devices cdi" in r.output
    assert run("install", str(qcow2), "--name", "plain").exit_code == 0
    lines = run("show").output.splitlines()
    header = lines[0]
    col = header.index("RUNTIME")
    gpu = header.index("GPU DEVICES")
    row = {ln.split()[0]: ln for ln in lines[1:3]}
    assert row["jammy"][col:].split()[:2] == ["runc", "cdi"]
    assert row["plain"][col:].split()[:2] == ["none", "none"]
    assert row["jammy"][gpu:].startswith("cdi")
    doc = json.loads(run("show", "--json").output)
    got = {i["name"]: (i["container_runtime"], i["gpu_devices"]) for i in doc["images"]}
    assert got == {"jammy": ("runc", "cdi"), "plain": ("none", "none")}
    prof = json.loads((tmp_path / "store" / "jammy" / "image.json").read_text())
    assert (prof["container_runtime"], prof["gpu_devices"]) == ("runc", "cdi")


def test_the_install_flags_override_the_manifest(run, qcow2, tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"name": "guest", "disk": qcow2.name, "container_runtime": "runc",
         "gpu_devices": "none"}))
    assert run("install", str(tmp_path)).exit_code == 0
    r = run("install", str(tmp_path), "--name", "guest-gpu", "--container-runtime", "docker",
            "--gpu-devices", "nvidia")
    assert r.exit_code == 0, r.output
    doc = json.loads(run("show", "--json").output)
    got = {i["name"]: (i["container_runtime"], i["gpu_devices"]) for i in doc["images"]}
    assert got == {"guest": ("runc", "none"), "guest-gpu": ("docker", "nvidia")}


@pytest.mark.parametrize("args, words", [
    (("--container-runtime", "singularity"),
     "image --container-runtime: container_runtime 'singularity' is not one of runc, podman, "
     "docker, enroot, none"),
    (("--gpu-devices", "amd"),
     "image --gpu-devices: gpu_devices 'amd' is not one of nvidia, cdi, none"),
])
def test_unknown_runtime_flags_are_refused_naming_them(run, qcow2, tmp_path, args, words):
    r = run("install", str(qcow2), *args)
    assert exit_code(r) == EXIT_BAD_INPUT and str(r.exception) == words
    assert not (tmp_path / "store" / "jammy").exists()


def test_a_bad_manifest_runtime_is_refused_naming_it(run, qcow2, tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"disk": qcow2.name,
                                                        "container_runtime": "lxc"}))
    r = run("install", str(tmp_path))
    assert exit_code(r) == EXIT_BAD_INPUT
    assert "manifest container_runtime 'lxc' is not one of" in str(r.exception)


def test_show_an_old_profile_without_the_runtime_keys(run, qcow2, tmp_path):
    run("install", str(qcow2), "--container-runtime", "podman")
    path = tmp_path / "store" / "jammy" / "image.json"
    prof = json.loads(path.read_text())
    del prof["container_runtime"], prof["gpu_devices"]
    path.write_text(json.dumps(prof))
    doc = json.loads(run("show", "--json").output)
    assert doc["broken"] == []
    assert (doc["images"][0]["container_runtime"], doc["images"][0]["gpu_devices"]) == \
        ("none", "none")


def test_install_help_lists_the_runtimes():
    out = CliRunner().invoke(root, ["image", "install", "--help"]).output
    assert "--container-runtime NAME" in out and "--gpu-devices KIND" in out
    for word in ("runc", "podman", "docker", "enroot", "nvidia", "cdi"):
        assert word in out


# -- readiness: when a VM of the image is ready -------------------------------------------------
def test_install_records_readiness_from_the_option_or_the_manifest(run, qcow2, tmp_path):
    r = run("install", str(qcow2), "--readiness", "agent")
    assert r.exit_code == 0, r.output
    assert "ready when its guest agent answers" in r.output
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"name": "cloudy", "disk": str(qcow2),
                                    "readiness": "cloud-init"}))
    r = run("install", str(manifest))
    assert r.exit_code == 0, r.output
    assert "ready when cloud-init applied the seed" in r.output
    assert run("install", str(qcow2), "--name", "plain").exit_code == 0
    lines = run("show").output.splitlines()
    col = lines[0].index("READY")
    row = {ln.split()[0].lstrip("*"): ln for ln in lines[1:4]}
    assert row["jammy"][col:].split()[0] == "agent"
    assert row["cloudy"][col:].split()[0] == "cloud-init"
    assert row["plain"][col:].split()[0] == "auto"       # detected in the guest
    doc = json.loads(run("show", "--json").output)
    assert {i["name"]: i["readiness"] for i in doc["images"]} == {
        "jammy": "agent", "cloudy": "cloud-init", "plain": "auto"}


def test_a_readiness_that_is_not_one_is_refused_naming_it(run, qcow2, tmp_path):
    r = run("install", str(qcow2), "--readiness", "ssh")
    assert r.exit_code != 0
    assert "image --readiness: readiness 'ssh' is not one of auto, agent, cloud-init" in str(
        r.exception)
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"disk": str(qcow2), "readiness": "whenever"}))
    r = run("install", str(manifest))
    assert r.exit_code != 0 and "manifest readiness 'whenever' is not one of" in str(r.exception)
    assert not (tmp_path / "store" / "jammy").exists() and not (tmp_path / "store" / "m").exists()


# -- shared_connection: whether a job's runs share one ssh connection ---------------------------
def test_install_records_shared_connection_from_the_option_or_the_manifest(run, qcow2, tmp_path):
    from slurm_dgxvm.images.profile import shares_connection
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"name": "cloudy", "disk": str(qcow2),
                                    "shared_connection": "yes"}))
    assert run("install", str(manifest)).exit_code == 0
    assert run("install", str(manifest), "--name", "overridden",
               "--shared-connection", "no").exit_code == 0
    assert run("install", str(qcow2), "--name", "plain").exit_code == 0
    doc = json.loads(run("show", "--json").output)
    assert {i["name"]: i["shared_connection"] for i in doc["images"]} == {
        "cloudy": "yes", "overridden": "no", "plain": "no"}      # no: the default
    store = tmp_path / "store"
    assert shares_connection(store, "cloudy")
    assert not shares_connection(store, "overridden") and not shares_connection(store, "plain")
    assert not shares_connection(store, "missing") and not shares_connection(store, "../x")


def test_a_shared_connection_that_is_not_one_is_refused_naming_it(run, qcow2, tmp_path):
    r = run("install", str(qcow2), "--shared-connection", "maybe")
    assert r.exit_code != 0
    assert "shared_connection 'maybe' is not one of no, yes" in str(r.exception)
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"disk": str(qcow2), "shared_connection": True}))
    r = run("install", str(manifest))
    assert r.exit_code != 0 and "manifest shared_connection True is not one of" in str(
        r.exception)
