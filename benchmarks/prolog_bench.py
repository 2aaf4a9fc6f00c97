"""The Prolog's time, stage by stage, of this checkout beside another revision's, in one run.

One simulated DGX-2 node with its own libvirtd (benchmarks/_node.py), the test guest, and a
job's user whose work dir is shared (so the Prolog does every as-the-user step: the work dir's
check and the image cache's pin). Each round runs one real `dgxvm prolog` of a 1-GPU job with
the environment slurmd gives it, then its `dgxvm epilog`, first with the base revision's package
(a `git worktree` of ``--base``, put first on PYTHONPATH), then with this checkout's, so both
meet the same node in turn. Printed: each create stage's median per side and their ratio, the
Prolog's whole time (release to exit), and the part of it that is not the guest's boot (boot_s
less stage `ready`), which is where dgxvm's own steps are.

Run as root, with no libvirtd running (it starts its own in a network namespace):
    flock /tmp/dgxvm-libvirt.lock .venv/bin/python benchmarks/prolog_bench.py \\
        [--base REV] [--rounds N]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _node import REPO, guest_image, job_node  # noqa: E402

from harness.soak import Node, exit_on_sigterm, hooks_at_once, job_environ  # noqa: E402

USER = "dgxvmprolog"
NETWORK, CIDR = "dgxvmprolog", "10.213.89.0/24"
FIRST_JOB = 710001


def launcher(path: Path, tree: Path) -> Path:
    """A ``dgxvm`` that runs the package of ``tree``."""
    path.write_text(f"#!/bin/sh\nPYTHONPATH={tree} exec /usr/bin/python3 -m "
                    f"slurm_dgxvm.cli.main \"$@\"\n")
    path.chmod(0o755)
    return path


def one(node: Node, config: Path, job: int) -> dict:
    env = job_environ(node, job, "0", config)
    [run], _ = hooks_at_once(node, "prolog", {job: env}, 900)
    if run.rc != 0:
        raise RuntimeError(f"prolog of job {job}: exit {run.rc}: {run.out.strip()[-800:]}")
    rec = next(r for r in node.records().values() if r.get("job_id") == job)
    [end], _ = hooks_at_once(node, "epilog", {job: env}, 900)
    if end.rc != 0:
        raise RuntimeError(f"epilog of job {job}: exit {end.rc}: {end.out.strip()[-800:]}")
    stages = dict(rec.get("create_stages") or {})
    return {"prolog_s": run.seconds, "stages": stages,
            "own_s": float(rec["boot_s"]) - float(stages.get("ready", 0))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="d7c5165",
                    help="the revision to compare with (default: the one before issue 23)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    exit_on_sigterm()
    image_dir, _ = guest_image()
    work = Path(tempfile.mkdtemp(prefix="dgxvm-prolog-bench-"))
    base = work / "base"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base), args.base],
                   check=True, capture_output=True)
    sides = {f"base {args.base}": launcher(work / "dgxvm-base", base),
             "this checkout": launcher(work / "dgxvm-this", REPO)}
    got: dict[str, list[dict]] = {k: [] for k in sides}
    try:
        with job_node("prolog", network=NETWORK, cidr=CIDR, image_dir=image_dir,
                      user=USER) as (_, node, config):
            job = FIRST_JOB
            one(replace(node, dgxvm=sides["this checkout"]), config, job)   # warm: network up
            for r in range(args.rounds):
                for name, dgxvm in sides.items():
                    job += 1
                    t = one(replace(node, dgxvm=dgxvm), config, job)
                    got[name].append(t)
                    print(f"round {r + 1} {name}: prolog {t['prolog_s']:.2f}s, dgxvm's own "
                          f"{t['own_s']:.3f}s", flush=True)
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)],
                       capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    (a, ra), (b, rb) = got.items()
    stages = sorted({s for t in ra + rb for s in t["stages"]},
                    key=lambda s: -statistics.median(t["stages"].get(s, 0) for t in rb))
    print(f"\nmedians over {args.rounds} rounds, one 1-GPU Prolog at a time "
          f"(time.monotonic; {time.strftime('%Y-%m-%d')})")
    print(f"{'':28} {a:>18} {b:>18}  ratio")

    def row(label, xs, ys, fmt="{:.3f}"):
        x, y = statistics.median(xs), statistics.median(ys)
        ratio = f"{y / x:.3f}" if x else "-"
        print(f"{label:28} {fmt.format(x):>18} {fmt.format(y):>18}  {ratio}")
    row("Prolog, release to exit (s)", [t["prolog_s"] for t in ra], [t["prolog_s"] for t in rb])
    row("dgxvm's own (boot_s-ready)", [t["own_s"] for t in ra], [t["own_s"] for t in rb])
    for s in stages:
        row(f"  stage {s}", [t["stages"].get(s, 0) for t in ra],
            [t["stages"].get(s, 0) for t in rb])
    return 0


if __name__ == "__main__":
    sys.exit(main())
