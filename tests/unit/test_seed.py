"""The per-VM NoCloud seed: its files read back from the ISO, validation, keys, cleanup."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from slurm_dgxvm.errors import SeedError
from slurm_dgxvm.seed import Mount, SeedSpec, generate_keypair, meta_data, user_data, write_seed

@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("keys")
    user_pub = generate_keypair(d / "user", "alice@test")
    host_pub = generate_keypair(d / "host", "vm0 host key")
    return {"user": user_pub, "host_pub": host_pub, "host_priv": (d / "host").read_text()}


@pytest.fixture
def spec(keys) -> SeedSpec:
    return SeedSpec(
        instance_id="dgxvm-job42-0", hostname="job42-vm0", user_name="alice", uid=4242,
        gid=4243, home="/home/alice", authorized_keys=(keys["user"], "ssh-ed25519 AAAA other"),
        host_key_private=keys["host_priv"], host_key_public=keys["host_pub"],
        mounts=(Mount("home0", "/home/alice", "virtiofs"),
                Mount("scratch.1", "/scratch/job42", "9p")))


def extract(iso: Path, dest: Path) -> Path:
    subprocess.run(["xorriso", "-osirrox", "on", "-indev", str(iso), "-extract", "/",
                    str(dest)], check=True, capture_output=True)
    return dest


def volume_id(iso: Path) -> str:
    out = subprocess.run(["xorriso", "-indev", str(iso), "-pvd_info"], check=True,
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith("Volume Id"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no Volume Id in {out!r}")


# -- the image ---------------------------------------------------------------------------------
def test_seed_files_and_label(spec, keys, tmp_path):
    iso = write_seed(spec, tmp_path / "vm0-seed.iso", name="vm0")
    assert iso == tmp_path / "vm0-seed.iso"
    assert stat.S_IMODE(iso.stat().st_mode) == 0o600
    assert volume_id(iso) == "cidata"
    root = extract(iso, tmp_path / "x")
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert names == ["dgxvm/authorized_keys", "dgxvm/hostname", "dgxvm/mounts",
                     "dgxvm/ssh_host_ed25519_key", "dgxvm/ssh_host_ed25519_key.pub",
                     "dgxvm/user", "meta-data", "user-data"]
    d = root / "dgxvm"
    assert (d / "hostname").read_text() == "job42-vm0\n"
    assert (d / "user").read_text() == "alice 4242 4243 /home/alice\n"
    assert (d / "authorized_keys").read_text() == f"{keys['user']}\nssh-ed25519 AAAA other\n"
    assert (d / "ssh_host_ed25519_key").read_text() == keys["host_priv"]
    assert stat.S_IMODE((d / "ssh_host_ed25519_key").stat().st_mode) == 0o600
    assert (d / "ssh_host_ed25519_key.pub").read_text() == keys["host_pub"] + "\n"
    assert (d / "mounts").read_text() == ("home0 /home/alice virtiofs\n"
                                          "scratch.1 /scratch/job42 9p\n")
    assert (root / "meta-data").read_text() == meta_data(spec)
    assert (root / "user-data").read_text() == user_data(spec)
    # nothing but the image is left next to it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm0-seed.iso", "x"]


def test_seed_replaces_an_existing_image(spec, tmp_path):
    out = tmp_path / "seed.iso"
    out.write_text("old")
    write_seed(dataclasses.replace(spec, mounts=()), out, name="vm0")
    assert volume_id(out) == "cidata"
    root = extract(out, tmp_path / "x")
    assert (root / "dgxvm" / "mounts").read_text() == ""


def test_meta_data(spec):
    assert meta_data(spec) == 'instance-id: "dgxvm-job42-0"\nlocal-hostname: "job42-vm0"\n'


def test_user_data_is_cloud_config(spec, keys):
    text = user_data(spec)
    assert text.startswith("#cloud-config\n")
    assert 'hostname: "job42-vm0"' in text
    assert "    uid: 4242\n" in text
    assert "groupadd -o -g 4243 alice" in text
    assert '    homedir: "/home/alice"' in text
    assert '    shell: "/bin/sh"' in text
    assert f"      - {json.dumps(keys['user'])}\n" in text
    assert f"  ed25519_private: {json.dumps(keys['host_priv'])}\n" in text
    assert f"  ed25519_public: {json.dumps(keys['host_pub'])}\n" in text
    assert '  - ["home0", "/home/alice", "virtiofs", "defaults,nofail", "0", "0"]' in text
    assert '"scratch.1", "/scratch/job42", "9p", "trans=virtio' in text
    # every scalar string is a JSON string on one line: the private key has no raw newline
    assert "\n-----END" not in text


def test_user_data_parses_as_yaml_when_a_parser_is_there(spec, keys):
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load(user_data(spec))
    assert doc["users"][0]["name"] == "alice"
    assert doc["users"][0]["uid"] == 4242
    assert doc["ssh_keys"]["ed25519_private"] == keys["host_priv"]
    assert doc["mounts"][1][:3] == ["scratch.1", "/scratch/job42", "9p"]


# -- validation --------------------------------------------------------------------------------
BAD = [
    ("instance_id", ""),
    ("instance_id", "a b"),
    ("hostname", ""),
    ("hostname", "-vm"),
    ("hostname", "vm-"),
    ("hostname", "vm.example.com"),
    ("hostname", "a" * 64),
    ("hostname", "vm 0"),
    ("user_name", "Alice"),
    ("user_name", "1alice"),
    ("user_name", "al ice"),
    ("user_name", "a" * 33),
    ("user_name", "alice\n"),
    ("uid", -1),
    ("uid", "4242"),
    ("uid", True),
    ("gid", -5),
    ("gid", 1.0),
    ("home", "home/alice"),
    ("home", "/home/al ice"),
    ("home", "/home/../root"),
    ("home", "/home/alice\n"),
    ("authorized_keys", ()),
    ("authorized_keys", "ssh-ed25519 AAAA"),
    ("authorized_keys", ("ssh-ed25519 AAAA\nssh-ed25519 BBBB",)),
    ("authorized_keys", ("",)),
    ("host_key_public", "ssh-ed25519 AAAA\nx"),
    ("host_key_private", "not a key"),
    ("host_key_private", "-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n"),
]


@pytest.mark.parametrize("field,value", BAD, ids=[f"{f}={v!r}"[:40] for f, v in BAD])
def test_bad_spec_values(spec, field, value):
    with pytest.raises(SeedError) as err:
        dataclasses.replace(spec, **{field: value})
    if field == "host_key_private":
        return
    shown = value if not isinstance(value, tuple) or not value else value[0]
    assert repr(shown) in str(err.value)


BAD_MOUNTS = [
    ("", "/data", "9p"),
    ("a b", "/data", "9p"),
    ("t" * 37, "/data", "9p"),
    ("tag/x", "/data", "9p"),
    ("tag", "data", "9p"),
    ("tag", "/da ta", "9p"),
    ("tag", "/data/../etc", "9p"),
    ("tag", "/data", "nfs"),
]


@pytest.mark.parametrize("tag,path,fstype", BAD_MOUNTS)
def test_bad_mounts(tag, path, fstype):
    with pytest.raises(SeedError):
        Mount(tag, path, fstype)


def test_duplicate_mount_tags(spec):
    with pytest.raises(SeedError, match="used twice"):
        dataclasses.replace(spec, mounts=(Mount("t", "/a", "9p"), Mount("t", "/b", "9p")))


def test_good_edge_values(spec):
    dataclasses.replace(spec, hostname="a", user_name="_", uid=0, gid=0, home="/",
                        mounts=(Mount("T" * 36, "/x/y.z", "virtiofs"),))
    dataclasses.replace(spec, hostname="A" + "b" * 61 + "9", user_name="a" * 32)


def test_private_key_is_not_in_the_error(spec, keys):
    with pytest.raises(SeedError) as err:
        dataclasses.replace(spec, host_key_private=keys["host_priv"].replace("-----END", "x"))
    assert "PRIVATE" not in str(err.value).split("must be")[0]


# -- keys --------------------------------------------------------------------------------------
def test_generate_keypair(tmp_path):
    line = generate_keypair(tmp_path / "k", "vm0 host")
    assert line.startswith("ssh-ed25519 AAAA") and line.endswith(" vm0 host")
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "k.pub").stat().st_mode) == 0o644
    assert (tmp_path / "k.pub").read_text().strip() == line
    assert "BEGIN OPENSSH PRIVATE KEY" in (tmp_path / "k").read_text()
    # the public half is derivable from the private one
    derived = subprocess.run(["ssh-keygen", "-y", "-f", str(tmp_path / "k")], check=True,
                             capture_output=True, text=True).stdout.split()[:2]
    assert derived == line.split()[:2]


def test_generate_keypair_refuses_to_overwrite(tmp_path):
    generate_keypair(tmp_path / "k", "one")
    before = (tmp_path / "k").read_text()
    with pytest.raises(SeedError, match="already exists"):
        generate_keypair(tmp_path / "k", "two")
    assert (tmp_path / "k").read_text() == before


def test_generate_keypair_reports_ssh_keygen_errors(tmp_path):
    with pytest.raises(SeedError) as err:
        generate_keypair(tmp_path / "missing-dir" / "k", "c")
    assert str(tmp_path / "missing-dir" / "k") in str(err.value)
    assert "ssh-keygen failed" in str(err.value)


def test_generate_keypair_bad_comment(tmp_path):
    with pytest.raises(SeedError, match="one line"):
        generate_keypair(tmp_path / "k", "a\nb")
    assert list(tmp_path.iterdir()) == []


# -- failures leave nothing behind -------------------------------------------------------------
def test_xorriso_missing(spec, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    out = tmp_path / "seed.iso"
    with pytest.raises(SeedError, match="xorriso not found") as err:
        write_seed(spec, out, name="vm0")
    assert err.value.name == "vm0"
    assert list(tmp_path.iterdir()) == []


def test_xorriso_failing(spec, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "xorriso"
    fake.write_text("#!/bin/sh\necho 'xorriso : FAILURE : simulated' >&2\nexit 5\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "seed.iso").write_text("previous")
    with pytest.raises(SeedError) as err:
        write_seed(spec, out_dir / "seed.iso", name="vm0")
    assert "simulated" in str(err.value) and "exit 5" in str(err.value)
    # the previous image is untouched and no staging directory is left
    assert sorted(p.name for p in out_dir.iterdir()) == ["seed.iso"]
    assert (out_dir / "seed.iso").read_text() == "previous"


def test_missing_output_directory(spec, tmp_path):
    with pytest.raises(SeedError, match="does not exist"):
        write_seed(spec, tmp_path / "nope" / "seed.iso", name="vm0")
