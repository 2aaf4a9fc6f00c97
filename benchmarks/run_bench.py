#!/usr/bin/env python3
"""dgxvm run beside plain ssh, on one test-guest VM (TCG): time to the first byte of a trivial
command, throughput of a 200 MiB stream of output, 8 concurrent runs, and a container run from
a first pull beside one from the cache (Debian's docker-registry in the node's namespace).

Run as root (it starts its own libvirtd in a network namespace, benchmarks/_node.py):
    .venv/bin/python benchmarks/run_bench.py [--runs 10] [--mib 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _node import DGXVM, BenchNode, guest_image  # noqa: E402

from harness.slurm import ensure_user  # noqa: E402

USER = "dgxvmbench"
NETWORK, CIDR = "dgxvmrunb", "10.213.77.0/24"
JOB = 880001


def attempt(argv: list[str]) -> int:
    """The exit status of one run (the concurrent case counts failures)."""
    return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True).returncode


def first_byte(argv: list[str]) -> tuple[float, float]:
    """(seconds to the first byte of stdout, seconds to the end)."""
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    first = p.stdout.read(1)
    t1 = time.monotonic()
    p.stdout.read()
    p.wait()
    assert first and p.returncode == 0, (argv, p.returncode)
    return t1 - t0, time.monotonic() - t0


def stream(argv: list[str]) -> tuple[float, int]:
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    n = 0
    while chunk := p.stdout.read(1 << 20):
        n += len(chunk)
    p.wait()
    assert p.returncode == 0, (argv, p.returncode)
    return time.monotonic() - t0, n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--mib", type=int, default=200)
    args = ap.parse_args()
    if os.geteuid():
        raise SystemExit("run_bench: run as root (it starts libvirtd)")
    image_dir, _ = guest_image()
    uid, gid, _home = ensure_user(USER)
    vm = ('share = "virtiofs"\nshare_roots = ["{base}"]\nfit_vcpus = 1\nfit_memory_mib = 512\n'
          '\n[containers]\ncache_dir = "{base}/containers"\n'
          'insecure_registries = ["127.0.0.1:5000"]\n')
    with BenchNode("runbench", network=NETWORK, cidr=CIDR, vm=vm, image_dir=image_dir,
                   dirs=("work",)) as node:
        from slurm_dgxvm import config as config_mod
        from slurm_dgxvm import lifecycle
        from slurm_dgxvm.access.target import target_for
        from slurm_dgxvm.placement import Request
        from slurm_dgxvm.slurm.job import domain_for
        env = lifecycle.Env(config_mod.load(str(node.config)))
        name = domain_for(env.cfg, JOB)
        wd = node.base / "work"
        os.chown(wd, uid, gid)
        lifecycle.create(env, lifecycle.CreateRequest(
            name=name, placement=Request(count=1), owner="job", job_id=JOB, user=USER, uid=uid,
            gid=gid, home=f"/home/{USER}", workdir=str(wd)))
        try:
            target = target_for(env, JOB)
            ns = ["ip", "netns", "exec", f"dgxvm-{node.name}"]
            run = [*ns, "env", f"DGXVM_CONFIG={node.config}", str(DGXVM), "run", "-q",
                   "--job", str(JOB), "--"]
            ssh = [*ns, *target.ssh_argv()]
            size = args.mib << 20
            bulk = f"head -c {size} /dev/zero"
            rows = {"first byte: echo hi": ([], []), "whole run: echo hi": ([], []),
                    f"{args.mib} MiB of stdout (MiB/s)": ([], [])}
            for _ in range(args.runs):
                for i, argv in enumerate((run + ["echo", "hi"], ssh + ["echo hi"])):
                    fb, total = first_byte(argv)
                    rows["first byte: echo hi"][i].append(fb)
                    rows["whole run: echo hi"][i].append(total)
            for _ in range(max(2, args.runs // 4)):
                for i, argv in enumerate((run + ["sh", "-c", bulk], ssh + [bulk])):
                    secs, n = stream(argv)
                    assert n == size, n
                    rows[f"{args.mib} MiB of stdout (MiB/s)"][i].append(args.mib / secs)
            # containers: as the user (the cache is theirs), first pull then cached
            from harness.node import dgxvm_for_users
            from harness.registry import LocalRegistry, build_image
            exe = dgxvm_for_users(node.base / "dgxvm-for-users")
            urun = [*ns, "runuser", "-u", USER, "--", "env", f"DGXVM_CONFIG={node.config}",
                    str(exe), "run", "-q", "--job", str(JOB), "--"]
            reg = LocalRegistry(node.base / "registry", port=5000, netns=f"dgxvm-{node.name}")
            reg.start()
            try:
                build_image(reg, "bench/busy", "1", node.base / "build")
                cimg = [*urun[:-1], "--container-image", f"{reg.endpoint}/bench/busy:1", "--",
                        "sh", "-c", "echo hi"]
                first_pull = first_byte(cimg)
                cached = [first_byte(cimg) for _ in range(max(3, args.runs // 2))]
                plain_user = [first_byte([*urun, "echo", "hi"]) for _ in range(3)]
            finally:
                reg.stop()
            conc, failed = [], 0
            for _ in range(3):
                t0 = time.monotonic()
                with ThreadPoolExecutor(8) as pool:
                    codes = list(pool.map(lambda _i: attempt(run + ["echo", "hi"]), range(8)))
                conc.append(time.monotonic() - t0)
                failed += sum(1 for c in codes if c != 0)
        finally:
            lifecycle.delete(env, name)
    print()
    print(f"guest: dgxvm-test-guest under TCG, 1 vCPU, 512 MiB, dropbear; medians of "
          f"{args.runs} runs ({max(2, args.runs // 4)} for the stream)")
    print(f"{'measure':<34} {'dgxvm run':>10} {'plain ssh':>10} {'ratio':>7}")
    for title, (d, s) in rows.items():
        md, ms = statistics.median(d), statistics.median(s)
        unit = "" if "MiB/s" in title else "s"
        print(f"{title:<34} {md:9.3f}{unit:1} {ms:9.3f}{unit:1} {md / ms:7.2f}")
    print(f"{'container, first pull: echo hi':<34} {first_pull[1]:9.3f}s (first byte "
          f"{first_pull[0]:.3f}s)")
    print(f"{'container, cached image: echo hi':<34} "
          f"{statistics.median(c[1] for c in cached):9.3f}s (first byte "
          f"{statistics.median(c[0] for c in cached):.3f}s; no container, same user: "
          f"{statistics.median(p[1] for p in plain_user):.3f}s)")
    print(f"{'8 concurrent dgxvm run echo hi':<34} {statistics.median(conc):9.3f}s "
          f"(all 8 done; one alone: {statistics.median(rows['whole run: echo hi'][0]):.3f}s); "
          f"{failed} of 24 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
