"""What the VM benchmarks share: the test guest, and a simulated DGX-2 node with its own
libvirtd (in a network namespace, harness/libvirt.py), dgxvm's hooks and a dgxvm config, set up
for one run and removed after it, every daemon stopped by PID."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from harness.libvirt import LibvirtStack  # noqa: E402
from harness.soak import Node, ordinary_user  # noqa: E402
from slurm_dgxvm.lifecycle import libvirt_hook_script  # noqa: E402
from slurm_dgxvm.netfilter import network_hook_script  # noqa: E402

DGXVM = Path(sys.executable).with_name("dgxvm")


def sh(*argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True, **kw)


def guest_image() -> tuple[Path, dict]:
    """The test guest (built once, cached by guest-image/build): its directory and manifest."""
    image_dir = Path(sh(REPO / "guest-image/build", timeout=1800).stdout.strip().splitlines()[-1])
    return image_dir, json.loads((image_dir / "manifest.json").read_text())


class BenchNode:
    """``with BenchNode(...) as node:`` a node to benchmark on; ``node.dgxvm(...)`` runs the
    command against its config. ``vm`` is the config's ``[vm]`` section (TOML lines; ``{base}``
    in it becomes the node's directory)."""

    def __init__(self, name: str, *, network: str, cidr: str, vm: str, image_dir: Path,
                 dirs: tuple[str, ...] = ()):
        self.name, self.network, self.cidr, self.vm = name, network, cidr, vm
        self.image_dir, self.dirs = image_dir, dirs

    def __enter__(self) -> BenchNode:
        self.base = base = Path(tempfile.mkdtemp(prefix=f"dgxvm-{self.name}-", dir="/var/tmp"))
        os.chmod(base, 0o755)
        for sub in ("state", "images", *self.dirs):
            (base / sub).mkdir(mode=0o755)
        sh(DGXVM, "simulate", "dgx2", "--out", base / "dgx2")
        self.config = base / "dgxvm.toml"
        self.config.write_text(
            f'[host]\nsysfs_root = "{base}/dgx2"\nstate_dir = "{base}/state"\n\n'
            f'[libvirt]\ndomain_type = "qemu"\nnetwork = "{self.network}"\n'
            f'network_cidr = "{self.cidr}"\nready_timeout_s = 300.0\n\n'
            f'[images]\nstore = "{base}/images"\n\n[vm]\n{self.vm.replace("{base}", str(base))}')
        self.env = {**os.environ, "DGXVM_CONFIG": str(self.config)}
        self.stack = LibvirtStack(base / "libvirt", netns=f"dgxvm-{self.name}",
                                  hook=libvirt_hook_script(str(DGXVM), str(self.config)),
                                  network_hook=network_hook_script(str(DGXVM), str(self.config)))
        try:
            self.stack.start()
            self.dgxvm("image", "install", self.image_dir / "manifest.json", "--name", "bench",
                       "--default")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for verb in ("net-destroy", "net-undefine"):   # persistent: it would outlive the stack
            subprocess.run(["virsh", "-c", "qemu:///system", verb, self.network],
                           capture_output=True)
        self.stack.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def dgxvm(self, *args, timeout: float = 600) -> tuple[float, subprocess.CompletedProcess]:
        """Run ``dgxvm ARGS``; (seconds it took, its result). A failure ends the benchmark."""
        t0 = time.monotonic()
        r = subprocess.run([str(DGXVM), *map(str, args)], capture_output=True, text=True,
                           env=self.env, timeout=timeout)
        if r.returncode:
            raise SystemExit(f"dgxvm {' '.join(map(str, args))} failed: {r.stderr}")
        return time.monotonic() - t0, r


#: the local node's [vm] (harness/node.py): the work dir shared, 1 vCPU and 384 MiB per guest
#: on this small host
JOB_VM = 'share = "virtiofs"\nshare_roots = ["{base}"]\nfit_vcpus = 1\nfit_memory_mib = 384\n'


@contextlib.contextmanager
def job_node(name: str, *, network: str, cidr: str, image_dir: Path, user: str):
    """``with job_node(...) as (bench, node, config):`` a BenchNode with :data:`JOB_VM`, its work
    dir owned by ``user`` (made and removed: harness.soak.ordinary_user), the harness's
    :class:`harness.soak.Node` for it, and the hooks' config file that node's Prologs read."""
    with ordinary_user(user) as pw, BenchNode(name, network=network, cidr=cidr, vm=JOB_VM,
                                              image_dir=image_dir, dirs=("work",)) as bench:
        os.chown(bench.base / "work", pw.pw_uid, pw.pw_gid)
        node = Node(uri="qemu:///system", network=network, state_dir=bench.base / "state",
                    sysfs=bench.base / "dgx2", config=bench.config, stack=bench.stack,
                    user=user, workdir=bench.base / "work")
        yield bench, node, node.hooks_config(bench.base / "hooks.toml")
