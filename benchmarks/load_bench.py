"""Load: N Prologs of 1-GPU jobs started at the same moment on the simulated DGX-2, then N
Epilogs at once (harness/soak.py `load`).

Each Prolog is a real `dgxvm prolog` process with the environment slurmd gives a job's Prolog
(SLURM_JOB_ID, _UID, _GID, _USER, _GPUS = its own GPU index, _WORK_DIR, _PARTITION), released
together from one gate; the config has `[slurm] accounting = false`, so no Slurm is needed:
this node is libvirt only (benchmarks/_node.py), and the moment the Prologs start is ours, not
slurmctld's scheduling loop's. Printed, each beside its target: every VM ready, no deadlock
(all ended within --deadline), N distinct GPUs and disjoint core sets (from the ledger and from
each domain's XML), ledger = libvirt, the longest ledger lock hold (each VM record's lock_s;
target < 10 ms), the wall time, and where the Prologs' time went (the guest's boot, stage
`ready`, against the rest); then the Epilogs, and nothing left (domains, QEMU, VM dirs,
ledger entries, DHCP reservations). --warm runs one Prolog and Epilog first, so the burst meets
a node that has run a job (its libvirt network defined and started) instead of a fresh one.

Run as root, with no libvirtd running (it starts its own in a network namespace):
    flock /tmp/dgxvm-libvirt.lock .venv/bin/python benchmarks/load_bench.py [--count 16] [--warm]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _node import guest_image, job_node  # noqa: E402

from harness.soak import exit_on_sigterm, load, print_checks  # noqa: E402

USER = "dgxvmload"
NETWORK, CIDR = "dgxvmload", "10.213.88.0/24"
FIRST_JOB = 700001


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=16, choices=range(1, 17), metavar="N",
                    help="Prologs at once, 1..16 (one GPU each; default 16)")
    ap.add_argument("--deadline", type=float, default=1200.0,
                    help="seconds by which every Prolog (and every Epilog) must have ended")
    ap.add_argument("--warm", action="store_true",
                    help="one Prolog and Epilog before the burst (a node that has run a job: "
                         "its network up), instead of a fresh node")
    ap.add_argument("--ready-timeout", type=float, default=900.0,
                    help="the Prologs' [libvirt] ready_timeout_s (16 TCG guests booting at once "
                         "on 2 CPUs take longer than the usual 300 s)")
    args = ap.parse_args()
    if os.geteuid():
        raise SystemExit("load_bench: run as root (it starts libvirtd)")
    exit_on_sigterm()
    t_all = time.monotonic()
    image_dir, _ = guest_image()
    with job_node("load", network=NETWORK, cidr=CIDR, image_dir=image_dir,
                  user=USER) as (_, node, config):
        config.write_text(config.read_text().replace(
            "ready_timeout_s = 300.0", f"ready_timeout_s = {args.ready_timeout}"))
        print(f"node up in {time.monotonic() - t_all:.1f}s (libvirt only; "
              f"`[slurm] accounting = false`)", flush=True)
        checks, fig = load(node, args.count, config=config, first_job=FIRST_JOB,
                           deadline_s=args.deadline, warm=args.warm,
                           say=lambda s: print(s, flush=True))
    ok = print_checks(f"{args.count} Prologs at once on a simulated DGX-2 (TCG guests, "
                      f"{os.cpu_count()} host CPUs)", checks)
    if fig["boot_s"]:
        boot, ready = statistics.median(fig["boot_s"]), statistics.median(fig["guest_ready_s"])
        print(f"\nwhere a Prolog's time went (medians over {len(fig['boot_s'])} VMs): boot_s "
              f"{boot:.1f}s, of which the guest's boot (stage `ready`) {ready:.1f}s = "
              f"{100 * ready / boot:.0f}%; everything else {boot - ready:.2f}s")
        print("each Prolog process, release to exit (s): "
              + " ".join(f"{s:.1f}" for s in fig["prolog_s"]))
    print(f"\nwhole run {time.monotonic() - t_all:.0f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
