"""The per-VM NoCloud seed: its files read back from the ISO, validation, keys, cleanup."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from slurm_dgxvm.errors import SeedError
from slurm_dgxvm.seed import (GUEST_HELPER_PATH, GUEST_HELPER_SOURCE, HOSTS_MARK, HOSTS_TEMPLATE,
                              NINEP_OPTIONS, Fabric, Mount, SeedSpec, generate_keypair, meta_data,
                              pct, user_data, write_seed)

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
    assert names == ["dgxvm/authorized_keys", "dgxvm/dgxvm-guest", "dgxvm/groups",
                     "dgxvm/hostname", "dgxvm/mounts",
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
    # the guest side of `dgxvm run`, executable, byte for byte the package's
    assert (d / "dgxvm-guest").read_text() == GUEST_HELPER_SOURCE.read_text()
    assert (d / "dgxvm-guest").stat().st_mode & 0o111
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
    # the primary group: a fixed script with the values as its arguments, never in its text
    assert ('  - ["sh", "-c", "getent group \\"$1\\" >/dev/null || groupadd -o -g \\"$2\\" '
            '\\"$1\\"", "dgxvm-groupadd", "alice", "4243"]\n') in text
    assert '    homedir: "/home/alice"' in text
    assert '    shell: "/bin/sh"' in text
    assert '  - path: "/etc/ssh/dgxvm/authorized_keys/alice"\n' in text
    assert f"  ed25519_private: {json.dumps(keys['host_priv'])}\n" in text
    assert f"  ed25519_public: {json.dumps(keys['host_pub'])}\n" in text
    assert '  - ["mount", "-t", "virtiofs", "-o", "nosuid,nodev", "home0", "/home/alice"]' in text
    assert '"9p", "-o", "nosuid,nodev,trans=virtio' in text
    assert "\nmounts:" not in text         # cloud-init 22.4 may skip a virtiofs tag there
    # every scalar string is a JSON string on one line: the private key has no raw newline
    assert "\n-----END" not in text


def test_user_data_parses_as_yaml_when_a_parser_is_there(spec, keys):
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load(user_data(spec))
    assert doc["users"][0]["name"] == "alice"
    assert doc["users"][0]["uid"] == 4242
    assert doc["ssh_keys"]["ed25519_private"] == keys["host_priv"]
    assert ["mkdir", "-p", "/scratch/job42"] in doc["bootcmd"]
    assert doc["bootcmd"][-1] == ["mount", "-t", "9p", "-o", "nosuid,nodev," + NINEP_OPTIONS,
                                  "scratch.1", "/scratch/job42"]
    # cloud-init images get the guest side of `dgxvm run` from write_files
    [helper] = [w for w in doc["write_files"] if w["path"] == GUEST_HELPER_PATH]
    assert helper["permissions"] == "0755"
    assert base64.b64decode(helper["content"]).decode() == GUEST_HELPER_SOURCE.read_text()


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
    ("user_name", "al ice"),
    ("user_name", "a" * 33),
    ("user_name", "alice\n"),
    ("user_name", "a:b"),
    ("user_name", "a/b"),
    ("user_name", "-alice"),
    ("user_name", "1234"),
    ("user_name", "al\x7fice"),
    ("user_name", "al\udcffice"),           # a non-UTF-8 byte through surrogateescape
    ("uid", -1),
    ("uid", "4242"),
    ("uid", True),
    ("gid", -5),
    ("gid", 1.0),
    ("home", "home/alice"),
    ("home", "/home/../root"),
    ("home", "/home/alice\n"),
    ("home", "/home/al\tice"),
    ("home", "/home/al\udce9ice"),
    ("home", "/home//alice"),
    ("home", "/home/alice/"),
    ("home", "/home/a:b"),
    ("groups", ("wheel",)),
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


@pytest.mark.parametrize("group,shown", [
    (("wheel", -1), -1),
    (("wheel", 2 ** 32 - 1), 2 ** 32 - 1),
    (("a b", 10), "a b"),
    (("a\nb", 10), "a\nb"),
    (("", 10), ""),
])
def test_bad_groups(spec, group, shown):
    with pytest.raises(SeedError) as err:
        dataclasses.replace(spec, groups=(group,))
    assert repr(shown) in str(err.value)


BAD_MOUNTS = [
    ("", "/data", "9p"),
    ("a b", "/data", "9p"),
    ("t" * 37, "/data", "9p"),
    ("tag/x", "/data", "9p"),
    ("tag", "data", "9p"),
    ("tag", "/da\nta", "9p"),
    ("tag", "/data/", "9p"),
    ("tag", "/data/../etc", "9p"),
    ("tag", "/data", "nfs"),
]


@pytest.mark.parametrize("tag,path,fstype", BAD_MOUNTS)
def test_bad_mounts(tag, path, fstype):
    with pytest.raises(SeedError):
        Mount(tag, path, fstype)


def test_read_only_must_be_a_bool():
    with pytest.raises(SeedError, match="read_only"):
        Mount("t", "/a", "virtiofs", read_only="yes")


def test_a_read_only_share_is_mounted_ro_nosuid_nodev(spec, tmp_path):
    """The user's container image cache: one more line with a 4th field "ro" in dgxvm/mounts
    (the read-write lines keep their 3 fields), ``ro,nosuid,nodev`` in cloud-init's bootcmd."""
    yaml = pytest.importorskip("yaml")
    cache = "/var/lib/dgxvm/containers/4242"
    s = dataclasses.replace(spec, mounts=(*spec.mounts,
                                          Mount("dgxvm-images", cache, "virtiofs",
                                                read_only=True)))
    root = extract(write_seed(s, tmp_path / "seed.iso", name="vm0"), tmp_path / "x")
    assert (root / "dgxvm" / "mounts").read_text() == (
        "home0 /home/alice virtiofs\nscratch.1 /scratch/job42 9p\n"
        f"dgxvm-images {cache} virtiofs ro\n")
    doc = yaml.safe_load((root / "user-data").read_text())
    assert doc["bootcmd"][-2:] == [["mkdir", "-p", cache],
                                   ["mount", "-t", "virtiofs", "-o", "ro,nosuid,nodev",
                                    "dgxvm-images", cache]]
    assert ["mount", "-t", "virtiofs", "-o", "nosuid,nodev", "home0", "/home/alice"] \
        in doc["bootcmd"]


SHARE_OPTIONS_BACK = r"""
. "$SEED_SH"
while read -r tag path fstype mode; do
    printf '%s=%s\n' "$tag" "$(share_options "$fstype" "$mode" || echo REFUSED)"
done < "$S/mounts"
"""


def test_the_guest_reads_old_and_read_only_mount_lines(busybox, tmp_path):
    """dgxvm-init's reader (seed.sh share_options, the guest's busybox): a 3-field line is a
    read-write share as before, a 4th field "ro" adds ro, anything else is refused."""
    (tmp_path / "mounts").write_text(
        "a /w virtiofs\nb /c virtiofs ro\nc /n 9p\nd /n 9p ro\ne /x virtiofs rw\n"
        "f /x virtiofs RO\ng /x nfs\nh /x virtiofs ro extra\n")
    out = subprocess.run([busybox, "sh", "-c", SHARE_OPTIONS_BACK], check=True,
                         capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "S": str(tmp_path),
                              "SEED_SH": str(GUEST_SEED_SH)}).stdout
    assert out.splitlines() == [
        "a=nosuid,nodev", "b=ro,nosuid,nodev", f"c=nosuid,nodev,{NINEP_OPTIONS}",
        f"d=ro,nosuid,nodev,{NINEP_OPTIONS}", "e=nosuid,nodev", "f=REFUSED", "g=REFUSED",
        "h=REFUSED"]


def test_duplicate_mount_tags(spec):
    with pytest.raises(SeedError, match="used twice"):
        dataclasses.replace(spec, mounts=(Mount("t", "/a", "9p"), Mount("t", "/b", "9p")))


def test_good_edge_values(spec):
    dataclasses.replace(spec, hostname="a", user_name="_", uid=0, gid=0, home="/",
                        mounts=(Mount("T" * 36, "/x/y.z", "virtiofs"),))
    dataclasses.replace(spec, hostname="A" + "b" * 61 + "9", user_name="a" * 32)
    for user in ("john.doe", "Alice", "u2", "1alice", "o'brien"):
        dataclasses.replace(spec, user_name=user)
    for path in ("/tmp/a b", "/home/x/été", "/w/it's $HOME;`x` $(y) <&>", "/a/" + "b" * 255):
        dataclasses.replace(spec, home=path, mounts=(Mount("t", path, "9p"),))


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


def test_a_hanging_xorriso_is_bounded(spec, tmp_path, monkeypatch):
    import slurm_dgxvm.seed as seed_mod
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "xorriso").write_text("#!/bin/sh\nexec sleep 30\n")
    (bin_dir / "xorriso").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(seed_mod, "TOOL_TIMEOUT_S", 0.3)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(SeedError, match="xorriso did not finish in 0.3s") as err:
        write_seed(spec, out_dir / "seed.iso", name="vm0")
    assert err.value.exit_code == 3
    assert list(out_dir.iterdir()) == []


def test_missing_output_directory(spec, tmp_path):
    with pytest.raises(SeedError, match="does not exist"):
        write_seed(spec, tmp_path / "nope" / "seed.iso", name="vm0")


# -- legitimate values, end to end: seed.py writes them, the guest's own reader decodes them --------
GUEST_SEED_SH = Path(__file__).resolve().parents[2] / "slurm_dgxvm/seedfiles/seed.sh"
GUEST_DEBS = Path("/var/cache/dgxvm/test-guest/debs")    # guest-image/build.py's download cache


@pytest.fixture(scope="module")
def busybox(tmp_path_factory) -> str:
    """The guest's busybox (Debian's busybox-static): from PATH, else from the guest image's
    package cache. dash's printf has no \\x escape, so only busybox proves the decoder."""
    import shutil
    found = shutil.which("busybox")
    if found:
        return found
    debs = sorted(GUEST_DEBS.glob("busybox-static_*.deb"))
    if not debs:
        pytest.fail("no busybox: scripts/bootstrap installs busybox-static (the guest's own)")
    root = tmp_path_factory.mktemp("busybox")
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(root)], check=True)
    return str(root / "bin" / "busybox")


READ_BACK = r"""
. "$SEED_SH"
read -r user uid gid home < "$S/user"
printf 'user=%s\n' "$(pct_decode "$user")"
printf 'home=%s\n' "$(pct_decode "$home")"
seed_account "$(pct_decode "$user")" "$uid" "$gid" "$(pct_decode "$home")"
while read -r gname ggid; do
    seed_group "$(pct_decode "$gname")" "$ggid" "$(pct_decode "$user")"
done < "$S/groups"
while read -r tag path fstype; do
    printf 'mount=%s|%s|%s\n' "$tag" "$(pct_decode "$path")" "$fstype"
done < "$S/mounts"
"""

LEGIT = [
    ("john.doe", "/home/john.doe", "/tmp/a b"),
    ("Alice", "/home/Alice", "/home/x/été"),
    ("u2", "/home/u2", "/w/it's $HOME; `x` $(y) <&> \"q\" * 100% \\n"),
    ("o'brien", "/home/o'brien", "/tmp/ leading and trailing "),
]


@pytest.mark.parametrize("shell", ["busybox", "dash"])
@pytest.mark.parametrize("user,home,workdir", LEGIT, ids=[u for u, _, _ in LEGIT])
def test_legitimate_names_and_paths_reach_the_guest_unchanged(spec, busybox, tmp_path, user,
                                                               home, workdir, shell):
    """john.doe, Alice and a work dir with spaces, quotes, '$' or é used to drain the node;
    they must come out of the seed exactly as they went in, for cloud-init and for the seed
    readers alike: under the test guest's busybox (its init) and under dash (a warm VM's claim
    in a Debian cloud guest, whose /bin/sh it is)."""
    yaml = pytest.importorskip("yaml")
    groups = (("Domain-Users", 5000), ("tty", 5), ("root", 77))
    s = dataclasses.replace(spec, user_name=user, home=home, groups=groups,
                            mounts=(Mount("dgxvm-share", workdir, "virtiofs"),))
    root = extract(write_seed(s, tmp_path / "seed.iso", name="vm0"), tmp_path / "x")

    doc = yaml.safe_load((root / "user-data").read_text(encoding="utf-8"))
    [u] = doc["users"]
    assert (u["name"], u["homedir"], u["groups"]) == (user, home, ["Domain-Users", "tty", "root"])
    assert ["sh", "-c", 'getent group "$1" >/dev/null || groupadd -o -g "$2" "$1"',
            "dgxvm-groupadd", user, "4243"] == doc["bootcmd"][0]
    assert ["mkdir", "-p", workdir] in doc["bootcmd"]
    assert ["mount", "-t", "virtiofs", "-o", "nosuid,nodev", "dgxvm-share", workdir] \
        == doc["bootcmd"][-1]

    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "group").write_text("root:x:0:\ntty:x:5:\nnogroup:x:65534:\n")
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (etc / "shadow").write_text("")
    sh = [busybox, "sh"] if shell == "busybox" else ["dash"]
    out = subprocess.run([*sh, "-c", READ_BACK], check=True, capture_output=True,
                         env={"PATH": "/usr/bin:/bin", "ETC": str(etc), "S": str(root / "dgxvm"),
                              "SEED_SH": str(GUEST_SEED_SH)}).stdout.decode("utf-8")
    assert out.splitlines() == [f"user={user}", f"home={home}",
                                f"mount=dgxvm-share|{workdir}|virtiofs"]
    assert (etc / "passwd").read_text(encoding="utf-8").splitlines()[-1] == \
        f"{user}:x:4242:4243::{home}:/bin/sh"
    assert (etc / "group").read_text(encoding="utf-8").splitlines() == [
        "root:x:0:", f"tty:x:5:{user}", "nogroup:x:65534:", f"{user}:x:4243:",
        f"Domain-Users:x:5000:{user}", f"g77:x:77:{user}"]


def test_percent_encoding_keeps_fields_free_of_whitespace():
    assert pct("john.doe") == "john.doe" and pct("/tmp/a b") == "/tmp/a%20b"
    assert pct("/home/x/été") == "/home/x/%C3%A9t%C3%A9"
    assert pct("100%\\") == "100%25%5C"     # no '%' or backslash left for printf %b to misread


def test_the_user_gets_subordinate_ids_and_its_groups_for_own_uid_containers(spec, busybox,
                                                                               tmp_path):
    """A container runs as the user's own uid with a subordinate root (dgxvm-guest userns):
    the test guest's init (seed_subids) and cloud-init's bootcmd give the user one range of
    uids and gids and each supplementary gid, the same ids, once however often it boots."""
    yaml = pytest.importorskip("yaml")
    from slurm_dgxvm import seed as seed_mod
    text = GUEST_SEED_SH.read_text()
    assert f"SUBID_START={seed_mod.SUBID_START}\n" in text
    assert f"SUBID_COUNT={seed_mod.SUBID_COUNT}\n" in text
    rng = f"{seed_mod.SUBID_START}:{seed_mod.SUBID_COUNT}"
    want_uid = [f"john.doe:{rng}"]
    want_gid = [f"john.doe:{rng}", "john.doe:5000:1", "john.doe:77:1"]

    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "subuid").write_text("other:100000:65536\n")
    for _ in range(2):     # a second boot adds nothing
        subprocess.run([busybox, "sh", "-c", '. "$SEED_SH" && seed_subids john.doe 5000 77'],
                       check=True, env={"PATH": "/usr/bin:/bin", "ETC": str(etc),
                                        "SEED_SH": str(GUEST_SEED_SH)})
    assert (etc / "subuid").read_text().splitlines() == ["other:100000:65536", *want_uid]
    assert (etc / "subgid").read_text().splitlines() == want_gid

    s = dataclasses.replace(spec, user_name="john.doe", groups=(("Domain-Users", 5000),
                                                                ("root", 77)))
    root = extract(write_seed(s, tmp_path / "seed.iso", name="vm0"), tmp_path / "x")
    doc = yaml.safe_load((root / "user-data").read_text(encoding="utf-8"))
    [cmd] = [c for c in doc["bootcmd"] if "dgxvm-subids" in c]
    assert cmd[:2] == ["sh", "-c"] and cmd[3:] == ["dgxvm-subids", "john.doe", "5000", "77"]
    # cloud-init runs it with the image's sh against /etc: run it here against a scratch root
    script = cmd[2].replace("/etc/", f"{etc}/cloud-")
    for _ in range(2):
        subprocess.run(["sh", "-c", script, *cmd[3:]], check=True)
    assert (etc / "cloud-subuid").read_text().splitlines() == want_uid
    assert (etc / "cloud-subgid").read_text().splitlines() == want_gid


# -- a multi-node job's fabric -------------------------------------------------------------------
FABRIC = Fabric(mac="0a:de:00:00:2a:01", address="10.64.0.11/16", mtu=1450,
                hosts=(("dgxa", "10.64.0.10"), ("dgxb", "10.64.0.11")))


def test_a_fabric_seed_names_the_nic_and_the_nodes(spec, tmp_path):
    root = extract(write_seed(dataclasses.replace(spec, fabric=FABRIC), tmp_path / "s.iso",
                              name="vm0"), tmp_path / "x")
    assert (root / "dgxvm/fabric").read_text() == "0a:de:00:00:2a:01 10.64.0.11/16 1450\n"
    assert (root / "dgxvm/hosts").read_text() == "10.64.0.10 dgxa\n10.64.0.11 dgxb\n"
    # without one, neither file exists (a one-node job's guest configures no second NIC)
    plain = extract(write_seed(spec, tmp_path / "p.iso", name="vm0"), tmp_path / "y")
    assert not (plain / "dgxvm/fabric").exists() and not (plain / "dgxvm/hosts").exists()


@pytest.mark.parametrize("field,value,shown", [
    ("mac", "0A:DE:00:00:2A:01", "fabric mac"), ("mac", "0a:de:00:00:2a", "fabric mac"),
    ("address", "10.64.0.11", "fabric address"), ("address", "10.64.0.300/16", "fabric address"),
    ("address", "10.64.0.11/31", "fabric address"), ("mtu", 100, "fabric mtu"),
    ("mtu", True, "fabric mtu"), ("hosts", (("dgx a", "10.64.0.10"),), "fabric host name"),
    ("hosts", (("dgxa", "10.64.0"),), "fabric host address"),
    ("hosts", (("-dgxa\n", "10.64.0.10"),), "fabric host name")])
def test_bad_fabric_values_are_refused_naming_them(field, value, shown):
    with pytest.raises(SeedError) as info:
        dataclasses.replace(FABRIC, **{field: value})
    bad = value[0][0 if "name" in shown else 1] if field == "hosts" else value
    assert f"bad {shown} {bad!r}:" in str(info.value)


def test_the_test_guest_brings_up_the_fabric_nic_by_its_mac(busybox, tmp_path):
    """seed.sh's seed_fabric finds the NIC by MAC under $SYS and runs ip with the MTU and the
    address (a stand-in ip records the calls); seed_hosts adds the nodes to $ETC/hosts."""
    sys_net = tmp_path / "sys/class/net"
    for name, mac in (("eth0", "52:54:00:12:34:56"), ("eth1", FABRIC.mac)):
        (sys_net / name).mkdir(parents=True)
        (sys_net / name / "address").write_text(mac + "\n")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "ip.log"
    (bindir / "ip").write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    (bindir / "ip").chmod(0o755)
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "hosts").write_text("127.0.0.1\tlocalhost\n")
    seed_dir = extract(write_seed_for_fabric(tmp_path), tmp_path / "x") / "dgxvm"
    script = ('. "$SEED_SH" && read -r m a u < "$S/fabric" && seed_fabric "$m" "$a" "$u" '
              '&& seed_hosts "$S/hosts"')
    out = subprocess.run([busybox, "sh", "-c", script], check=True, capture_output=True,
                         text=True, env={"PATH": f"{bindir}:/usr/bin:/bin", "ETC": str(etc),
                                         "SYS": str(tmp_path / "sys"), "S": str(seed_dir),
                                         "IP": str(bindir / "ip"),
                                         "SEED_SH": str(GUEST_SEED_SH)}).stdout
    assert out == "eth1\n"
    assert log.read_text().splitlines() == ["link set eth1 mtu 1450",
                                            "addr replace 10.64.0.11/16 dev eth1",
                                            "link set eth1 up"]
    assert (etc / "hosts").read_text() == ("127.0.0.1\tlocalhost\n10.64.0.10\tdgxa\n"
                                           "10.64.0.11\tdgxb\n")
    # no NIC with that MAC: it fails, and nothing is configured
    (sys_net / "eth1" / "address").write_text("0a:de:00:00:2a:99\n")
    log.unlink()
    assert subprocess.run([busybox, "sh", "-c", script], capture_output=True,
                          env={"PATH": f"{bindir}:/usr/bin:/bin", "ETC": str(etc),
                               "SYS": str(tmp_path / "sys"), "S": str(seed_dir), "IP": str(bindir / "ip"),
                               "SEED_SH": str(GUEST_SEED_SH)}).returncode != 0
    assert not log.exists()


def write_seed_for_fabric(tmp_path: Path) -> Path:
    d = tmp_path / "k"
    d.mkdir()
    user_pub = generate_keypair(d / "user", "alice@test")
    host_pub = generate_keypair(d / "host", "host")
    spec = SeedSpec(instance_id="i-1", hostname="job42", user_name="alice", uid=4242, gid=4243,
                    home="/home/alice", authorized_keys=(user_pub,),
                    host_key_private=(d / "host").read_text(), host_key_public=host_pub,
                    fabric=FABRIC)
    return write_seed(spec, tmp_path / "fabric.iso", name="vm0")


def test_cloud_init_brings_up_the_fabric_and_names_the_nodes(spec, tmp_path):
    """The cloud-config's bootcmd: the NIC by MAC (ip, as the test guest), and the nodes into
    the template cloud-init renders /etc/hosts from, once however often the guest boots."""
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load(user_data(dataclasses.replace(spec, fabric=FABRIC)))
    [nic] = [c for c in doc["bootcmd"] if "dgxvm-fabric" in c]
    assert nic[3:] == ["dgxvm-fabric", FABRIC.mac, "10.64.0.11/16", "1450"]
    [hosts] = [c for c in doc["bootcmd"] if "dgxvm-hosts" in c]
    assert hosts[3:] == ["dgxvm-hosts", "10.64.0.10", "dgxa", "10.64.0.11", "dgxb"]
    tmpl = tmp_path / "hosts.debian.tmpl"
    tmpl.write_text("127.0.0.1 localhost\n")
    script = hosts[2].replace(HOSTS_TEMPLATE, str(tmpl))
    for _ in range(2):
        subprocess.run(["sh", "-c", script, *hosts[3:]], check=True)
    assert tmpl.read_text() == ("127.0.0.1 localhost\n"
                                f"10.64.0.10\tdgxa {HOSTS_MARK}\n10.64.0.11\tdgxb {HOSTS_MARK}\n")
    assert not [c for c in yaml.safe_load(user_data(spec))["bootcmd"] if "dgxvm-fabric" in c]


def test_the_jobs_ssh_key_reaches_the_guest_outside_the_home(spec, tmp_path):
    """The job's inter-VM key: root-only in the ISO's plain files; for cloud-init under
    /etc/ssh in the init stage (so there when the guest is ready), never in the user's home,
    which may be a share of the host's: the key root's and the user's group's, the known hosts
    the system's, ssh told to offer the key."""
    yaml = pytest.importorskip("yaml")
    from slurm_dgxvm.jobnet import sshkeys
    secret = bytes(range(64))
    user = sshkeys.user_key(secret, 42)
    known = sshkeys.known_hosts(secret, 42, FABRIC.hosts)
    fab = dataclasses.replace(FABRIC, ssh_key=user.private, ssh_key_public=user.public,
                              known_hosts=known)
    s = dataclasses.replace(spec, fabric=fab)
    root = extract(write_seed(s, tmp_path / "s.iso", name="vm0"), tmp_path / "x")
    assert (root / "dgxvm/job_ssh_key").read_text() == user.private
    assert (root / "dgxvm/job_ssh_key.pub").read_text() == user.public + "\n"
    assert (root / "dgxvm/job_known_hosts").read_text() == known
    doc = yaml.safe_load(user_data(s))
    files = {w["path"]: w for w in doc["write_files"]}
    assert not [p for p in files if p.startswith("/home/")]
    assert not [w for w in doc["write_files"] if w.get("defer")]
    key = files["/etc/ssh/dgxvm/id_ed25519"]
    assert (key["permissions"], key["owner"]) == ("0640", "root:alice")
    assert base64.b64decode(key["content"]).decode() == user.private
    assert base64.b64decode(files["/etc/ssh/ssh_known_hosts"]["content"]).decode() == known
    config = base64.b64decode(files["/etc/ssh/ssh_config.d/dgxvm-job.conf"]["content"]).decode()
    assert config.splitlines()[-1] == "IdentityFile /etc/ssh/dgxvm/id_ed25519"
    assert "IdentityFile ~/.ssh/id_ed25519" in config.splitlines()   # the user's own too
    # half a key pair is refused, and the private key never shows in the error
    with pytest.raises(SeedError) as info:
        dataclasses.replace(FABRIC, ssh_key=user.private)
    assert "PRIVATE" not in str(info.value)
    # without keys, no key, known hosts or ssh config
    assert not [w for w in yaml.safe_load(user_data(dataclasses.replace(spec, fabric=FABRIC)))
                ["write_files"] if w["path"] in ("/etc/ssh/dgxvm/id_ed25519",
                                                 "/etc/ssh/ssh_known_hosts",
                                                 "/etc/ssh/ssh_config.d/dgxvm-job.conf")]


def test_cloud_init_authorizes_the_keys_outside_the_home(spec):
    """sshd reads the keys that may log in as the user from /etc/ssh/dgxvm/authorized_keys/USER
    (a drop-in it includes first), so cloud-init never writes the user's ~/.ssh/authorized_keys:
    a work dir equal to the home, shared from the host, is left as it is."""
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load(user_data(spec))
    assert "ssh_authorized_keys" not in doc["users"][0]
    files = {w["path"]: base64.b64decode(w["content"]).decode() for w in doc["write_files"]}
    assert files["/etc/ssh/sshd_config.d/dgxvm.conf"] == (
        "AuthorizedKeysFile /etc/ssh/dgxvm/authorized_keys/%u .ssh/authorized_keys\n"
        "MaxSessions 512\n")       # a job's runs share one connection (access.connection)
    assert files["/etc/ssh/dgxvm/authorized_keys/alice"] == "".join(
        k + "\n" for k in spec.authorized_keys)
