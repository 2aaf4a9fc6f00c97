"""The demo's VM part: real libvirtd/virtlogd (in a network namespace), the test guest built from
Debian packages, two GPU VMs carved from the simulated DGX-2 with the nvidia-vm verbs, reached
over SSH with the pinned host key, stopped and started with virsh, deleted. Every process it
starts it stops by PID (harness/libvirt.py), even on Ctrl-C.

Usage (demo/run calls it): python demo/vms.py WORKDIR SYSFS_ROOT
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness.libvirt import LibvirtStack  # noqa: E402
from slurm_dgxvm.lifecycle import libvirt_hook_script  # noqa: E402
from slurm_dgxvm.netfilter import network_hook_script  # noqa: E402

DGXVM = Path(sys.executable).with_name("dgxvm")


def step(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def run(*argv, check=True) -> subprocess.CompletedProcess:
    shown = " ".join(str(a) for a in argv)
    print(f"$ {shown.replace(str(DGXVM), 'dgxvm')}", flush=True)
    r = subprocess.run([str(a) for a in argv], text=True, capture_output=True)
    out = (r.stdout + r.stderr).rstrip()
    if out:
        print(out, flush=True)
    if check and r.returncode:
        raise SystemExit(f"demo: {shown} failed (exit {r.returncode})")
    return r


def main(work: Path, sysfs: Path) -> int:
    base = work / "vms"
    base.mkdir(mode=0o755)
    os.chmod(work, 0o755)     # QEMU runs as libvirt-qemu and must reach the VM disks
    for d in ("state", "images"):
        (base / d).mkdir(mode=0o755)
    cfg = base / "dgxvm.toml"
    cfg.write_text(
        f'[host]\nsysfs_root = "{sysfs}"\nstate_dir = "{base}/state"\n\n'
        f'[libvirt]\ndomain_type = "qemu"   # TCG: this machine has no usable KVM\n'
        f'network = "dgxvm-demo"\nnetwork_cidr = "10.216.0.0/24"\nready_timeout_s = 300.0\n\n'
        f'[images]\nstore = "{base}/images"\n\n[vm]\nfit_vcpus = 1\nfit_memory_mib = 384\n')
    os.environ["DGXVM_CONFIG"] = str(cfg)
    os.environ.pop("DGXVM_STATE_DIR", None)
    os.environ.pop("DGXVM_SYSFS_ROOT", None)

    step("9. The test guest, built from Debian packages only (cached by package versions)")
    built = run(REPO / "guest-image/build").stdout.strip().splitlines()[-1]
    manifest = Path(built) / "manifest.json"

    stack = LibvirtStack(base / "libvirt", netns="dgxvm-demo",
                         hook=libvirt_hook_script(str(DGXVM), str(cfg)),
                         network_hook=network_hook_script(str(DGXVM), str(cfg)))
    step("10. libvirtd + virtlogd, started in network namespace dgxvm-demo, dgxvm's hooks installed")
    stack.start()
    try:
        print(f"libvirtd pid {stack.pids()['libvirtd']}, virtlogd pid {stack.pids()['virtlogd']}")
        run(DGXVM, "image", "install", manifest, "--name", "testguest", "--default")
        run(DGXVM, "image", "show")

        step("11. Two VMs, as nvidia-vm would make them: a 4-GPU and a 2-GPU block")
        run(DGXVM, "create", "--gpu-count", "4", "--domain", "vm-a", "--user", "root")
        run(DGXVM, "create", "--gpu-count", "2", "--gpu-index", "8", "--domain", "vm-b",
            "--user", "root")
        run(DGXVM, "list")
        run(DGXVM, "topology", "show")

        step("12. Into vm-a over SSH: its key, the host key pinned (no StrictHostKeyChecking=no)")
        rec = json.loads((base / "state/vms/vm-a/record.json").read_text())
        d = base / "state/vms/vm-a"
        run("ip", "netns", "exec", "dgxvm-demo", "ssh", "-i", d / "id_ed25519",
            "-o", f"UserKnownHostsFile={d / 'known_hosts'}", "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes", f"root@{rec['address']}",
            "echo \"$(hostname): kernel $(uname -r), $(nproc) vCPU\"; runc --version | head -1")

        step("13. virsh shutdown vm-b gives its GPUs back and keeps its drives; virsh start takes them again")
        run("virsh", "-c", "qemu:///system", "shutdown", "vm-b")
        for _ in range(600):
            if "shut off" in run("virsh", "-c", "qemu:///system", "domstate", "vm-b").stdout:
                break
            time.sleep(0.5)
        run(DGXVM, "list")
        run("virsh", "-c", "qemu:///system", "start", "vm-b")
        run(DGXVM, "list")

        step("14. dgxvm delete: shutdown, undefine, drives, address, ledger; nothing left")
        run(DGXVM, "delete", "--domain", "vm-a")
        run(DGXVM, "delete", "--domain", "vm-b")
        run(DGXVM, "list")
        run("virsh", "-c", "qemu:///system", "net-destroy", "dgxvm-demo", check=False)
        run("virsh", "-c", "qemu:///system", "net-undefine", "dgxvm-demo", check=False)
    finally:
        stack.stop()
    print("libvirtd, virtlogd and every QEMU stopped by PID; namespace dgxvm-demo removed")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
