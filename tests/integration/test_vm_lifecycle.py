"""The VM lifecycle for real: libvirtd and virtlogd started by the harness inside a network
namespace, the test guest built from Debian packages, QEMU under TCG, a simulated DGX-2.

Each test ends by checking that nothing is left: no domain, no QEMU process, no VM directory
(overlay, seed, keys), no ledger entry, no DHCP reservation.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import libvirt
import pytest

from harness.ssh import ssh_argv
from slurm_dgxvm.ledger import Ledger
from slurm_dgxvm.virt import addresses, hypervisor

pytestmark = pytest.mark.integration


def ledger_keys(vmenv) -> set[str]:
    return set(Ledger(vmenv.state_dir).read().allocations)


def assert_nothing_left(vmenv, names, *, state_dir=None, network=None):
    state_dir = state_dir or vmenv.state_dir
    conn = libvirt.open(vmenv.uri)
    try:
        domains = {d.name() for d in conn.listAllDomains()}
        assert not set(names) & domains, f"domains left: {set(names) & domains}"
        reservations = hypervisor.reservations(conn, network or vmenv.network) or {}
    finally:
        conn.close()
    held = addresses.held(str(state_dir))
    for name in names:
        assert not (state_dir / "vms" / name).exists(), f"{name}'s directory is left"
        assert name not in held.values(), f"{name} still holds an address: {held}"
        assert name not in {n for _ip, n in reservations.values()}, \
            f"a DHCP reservation of {name}'s own is left"
    keys = set(Ledger(state_dir).read().allocations)
    assert not keys, f"ledger entries left: {keys}"
    assert vmenv.stack.qemu_pids() == [], "a QEMU process is left"


def record(vmenv, name) -> dict:
    return json.loads((vmenv.state_dir / "vms" / name / "record.json").read_text())


def ssh(vmenv, name, command, user=None):
    """ssh into the VM as its user, from inside the namespace, with the pinned host key only."""
    rec = record(vmenv, name)
    d = vmenv.state_dir / "vms" / name
    argv = ["ip", "netns", "exec", vmenv.netns, "runuser", "-u", user or rec["user"], "--",
            *ssh_argv(d / "id_ed25519", d / "known_hosts", f"{rec['user']}@{rec['address']}",
                      command, connect_timeout=20)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=90)


def test_create_a_4gpu_vm_boot_it_reach_it_and_delete_it(vmenv):
    work = vmenv.workdir
    (work / "hello").write_text("from the host\n")
    r = vmenv.dgxvm("create", "--gpu-count", "4", "--domain", "t4", "--user", vmenv.user,
                    "--workdir", str(work))
    assert r.returncode == 0, r.stderr
    assert "t4: running" in r.stdout and "fitted to this host" in r.stdout
    rec = record(vmenv, "t4")
    p = rec["placement"]
    # an aligned DGX-2 block of 4 on one NUMA node, its 3 NVSwitches, cores of that node only
    assert p["aligned"] is True and len(p["gpus"]) == 4 and p["gpus"][0] % 4 == 0
    assert len(p["nvswitches"]) == 3 and len(p["numa_nodes"]) == 1 and p["vcpus"] == 22
    assert rec["state"] == "running" and rec["boot_s"] > 0
    assert any("dropped PCI passthrough of 4 GPU(s)" in f for f in rec["fitted"])
    assert ledger_keys(vmenv) == {"domain:t4"}

    out = ssh(vmenv, "t4", f"id -u; id -g; hostname; cat {work}/hello; echo hi > {work}/back")
    assert out.returncode == 0, out.stderr
    uid, gid, hostname, hello = out.stdout.split("\n")[:4]
    assert (int(uid), int(gid)) == (vmenv.uid, vmenv.gid)
    assert hostname == "t4" and hello == "from the host"
    assert (work / "back").read_text() == "hi\n"          # the work dir is shared, both ways
    assert (work / "back").stat().st_uid == vmenv.uid

    listed = json.loads(vmenv.dgxvm("list", "--json").stdout)
    assert [(v["name"], v["state"], v["gpus"], v["held"]) for v in listed] == \
        [("t4", "running", p["gpus"], True)]

    r = vmenv.dgxvm("delete", "--domain", "t4")
    assert r.returncode == 0, r.stderr
    assert "t4: deleted" in r.stdout
    assert_nothing_left(vmenv, ["t4"])


def test_two_vms_at_once_get_disjoint_gpus_and_cores(vmenv):
    def make(name):
        return vmenv.dgxvm("create", "--gpu-count", "2", "--domain", name, "--user", vmenv.user)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(make, ["ta", "tb"]))
    try:
        for r in results:
            assert r.returncode == 0, r.stderr
        a, b = record(vmenv, "ta")["placement"], record(vmenv, "tb")["placement"]
        assert not set(a["gpus"]) & set(b["gpus"])
        assert not set(a["cpus"]) & set(b["cpus"])
        assert a["aligned"] and b["aligned"]
        assert record(vmenv, "ta")["address"] != record(vmenv, "tb")["address"]
        assert len(vmenv.stack.qemu_pids()) == 2
        for name in ("ta", "tb"):
            out = ssh(vmenv, name, "hostname")
            assert out.returncode == 0 and out.stdout.strip() == name, out.stderr
    finally:
        for name in ("ta", "tb"):
            vmenv.dgxvm("delete", "--domain", name)
    assert_nothing_left(vmenv, ["ta", "tb"])


def test_virsh_shutdown_releases_and_virsh_start_takes_back(vmenv):
    r = vmenv.dgxvm("create", "--gpu-count", "4", "--gpu-index", "8", "--domain", "tv",
                    "--user", vmenv.user)
    assert r.returncode == 0, r.stderr
    d = vmenv.state_dir / "vms" / "tv"
    try:
        vmenv.virsh("shutdown", "tv")
        vmenv.wait_state("tv", libvirt.VIR_DOMAIN_SHUTOFF)
        # GPUs, CPUs and memory are free again; the drives stay
        assert "domain:tv" not in ledger_keys(vmenv)
        assert (d / "os.qcow2").exists() and (d / "seed.iso").exists()
        assert record(vmenv, "tv")["state"] == "stopped"

        # another VM takes the same GPUs meanwhile: virsh start must refuse, naming the holder
        r = vmenv.dgxvm("create", "--gpu-count", "4", "--gpu-index", "8", "--domain", "tw",
                        "--user", vmenv.user)
        assert r.returncode == 0, r.stderr
        refused = vmenv.virsh("start", "tv", check=False)
        assert refused.returncode != 0
        assert "domain:tw" in refused.stderr and "cannot start tv" in refused.stderr
        assert ledger_keys(vmenv) == {"domain:tw"}
        vmenv.dgxvm("delete", "--domain", "tw")

        vmenv.virsh("start", "tv")
        assert "domain:tv" in ledger_keys(vmenv)
        assert record(vmenv, "tv")["state"] == "running"
    finally:
        vmenv.dgxvm("delete", "--domain", "tw")
        vmenv.dgxvm("delete", "--domain", "tv")
    assert_nothing_left(vmenv, ["tv", "tw"])


def test_a_gpu_block_in_use_is_refused_and_nothing_leaks(vmenv):
    r = vmenv.dgxvm("create", "--gpu-count", "8", "--gpu-index", "0", "--domain", "tx",
                    "--user", vmenv.user)
    assert r.returncode == 0, r.stderr
    try:
        r2 = vmenv.dgxvm("create", "--gpu-count", "4", "--gpu-index", "4", "--domain", "ty",
                         "--user", vmenv.user)
        assert r2.returncode == 4, r2.stderr
        assert r2.stderr.startswith("dgxvm: error:") and "4" in r2.stderr
        assert not (vmenv.state_dir / "vms" / "ty").exists()
        assert ledger_keys(vmenv) == {"domain:tx"}
        taken = vmenv.dgxvm("create", "--gpu-count", "1", "--domain", "tx", "--user", vmenv.user)
        assert taken.returncode == 2 and "tx already exists" in taken.stderr
    finally:
        vmenv.dgxvm("delete", "--domain", "tx")
    assert_nothing_left(vmenv, ["tx", "ty"])


@pytest.mark.parametrize("args, code, named", [
    (["--domain", "../etc", "--gpu-count", "1"], 2, "bad domain name '../etc'"),
    (["--domain", "a b", "--gpu-count", "1"], 2, "bad domain name 'a b'"),
    (["--domain", "tz", "--gpu-count", "1", "--image", "nosuch"], 2, "nosuch"),
    (["--domain", "tz", "--gpu-count", "3"], 2, "3"),
])
def test_bad_input_names_the_value_and_leaves_nothing(vmenv, args, code, named):
    r = vmenv.dgxvm("create", "--user", vmenv.user, *args)
    assert r.returncode == code, r.stderr
    assert r.stderr.startswith("dgxvm: error:") and named in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert_nothing_left(vmenv, ["tz", "../etc", "a b"])


def test_libvirtd_not_running_is_one_clear_error(vmenv, tmp_path):
    cfg = vmenv.config_text.replace(f'uri = "{vmenv.uri}"',
                                    f'uri = "qemu+unix:///system?socket={tmp_path}/none.sock"')
    path = tmp_path / "dgxvm.toml"
    path.write_text(cfg)
    r = vmenv.dgxvm("create", "--gpu-count", "1", "--domain", "tl", "--user", vmenv.user,
                    config=path)
    assert r.returncode == 6, r.stderr
    assert "libvirtd is not running" in r.stderr
    assert not (vmenv.state_dir / "vms" / "tl").exists() and not ledger_keys(vmenv)


def test_a_guest_that_never_becomes_ready_times_out_with_its_console(vmenv, tmp_path):
    # the same guest, told to run an init that does not exist: the kernel panics
    r = vmenv.dgxvm("image", "install", str(vmenv.manifest), "--name", "broken",
                    "--cmdline", vmenv.cmdline + " init=/nonexistent panic=-1 rdinit=/nonexistent")
    assert r.returncode == 0, r.stderr
    try:
        cfg = vmenv.config_text.replace("ready_timeout_s = 240.0", "ready_timeout_s = 30.0")
        path = tmp_path / "dgxvm.toml"
        path.write_text(cfg)
        t0 = time.monotonic()
        r = vmenv.dgxvm("create", "--gpu-count", "1", "--domain", "tp", "--image", "broken",
                        "--user", vmenv.user, config=path)
        assert r.returncode == 6, r.stderr
        assert "tp: guest not ready" in r.stderr and "serial console tail" in r.stderr
        assert "|" in r.stderr                       # the console lines themselves
        assert time.monotonic() - t0 < 120
        assert_nothing_left(vmenv, ["tp"])
    finally:
        vmenv.dgxvm("image", "remove", "broken")


def test_disk_full_while_creating_the_overlay_leaves_nothing(vmenv, tmp_path):
    from slurm_dgxvm import seed
    from slurm_dgxvm.design import image_cache_tag
    # a seed like the one create writes (the user's image cache its one mount), to leave room
    # for it, the keys and the cache share's two files, but not the overlay
    host_key = tmp_path / "hk"
    pub = seed.generate_keypair(host_key, "x")
    cache = str(vmenv.containers / str(vmenv.uid))
    probe = seed.write_seed(seed.SeedSpec(
        instance_id="td-0", hostname="td", user_name=vmenv.user, uid=vmenv.uid, gid=vmenv.gid,
        home=f"/home/{vmenv.user}", authorized_keys=(pub,), host_key_private=host_key.read_text(),
        host_key_public=pub,
        mounts=(seed.Mount(image_cache_tag(cache), cache, "virtiofs", read_only=True),)),
        tmp_path / "seed.iso", name="td")
    # 128 KiB beside the seed: the keys, known_hosts, the cache share's spec and wrapper (~32
    # KiB on tmpfs) and, while the seed is written, its staged tree beside the image (~80 KiB:
    # 64 KiB no longer was once the guest helper travelled in it); what is left after it is
    # below the ~196 KiB the overlay alone needs
    room = probe.stat().st_size + 128 * 1024
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(small)],
                   check=True)
    try:
        cfg = vmenv.config_text.replace(f'state_dir = "{vmenv.state_dir}"',
                                        f'state_dir = "{small}"')
        path = tmp_path / "dgxvm.toml"
        path.write_text(cfg)
        free = os.statvfs(small).f_bavail * os.statvfs(small).f_frsize
        (small / "filler").write_bytes(b"\1" * (free - room))
        r = vmenv.dgxvm("create", "--gpu-count", "1", "--domain", "td", "--user", vmenv.user,
                        config=path)
        assert r.returncode == 3, r.stderr
        assert r.stderr.startswith("dgxvm: error: disk ") and "os.qcow2" in r.stderr
        assert "No space left on device" in r.stderr or "no space left" in r.stderr.lower()
        assert not (small / "vms" / "td").exists()
        assert not Ledger(small).read().allocations
    finally:
        subprocess.run(["umount", str(small)], check=False)
    assert_nothing_left(vmenv, ["td"])


@pytest.fixture
def h100(vmenv, tmp_path):
    """A simulated DGX H100 (shared-nvswitch: the host's Fabric Manager keeps the switches)
    beside the DGX-2, with the fmpm stand-in over a state file and its own state dir, on the
    session's network (the only one the libvirt stack's network hook firewalls)."""
    base = vmenv.base / "h100"
    base.mkdir(mode=0o755)
    sysfs = base / "sysfs"
    subprocess.run([str(vmenv.dgxvm_path), "simulate", "dgx-h100", "--out", str(sysfs)],
                   check=True, capture_output=True)
    fm_state = base / "fm-state.json"
    fmpm = f"env FMPM_STANDIN_STATE={fm_state} {vmenv.repo}/tools/fmpm-standin/fmpm"
    cfg = (vmenv.config_text
           .replace(f'sysfs_root = "{vmenv.sysfs}"', f'sysfs_root = "{sysfs}"')
           .replace(f'state_dir = "{vmenv.state_dir}"', f'state_dir = "{base}/state"')
           + f'\n[fabric]\nfmpm = "{fmpm}"\n')
    path = base / "dgxvm.toml"
    path.write_text(cfg)
    yield SimpleNamespace(config=path, state=base / "state", fmpm=fmpm)
    shutil.rmtree(base, ignore_errors=True)


def fm_active(h100) -> dict[int, bool]:
    out = subprocess.run([*shlex.split(h100.fmpm), "-l"], capture_output=True, text=True,
                         check=True).stdout
    doc = json.loads(out)
    return {p["partitionId"]: p["isActive"] for p in doc["partitionInfo"]}


def test_shared_nvswitch_vm_activates_its_fabric_manager_partition(vmenv, h100, tmp_path):
    """The VM's partition is active while it runs and inactive after its delete. Between the
    two, Fabric Manager restarts without its resiliency mode (the stand-in's --standin-restart):
    every partition is inactive under the running VM; `dgxvm reconcile` says so and changes
    nothing (exit 5, left for an admin), and the delete still succeeds and leaves nothing."""
    r = vmenv.dgxvm("create", "--gpu-count", "4", "--domain", "th", "--user", vmenv.user,
                    config=h100.config)
    assert r.returncode == 0, r.stderr
    try:
        rec = json.loads((h100.state / "vms" / "th" / "record.json").read_text())
        part = rec["placement"]["fm_partition"]
        assert part is not None and rec["placement"]["nvswitches"] == []
        assert [p for p, on in fm_active(h100).items() if on] == [part]
        # a second VM on the same block: the ledger refuses before Fabric Manager is asked
        r2 = vmenv.dgxvm("create", "--gpu-count", "4", "--gpu-index", str(rec["placement"]["gpus"][0]),
                         "--domain", "th2", "--user", vmenv.user, config=h100.config)
        assert r2.returncode == 4, r2.stderr
        # Fabric Manager restarts without resiliency mode: th runs on, its partition inactive
        subprocess.run([*shlex.split(h100.fmpm), "--standin-restart"], check=True,
                       capture_output=True)
        assert not any(fm_active(h100).values())
        bindir = tmp_path / "bin"                # Slurm (not running here) has no jobs
        bindir.mkdir()
        (bindir / "squeue").write_text("#!/bin/sh\nexit 0\n")
        (bindir / "squeue").chmod(0o755)
        cfg = tmp_path / "dgxvm.toml"
        cfg.write_text(h100.config.read_text() + f'\n[slurm]\nbin_dir = "{bindir}"\n')
        ledger_before = Ledger(h100.state).read().allocations
        r = vmenv.dgxvm("reconcile", "--dry-run", "--json", "--node", "dgx01", config=cfg)
        doc = json.loads(r.stdout)
        [f] = [f for f in doc["findings"] if f["what"] == "fm"]
        assert (f["subject"], f["name"], f["action"], f["result"]) == \
            (f"partition {part}", "th", "none", "left")
        assert f["why"] == ("held by VM th but not active in Fabric Manager: Fabric Manager "
                            "restarted or someone deactivated it; its GPUs have no NVLink "
                            "until the VM is recreated")
        assert r.returncode == 5 and doc["exit_code"] == 5, r.stderr
        # nothing was done: th runs, no partition was activated under it, the ledger is as it was
        assert vmenv.virsh("domstate", "th").stdout.strip() == "running"
        assert not any(fm_active(h100).values())
        assert Ledger(h100.state).read().allocations == ledger_before
    finally:
        r = vmenv.dgxvm("delete", "--domain", "th", config=h100.config)
    assert r.returncode == 0, r.stderr
    assert not any(fm_active(h100).values())
    assert_nothing_left(vmenv, ["th", "th2"], state_dir=h100.state)


def test_a_partition_fabric_manager_refuses_leaves_nothing(vmenv, h100):
    # someone activated the 8-GPU partition behind dgxvm's back: FM refuses any overlapping one
    subprocess.run([*shlex.split(h100.fmpm), "-a", "0"], check=True, capture_output=True)
    r = vmenv.dgxvm("create", "--gpu-count", "2", "--domain", "tf", "--user", vmenv.user,
                    config=h100.config)
    assert r.returncode == 3, r.stderr
    assert "fabric manager partition" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (h100.state / "vms" / "tf").exists()
    assert not Ledger(h100.state).read().allocations
    assert fm_active(h100) == {**{p: False for p in fm_active(h100)}, 0: True}
    assert_nothing_left(vmenv, ["tf"], state_dir=h100.state)


def test_a_create_killed_with_its_partition_active_is_undone_by_its_delete(vmenv, h100):
    """The Prolog SIGKILLed just after Fabric Manager activated its partition (before the
    start; the Slurm cluster's DGX-2 passes its NVSwitches through, so this step runs here):
    the partition, the ledger entry and the defined domain are left; `dgxvm delete`, what the
    Epilog runs, deactivates the partition and removes the rest."""
    h100.state.mkdir(mode=0o755, exist_ok=True)
    points = h100.state / "failpoints"
    points.write_text("after:activate_fabric tk kill\n")
    points.chmod(0o600)
    try:
        r = vmenv.dgxvm("create", "--gpu-count", "2", "--domain", "tk", "--user", vmenv.user,
                        config=h100.config)
        assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)
        assert points.read_text() == ""                     # fired, once
        [alloc] = Ledger(h100.state).read().allocations.values()
        assert alloc.fm_partition is not None
        assert [p for p, on in fm_active(h100).items() if on] == [alloc.fm_partition]
        assert vmenv.virsh("domstate", "tk").stdout.strip() == "shut off"
    finally:
        r = vmenv.dgxvm("delete", "--domain", "tk", config=h100.config)
    assert r.returncode == 0, r.stderr
    assert not any(fm_active(h100).values())
    assert_nothing_left(vmenv, ["tk"], state_dir=h100.state)


def test_john_doe_and_a_work_dir_with_a_space_reach_the_guest_unchanged(vmenv):
    """Names and paths the host accepts used to drain the node (issue 9): a user with a dot, a
    work dir with a space, a quote and an é, and the user's supplementary groups (one the host
    names, one it does not) must arrive in the guest as they are, the share mounted
    nosuid,nodev. The user's container image cache comes as a second share at the same path,
    read-only: a file put there on the host is read in the guest, a write there fails, and the
    cache stays on the host after the VM."""
    from slurm_dgxvm import config as config_mod
    from slurm_dgxvm import lifecycle
    from slurm_dgxvm.design import image_cache_tag, share_tag
    from slurm_dgxvm.placement import Request

    work = vmenv.workdir / "a b" / "l'été $x"
    work.mkdir(parents=True)
    for d in (work.parent, work):
        os.chown(d, vmenv.uid, vmenv.gid)
    (work / "hello").write_text("from the host\n")
    env = lifecycle.Env(config_mod.load(str(vmenv.config)))
    req = lifecycle.CreateRequest(
        name="jd", placement=Request(count=1), owner="domain", user="john.doe", uid=vmenv.uid,
        gid=vmenv.gid, groups=(65534, 4321), home="/home/john.doe", workdir=str(work))
    cache = vmenv.containers / str(vmenv.uid)
    try:
        rec = lifecycle.create(env, req)
        assert rec.user == "john.doe"
        assert rec.image_cache == str(cache)
        assert env.vms.load_view("jd")["image_cache"] == str(cache)
        (cache / "probe").write_text("from the cache\n")       # as `dgxvm run` pulls, as the user
        os.chown(cache / "probe", vmenv.uid, vmenv.gid)
        q, c = shlex.quote(str(work)), shlex.quote(str(cache))
        out = ssh(vmenv, "jd", f"id -un; id -u; id -G; cat {q}/hello; echo hi > {q}/back; "
                               f"grep '^{share_tag(str(work))} ' /proc/mounts; "
                               f"grep '^{image_cache_tag(str(cache))} ' /proc/mounts; "
                               f"cat {c}/probe; "
                               f"if echo x > {c}/w 2>/dev/null; then echo wrote; "
                               f"else echo refused; fi",
                  user=vmenv.user)
        assert out.returncode == 0, out.stderr
        name, uid, gids, hello, mount, cache_mount, probe, write = out.stdout.splitlines()[:8]
        assert (name, int(uid)) == ("john.doe", vmenv.uid)
        assert {vmenv.gid, 65534, 4321} <= {int(g) for g in gids.split()}
        assert hello == "from the host"
        assert (work / "back").read_text() == "hi\n"
        assert (work / "back").stat().st_uid == vmenv.uid
        options = mount.split()[3].split(",")
        assert "nosuid" in options and "nodev" in options, mount
        assert "ro" not in options, mount
        # the image cache: at the same path, read-only, nosuid,nodev; the user's file is read,
        # a write is refused
        _tag, where, fstype, cache_options = cache_mount.split()[:4]
        assert (where, fstype) == (str(cache), "virtiofs"), cache_mount
        assert {"ro", "nosuid", "nodev"} <= set(cache_options.split(",")), cache_mount
        assert probe == "from the cache" and write == "refused", out.stdout
        assert not (cache / "w").exists()
    finally:
        try:
            lifecycle.delete(env, "jd")
        except Exception:  # noqa: BLE001 - the assertion below says what is left
            pass
    assert_nothing_left(vmenv, ["jd"])
    # the cache is the node's, not the VM's: it stays, the user's, with what is in it
    st = cache.stat()
    assert (st.st_uid, oct(st.st_mode & 0o777)) == (vmenv.uid, "0o700")
    assert (cache / "probe").read_text() == "from the cache\n"
