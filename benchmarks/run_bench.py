#!/usr/bin/env python3
"""dgxvm run beside plain ssh, on one test-guest VM (TCG): time to the first byte of a trivial
command as the job's user (over the job's shared connection) and as root (``--job``, a
connection of its own), throughput of a 200 MiB stream of output, 8 concurrent runs, and a
container run from a first pull beside one from the cache (Debian's docker-registry in the
node's namespace).

``--guest cloud`` runs it on the Debian cloud guest (guest-image/debian-cloud: OpenSSH, podman;
its profile lets a job's runs share one connection) instead of the test guest (dropbear, runc;
every run makes its own).

Run as root (it starts its own libvirtd in a network namespace, benchmarks/_node.py):
    .venv/bin/python benchmarks/run_bench.py [--runs 10] [--mib 200] [--guest test|cloud]
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
    ap.add_argument("--guest", choices=("test", "cloud"), default="test")
    args = ap.parse_args()
    if os.geteuid():
        raise SystemExit("run_bench: run as root (it starts libvirtd)")
    if args.guest == "cloud":
        from boot_bench import cloud_image
        image_dir, memory = cloud_image(), 1024      # systemd, cloud-init and podman want more
    else:
        image_dir, memory = guest_image()[0], 512
    uid, gid, _home = ensure_user(USER)
    vm = (f'share = "virtiofs"\nshare_roots = ["{{base}}"]\nfit_vcpus = 1\n'
          f'fit_memory_mib = {memory}\n'
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
            from harness.node import dgxvm_for_users
            exe = dgxvm_for_users(node.base / "dgxvm-for-users")
            # as a job runs them: the job's user, their dgxvm (bytecode compiled, as a
            # package installs it) beside their plain ssh with the job's key
            urun = [*ns, "runuser", "-u", USER, "--", "env", f"DGXVM_CONFIG={node.config}",
                    str(exe), "run", "-q", "--job", str(JOB), "--"]
            ussh = [*ns, "runuser", "-u", USER, "--", *target.ssh_argv()]
            # root's dgxvm run --job: becomes the user, makes its own connection every time
            run = [*ns, "env", f"DGXVM_CONFIG={node.config}", str(DGXVM), "run", "-q",
                   "--job", str(JOB), "--"]
            ssh = [*ns, *target.ssh_argv()]
            size = args.mib << 20
            bulk = f"head -c {size} /dev/zero"
            rows = {"first byte: echo hi": ([], []), "whole run: echo hi": ([], []),
                    "root --job, first byte": ([], []), "root --job, whole run": ([], []),
                    f"{args.mib} MiB of stdout (MiB/s)": ([], [])}
            for _ in range(args.runs):
                for i, argv in enumerate((urun + ["echo", "hi"], ussh + ["echo hi"])):
                    fb, total = first_byte(argv)
                    rows["first byte: echo hi"][i].append(fb)
                    rows["whole run: echo hi"][i].append(total)
                for i, argv in enumerate((run + ["echo", "hi"], ssh + ["echo hi"])):
                    fb, total = first_byte(argv)
                    rows["root --job, first byte"][i].append(fb)
                    rows["root --job, whole run"][i].append(total)
            for _ in range(max(2, args.runs // 4)):
                for i, argv in enumerate((run + ["sh", "-c", bulk], ssh + [bulk])):
                    secs, n = stream(argv)
                    assert n == size, n
                    rows[f"{args.mib} MiB of stdout (MiB/s)"][i].append(args.mib / secs)
            # containers: as the user (the cache is theirs), first pull then cached
            from harness.registry import LocalRegistry, build_image
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
                    codes = list(pool.map(lambda _i: attempt(urun + ["echo", "hi"]),
                                          range(8)))
                conc.append(time.monotonic() - t0)
                failed += sum(1 for c in codes if c != 0)
        finally:
            lifecycle.delete(env, name)
    print()
    guest = ("Debian cloud guest under TCG, 1 vCPU, 1024 MiB, OpenSSH, shared connection"
             if args.guest == "cloud" else
             "dgxvm-test-guest under TCG, 1 vCPU, 512 MiB, dropbear, a connection per run")
    print(f"guest: {guest}; medians of {args.runs} runs ({max(2, args.runs // 4)} for the "
          f"stream)")
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
