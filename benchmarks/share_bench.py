"""Work dir share benchmark: the share served as the job's user (dgxvm's virtiofsd wrapper: user
namespace, seccomp filter) beside libvirt's own root virtiofsd, on the same guest, in one run.

In the guest, as the job's user, on the share: sequential write of 1 GiB (dd, conv=fsync),
sequential read of it after dropping the guest's page cache, and creating 10,000 small files.
Times are taken in the guest (/proc/uptime), so ssh's own cost is not counted.

How the baseline is made: the same VM (`dgxvm create --workdir`) is destroyed and started again
with `virsh create` of its own domain XML minus the <binary> element, i.e. served by libvirt's
default virtiofsd as root (the design this issue replaced); same disks, seed, address and share.

Run as root on a machine without a running libvirtd: python benchmarks/share_bench.py [--runs N]
It starts libvirtd/virtlogd in a network namespace (harness/libvirt.py) and stops them by PID.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import libvirt  # noqa: E402

from harness.guest_agent import guest_exec  # noqa: E402
from harness.libvirt import LibvirtStack  # noqa: E402
from harness.node import ensure_user  # noqa: E402
from slurm_dgxvm import hypervisor  # noqa: E402
from slurm_dgxvm.lifecycle import libvirt_hook_script  # noqa: E402
from slurm_dgxvm.netfilter import network_hook_script  # noqa: E402

DGXVM = Path(sys.executable).with_name("dgxvm")
NETWORK, NETNS, CIDR, USER = "dgxvmshare", "dgxvm-sharebench", "10.216.0.0/24", "dgxvmbench"

WORKLOADS = {
    "write 1 GiB (dd bs=1M, fsync)":
        "dd if=/dev/zero of=big bs=1M count=1024 conv=fsync 2>/dev/null",
    "read 1 GiB (guest cache dropped)": "dd if=big of=/dev/null bs=1M 2>/dev/null",
    "create 10,000 small files":
        "mkdir small && cd small && i=0; while [ $i -lt 10000 ]; do : > f$i; i=$((i+1)); done",
}


def sh(*argv, **kw):
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True, **kw)


def timed_in_guest(base: Path, name: str, wd: Path, script: str) -> float:
    """Seconds ``script`` took in the guest, run as the VM's user in ``wd`` over ssh."""
    vmdir = base / "state" / "vms" / name
    rec_addr = (vmdir / "known_hosts").read_text().split()[0]
    body = (f"cd '{wd}' && a=$(cut -d' ' -f1 /proc/uptime) && {{ {script}; }} && "
            f"b=$(cut -d' ' -f1 /proc/uptime) && echo elapsed=$a,$b")
    r = subprocess.run(["ip", "netns", "exec", NETNS, "runuser", "-u", USER, "--", "ssh", "-i",
                        str(vmdir / "id_ed25519"), "-o", f"UserKnownHostsFile={vmdir / 'known_hosts'}",
                        "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
                        f"{USER}@{rec_addr}", body], capture_output=True, text=True, timeout=3600)
    m = re.search(r"elapsed=([\d.]+),([\d.]+)", r.stdout)
    if r.returncode or not m:
        raise SystemExit(f"workload {script!r} failed ({r.returncode}): {r.stderr[-500:]}")
    return float(m.group(2)) - float(m.group(1))


def run_workloads(base, name, dom, wd) -> list[float]:
    out = []
    for title, script in WORKLOADS.items():
        if "read" in title:
            guest_exec(dom, "sync; echo 3 > /proc/sys/vm/drop_caches")
        out.append(timed_in_guest(base, name, wd, script))
    subprocess.run(["rm", "-rf", str(wd / "big"), str(wd / "small")], check=True)
    return out


def _wait_agent(dom) -> None:
    deadline = time.monotonic() + 300
    while not hypervisor.agent_ping(dom):
        if time.monotonic() > deadline:
            raise SystemExit("share_bench: the guest agent never answered")
        time.sleep(0.25)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    if os.geteuid():
        raise SystemExit("share_bench: run as root (it starts libvirtd)")
    image_dir = Path(sh(REPO / "guest-image/build", timeout=1800).stdout.strip().splitlines()[-1])
    created_user = False
    import pwd
    try:
        pwd.getpwnam(USER)
    except KeyError:
        created_user = True
    uid, gid, _home = ensure_user(USER)
    base = Path(tempfile.mkdtemp(prefix="dgxvm-sharebench-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    for sub in ("state", "images", "work"):
        (base / sub).mkdir(mode=0o755)
    wd = base / "work"
    os.chown(wd, uid, gid)
    sh(DGXVM, "simulate", "dgx2", "--out", base / "dgx2")
    cfg = base / "dgxvm.toml"
    cfg.write_text(
        f'[host]\nsysfs_root = "{base}/dgx2"\nstate_dir = "{base}/state"\n\n'
        f'[libvirt]\ndomain_type = "qemu"\nnetwork = "{NETWORK}"\nnetwork_cidr = "{CIDR}"\n'
        f'ready_timeout_s = 300.0\n\n[images]\nstore = "{base}/images"\n\n'
        f'[vm]\nshare = "virtiofs"\nshare_roots = ["{base}"]\nfit_vcpus = 1\n'
        f'fit_memory_mib = 512\n')
    env = {**os.environ, "DGXVM_CONFIG": str(cfg)}
    stack = LibvirtStack(base / "libvirt", netns=NETNS,
                         hook=libvirt_hook_script(str(DGXVM), str(cfg)),
                         network_hook=network_hook_script(str(DGXVM), str(cfg)))
    stack.start()
    rows: dict[str, list[list[float]]] = {"as the job's user (dgxvm)": [], "root virtiofsd": []}
    try:
        sh(DGXVM, "image", "install", image_dir / "manifest.json", "--name", "bench",
           "--default", env=env)
        conn = libvirt.open("qemu:///system")
        sh(DGXVM, "create", "--gpu-count", "1", "--domain", "sb", "--user", USER, "--workdir",
           wd, env=env, timeout=600)
        xml = conn.lookupByName("sb").XMLDesc(0)
        root_xml = re.sub(r"\s*<binary path=[^>]*/>", "", xml)
        assert "<binary" in xml and "<binary" not in root_xml

        def as_user():
            return run_workloads(base, "sb", conn.lookupByName("sb"), wd)

        def as_root():
            hypervisor.destroy(conn.lookupByName("sb"))   # the same VM, root virtiofsd
            dom = conn.createXML(root_xml, 0)
            _wait_agent(dom)
            out = run_workloads(base, "sb", dom, wd)
            hypervisor.destroy(dom)
            dom = conn.lookupByName("sb")
            dom.create()
            _wait_agent(dom)
            return out

        for i in range(args.runs):                    # alternate who goes first
            order = (("user", as_user), ("root", as_root))
            got = dict((k, f()) for k, f in (order if i % 2 == 0 else order[::-1]))
            rows["as the job's user (dgxvm)"].append(got["user"])
            rows["root virtiofsd"].append(got["root"])
            print(f"run {i}: user {['%.2f' % x for x in got['user']]}  "
                  f"root {['%.2f' % x for x in got['root']]}", flush=True)
        sh(DGXVM, "delete", "--domain", "sb", env=env, timeout=600)
        conn.close()
    finally:
        subprocess.run([str(DGXVM), "delete", "--domain", "sb"], env=env, capture_output=True)
        for verb in ("net-destroy", "net-undefine"):
            subprocess.run(["virsh", "-c", "qemu:///system", verb, NETWORK], capture_output=True)
        stack.stop()
        shutil.rmtree(base, ignore_errors=True)
        if created_user:
            subprocess.run(["userdel", "--remove", USER], capture_output=True)

    print()
    print(f"guest: dgxvm-test-guest under TCG, 1 vCPU, 512 MiB; {args.runs} run(s), medians, "
          f"seconds in the guest")
    print(f"{'workload':<36} {'as user':>9} {'root':>9} {'ratio':>7}")
    med = {k: [statistics.median(c) for c in zip(*v)] for k, v in rows.items()}
    for i, title in enumerate(WORKLOADS):
        u, r = med["as the job's user (dgxvm)"][i], med["root virtiofsd"][i]
        print(f"{title:<36} {u:8.2f}s {r:8.2f}s {u / r:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
