"""The Debian package, built from this tree with Debian's own tools (scripts/build-deb:
dpkg-buildpackage, debhelper, dh-python/pybuild) and inspected without installing it: lintian,
what lands where, the conffiles, the maintainer scripts, the unit (systemd-analyze verify).
Installed, upgraded and purged on this host: test_package_lifecycle.py. ~1 minute with the
build, which tests/run does once for both (DGXVM_TEST_DEB).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from slurm_dgxvm.lifecycle import libvirt_hook_script
from slurm_dgxvm.netfilter import network_hook_script

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
HOOKS = {"etc/libvirt/hooks/qemu.d/slurm-dgxvm": libvirt_hook_script,
         "etc/libvirt/hooks/network.d/slurm-dgxvm": network_hook_script}
PROLOG = "usr/lib/slurm-dgxvm/dgxvm-prolog"
EPILOG = "usr/lib/slurm-dgxvm/dgxvm-epilog"
UNIT = "lib/systemd/system/dgxvm-reconcile.service"
COMPLETION = "usr/share/bash-completion/completions/dgxvm"


def run(*cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=kw.pop("timeout", 120), **kw)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The .deb (and its build log and lintian output) from scripts/build-deb, and its
    contents unpacked: files under ``root``, control files under ``control``."""
    if os.environ.get("DGXVM_TEST_DEB"):
        # tests/run built it (scripts/build-deb) and installed it: the same files, once
        out = Path(os.environ["DGXVM_TEST_DEB"]).parent
    else:
        out = tmp_path_factory.mktemp("deb")
        r = run("bash", str(REPO / "scripts/build-deb"), str(out), timeout=600)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    debs = sorted(out.glob("slurm-dgxvm_*_all.deb"))
    assert len(debs) == 1, sorted(p.name for p in out.iterdir())
    unpacked = tmp_path_factory.mktemp("unpacked")
    root, control = unpacked / "root", unpacked / "control"
    assert run("dpkg-deb", "-x", str(debs[0]), str(root)).returncode == 0
    assert run("dpkg-deb", "-e", str(debs[0]), str(control)).returncode == 0
    return {"deb": debs[0], "out": out, "root": root, "control": control}


def field(deb: Path, name: str) -> str:
    return run("dpkg-deb", "-f", str(deb), name).stdout.strip()


def test_the_package_is_named_for_its_version_and_architecture(built):
    version = re.search(r'^version = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.M)[1]
    assert built["deb"].name == f"slurm-dgxvm_{version}_all.deb"
    assert field(built["deb"], "Architecture") == "all"


def test_lintian_finds_no_error_and_no_warning(built):
    """build-deb fails on either; the log is checked too, and every override says why."""
    log = (built["out"] / "lintian.log").read_text()
    assert not re.findall(r"^[EW]: .*$", log, re.M)
    lines = (REPO / "debian/slurm-dgxvm.lintian-overrides").read_text().splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith("#"):
            assert i > 0 and lines[i - 1].startswith("#"), f"override without a reason: {line}"


def test_it_depends_on_debians_python_libraries_and_the_hypervisor(built):
    depends = {d.split()[0] for d in field(built["deb"], "Depends").split(", ")}
    assert {"python3-click", "python3-jinja2", "python3-libvirt", "python3-cryptography",
            "libvirt-daemon-system",
            "qemu-system-x86", "qemu-utils", "xorriso", "nftables"} <= depends
    assert not any(d.startswith("python3-filelock") or d.startswith("python3-pytest")
                   for d in depends)        # test-only


@pytest.mark.parametrize("path, mode", [
    ("usr/bin/dgxvm", 0o755),
    (PROLOG, 0o755),
    (EPILOG, 0o755),
    ("etc/libvirt/hooks/qemu.d/slurm-dgxvm", 0o755),
    ("etc/libvirt/hooks/network.d/slurm-dgxvm", 0o755),
    ("etc/dgxvm/dgxvm.toml", 0o644),
    (UNIT, 0o644),
    (COMPLETION, 0o644),
    ("usr/share/man/man1/dgxvm.1.gz", 0o644),
    ("usr/share/man/man5/dgxvm.toml.5.gz", 0o644),
    ("usr/lib/python3/dist-packages/slurm_dgxvm/design/templates/domain.xml.j2", 0o644),
    ("usr/lib/python3/dist-packages/slurm_dgxvm/seedfiles/dgxvm-guest.sh", 0o644),
])
def test_each_file_lands_where_the_readme_says_with_its_mode(built, path, mode):
    f = built["root"] / path
    assert f.is_file(), path
    assert f.stat().st_mode & 0o7777 == mode


def test_the_documentation_lands_in_usr_share_doc(built):
    """docs/ whole and README.md beside it, uncompressed: the pages' relative links work there."""
    doc = built["root"] / "usr/share/doc/slurm-dgxvm"
    assert (doc / "README.md").is_file()
    for page in (REPO / "docs").rglob("*.md"):
        where = doc / page.relative_to(REPO)
        assert where.read_bytes() == page.read_bytes(), where


def test_nothing_lands_in_usr_local_or_the_hooks_main_scripts(built):
    """A site's own /etc/libvirt/hooks/qemu and network stay theirs: dgxvm's are in the .d
    directories libvirt >= 6.5 runs after them."""
    listing = run("dpkg-deb", "-c", str(built["deb"])).stdout
    assert "./usr/local/" not in listing
    assert not re.search(r" \./etc/libvirt/hooks/(qemu|network)$", listing, re.M)


def test_the_configuration_and_the_hooks_are_conffiles(built):
    """An admin's edits survive an upgrade (dpkg asks); the hooks too (a site may add
    DGXVM_CONFIG to them)."""
    conffiles = (built["control"] / "conffiles").read_text().split()
    assert {"/etc/dgxvm/dgxvm.toml", "/etc/libvirt/hooks/qemu.d/slurm-dgxvm",
            "/etc/libvirt/hooks/network.d/slurm-dgxvm"} <= set(conffiles)
    assert (built["root"] / "etc/dgxvm/dgxvm.toml").read_text() == \
        (REPO / "etc/dgxvm.toml").read_text()


@pytest.mark.parametrize("path", sorted(HOOKS))
def test_the_hooks_are_the_ones_dgxvm_writes_for_usr_bin_dgxvm(built, path):
    packaged = (built["root"] / path).read_text().splitlines()
    want = HOOKS[path]("/usr/bin/dgxvm").splitlines()
    assert packaged[-2:] == want[-2:]       # the same ops filter, the same exec line
    assert packaged[0] == "#!/bin/sh"
    driver = path.split("/")[3][:-2]
    assert any(f"/etc/libvirt/hooks/{driver}.d/, which libvirt (>= 6.5)" in line
               for line in packaged)        # its comment says where it is and why


@pytest.mark.parametrize("path, args", [
    ("etc/libvirt/hooks/qemu.d/slurm-dgxvm", ["vm1", "prepare", "begin", "-"]),
    ("etc/libvirt/hooks/network.d/slurm-dgxvm", ["dgxvm", "start", "begin", "-"]),
])
def test_a_hook_left_by_a_removal_lets_every_start_go_on(built, path, args, tmp_path):
    """The hooks are conffiles, so `apt-get remove` leaves them while /usr/bin/dgxvm goes: run
    with dgxvm absent (its path pointed at nothing), each exits 0, and libvirt starts the domain
    or network; with a dgxvm that fails, the failure is passed on (libvirt refuses the start)."""
    text = (built["root"] / path).read_text()
    assert "[ -x /usr/bin/dgxvm ] || exit 0\n" in text
    absent = tmp_path / "absent"
    hook = tmp_path / "hook"
    hook.write_text(text.replace("/usr/bin/dgxvm", str(absent)))
    r = run("sh", str(hook), *args, input="")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    absent.write_text("#!/bin/sh\nexit 3\n")
    absent.chmod(0o755)
    assert run("sh", str(hook), *args, input="").returncode == 3


@pytest.mark.parametrize("path, verb", [(PROLOG, "prolog"), (EPILOG, "epilog")])
def test_the_slurm_scripts_exec_usr_bin_dgxvm(built, path, verb, tmp_path):
    """Run for real with DGXVM pointing at a stand-in: the verb and stdin it gets."""
    text = (built["root"] / path).read_text()
    assert f'exec "${{DGXVM:-/usr/bin/dgxvm}}" {verb} </dev/null' in text
    stand_in = tmp_path / "dgxvm"
    stand_in.write_text('#!/bin/sh\necho "$@"; cat\n')
    stand_in.chmod(0o755)
    r = run("sh", str(built["root"] / path), input="not for dgxvm",
            env={"DGXVM": str(stand_in), "PATH": "/usr/bin:/bin"})
    assert (r.returncode, r.stdout) == (0, f"{verb}\n")


def test_the_unit_runs_usr_bin_dgxvm_and_is_enabled_not_started(built):
    unit = (built["root"] / UNIT).read_text()
    assert "ExecStart=/usr/bin/dgxvm reconcile\n" in unit
    assert "/usr/local" not in unit.split("[Unit]")[1]
    postinst = (built["control"] / "postinst").read_text()
    assert "deb-systemd-helper enable 'dgxvm-reconcile.service'" in postinst
    assert "deb-systemd-invoke start" not in postinst and "restart" not in postinst


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="no systemd-analyze")
def test_systemd_analyze_verifies_the_unit(built, tmp_path):
    """In a root of this host's system units plus the package's (/usr/bin/dgxvm must exist);
    this host does not run systemd, so --root is the only way to verify."""
    root = tmp_path / "root"
    units = root / "lib/systemd/system"
    shutil.copytree("/lib/systemd/system", units, symlinks=True)
    shutil.copy(built["root"] / UNIT, units)
    (root / "usr/bin").mkdir(parents=True)
    shutil.copy(built["root"] / "usr/bin/dgxvm", root / "usr/bin/dgxvm")
    r = run("systemd-analyze", "verify", f"--root={root}", "--man=no", f"/{UNIT}")
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


def test_the_maintainer_scripts_are_posix_sh_and_shellcheck_clean(built):
    scripts = [built["control"] / s for s in ("postinst", "prerm", "postrm")]
    for s in scripts:
        assert run("sh", "-n", str(s)).returncode == 0, s.name
    assert shutil.which("shellcheck"), "scripts/bootstrap installs shellcheck"
    # SC2317: debhelper's generated snippets after our `exit 1` branches
    r = run("shellcheck", "-s", "sh", "-e", "SC2317", *map(str, scripts))
    assert r.returncode == 0, r.stdout


def test_the_purge_plan_follows_the_configuration(built, tmp_path):
    """What prerm writes down for postrm purge, from the packaged code: the state dir goes,
    with the image store inside it; a cache dir elsewhere (maybe shared) is kept and named;
    the output is shell that sh reads back exactly, odd characters included."""
    helper = built["root"] / "usr/lib/slurm-dgxvm/maint-helper"
    assert helper.stat().st_mode & 0o111
    cfg = tmp_path / "dgxvm.toml"
    cfg.write_text('[host]\nstate_dir = "/srv/dgx vm\'s/state"\n'
                   '[images]\nstore = "/srv/dgx vm\'s/state/images"\n'
                   '[containers]\ncache_dir = "/shared/cache"\n[libvirt]\nnetwork = "gpunet"\n')
    env = {"DGXVM_CONFIG": str(cfg), "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(built["root"] / "usr/lib/python3/dist-packages")}
    r = run("/usr/bin/python3", str(helper), "purge-plan", env=env)
    assert r.returncode == 0, r.stderr
    plan = tmp_path / "plan"
    plan.write_text(r.stdout)
    got = run("sh", "-c", f'. "{plan}"; printf "%s|" "$DGXVM_REMOVE" "$DGXVM_KEEP" '
                          f'"$DGXVM_NETWORK" "$DGXVM_URI" "$DGXVM_RUN_DIR"').stdout
    assert got.split("|")[:5] == [
        "/srv/dgx vm's/state",
        "/shared/cache: [containers] cache_dir is outside the state dir /srv/dgx vm's/state (kept)",
        "gpunet", "qemu:///system", "/run/dgxvm"]


def test_the_packaged_dgxvm_runs_on_debians_python(built, tmp_path):
    """/usr/bin/python3 with the package's dist-packages only (-P: not this checkout): the
    commands, and the templates found where the wheel put them."""
    site = built["root"] / "usr/lib/python3/dist-packages"
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    dgxvm = ["/usr/bin/python3", "-P", str(built["root"] / "usr/bin/dgxvm")]
    r = run(*dgxvm, "version", "show", "--json", env=env)
    assert r.returncode == 0 and '"dgxvm": "' in r.stdout, r.stderr
    r = run(*dgxvm, "simulate", "dgx2", "--out", str(tmp_path / "sys"), env=env)
    assert r.returncode == 0, r.stderr
    r = run(*dgxvm, "--config", "/dev/null", "--sysfs-root", str(tmp_path / "sys"),
            "--state-dir", str(tmp_path / "state"), "plan", "--gpu-count", "4", "--json", env=env)
    assert r.returncode == 0 and '"aligned": true' in r.stdout, r.stderr
    r = run("/usr/bin/python3", "-P", "-c",
            "from slurm_dgxvm.design.domain_xml import render_template as r; import sys; "
            "sys.stdout.write(r('network.xml.j2', name='n', gateway='10.0.0.1', "
            "netmask='255.255.255.0', range_start='10.0.0.2', range_end='10.0.0.9', "
            "hosts=[], lease_min=10))", env=env)
    assert r.returncode == 0 and "<name>n</name>" in r.stdout, r.stderr


def test_bash_completes_dgxvm_through_dgxvm_itself(built):
    r = run("bash", "-c", f"source {built['root'] / COMPLETION}; complete -p dgxvm")
    assert r.returncode == 0 and "_dgxvm_completion dgxvm" in r.stdout, r.stdout + r.stderr
