#!/usr/bin/env python3
"""Placement latency and ledger critical-section time on a simulated DGX-2 (16 GPUs).

    python benchmarks/placement_bench.py [--samples N] [--seed S]

Prints p50/p99 of ``place()`` over every request shape (1/2/4/8/16 GPUs; no Slurm choice, Slurm's
aligned choice, Slurm's scattered choice, --gpu-index) on random occupancies of the host, and the
time the ledger lock is held by a real allocate transaction (load, place, write+fsync+rename,
release), each beside its target, and where that time went (the ledger's own breakdown of each
hold: reading the document, the caller's block, encoding, writing, the two fsyncs, the rest).
Figures depend on the machine; run it, do not trust old numbers.
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slurm_dgxvm.errors import DgxvmError  # noqa: E402
from slurm_dgxvm.ledger import Allocation, Ledger  # noqa: E402
from slurm_dgxvm.placement import Occupancy, Policy, Request, place  # noqa: E402
from slurm_dgxvm.simulate import render  # noqa: E402
from slurm_dgxvm.topology import SysfsRoot, discover  # noqa: E402

PLACEMENT_TARGET_MS = 1.0
CRITICAL_SECTION_TARGET_MS = 10.0


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def random_occupancy(host, rng, policy) -> Occupancy:
    """Fill the host with random placements until a random share of GPUs is taken."""
    target = rng.randint(0, len(host.gpus))
    parts = []
    taken = Occupancy()
    for _ in range(64):
        if len(taken.gpus) >= target:
            break
        count = rng.choice(host.block_sizes)
        try:
            p = place(host, taken, Request(count=count), policy)
        except DgxvmError:
            continue
        parts.append(p.occupancy())
        taken = Occupancy.union(parts)
    return taken


def shapes(host, rng):
    out = []
    for count in host.block_sizes:
        aligned = rng.choice(host.blocks_by_size[count]).gpus
        scattered = tuple(sorted(rng.sample(range(len(host.gpus)), count)))
        out += [("count", Request(count=count)),
                ("slurm-aligned", Request(count=count, slurm_gpus=aligned)),
                ("slurm-scattered", Request(count=count, slurm_gpus=scattered)),
                ("gpu-index", Request(count=count, gpu_index=aligned[0]))]
    return out


def bench_placement(host, samples, rng, policy):
    """Latency of place(), split by outcome: a placement, or a refusal (no fit / bad request)."""
    placed, refused = [], []
    for _ in range(samples):
        taken = random_occupancy(host, rng, policy)
        for _, req in shapes(host, rng):
            t0 = time.perf_counter()
            try:
                place(host, taken, req, policy)
                out = placed
            except DgxvmError:
                out = refused
            out.append((time.perf_counter() - t0) * 1000)
    return placed, refused


PHASES = (
    ("read", "read the document"),
    ("body", "caller's block (occupancy, place)"),
    ("encode", "encode the new document"),
    ("write", "create + write the temp file"),
    ("fsync", "fsync the temp file"),
    ("rename", "rename over ledger.json"),
    ("fsync_dir", "fsync the directory"),
    ("rest", "the rest (bookkeeping, unlock)"),
)


def phases_ms(ledger) -> dict:
    """The last transaction's lock hold, split into PHASES (ms), and whether it parsed."""
    t = ledger.last_times
    w = t.write
    out = {"read": t.read_s, "body": t.body_s, "encode": t.encode_s or 0.0,
           "write": w.write_s if w else 0.0, "fsync": w.fsync_s if w else 0.0,
           "rename": w.rename_s if w else 0.0, "fsync_dir": w.fsync_dir_s if w else 0.0}
    out = {k: v * 1000 for k, v in out.items()}
    out["rest"] = t.lock.held_s * 1000 - sum(out.values())
    out["held"] = t.lock.held_s * 1000
    out["parsed"] = bool(t.parsed)
    return out


def bench_ledger(host, rounds, rng, policy):
    held, waits, phases = [], [], []
    with tempfile.TemporaryDirectory(prefix="dgxvm-bench-") as d:
        ledger = Ledger(d)
        job = 0
        for _ in range(rounds):
            count = rng.choice(host.block_sizes)
            job += 1
            key = f"job:{job}"
            try:
                with ledger.transaction() as txn:
                    p = place(host, txn.occupancy(), Request(count=count), policy)
                    txn.allocate(Allocation.from_placement(key, p, owner="job", job_id=job,
                                                           domain=f"dgxvm-job-{job}"))
            except DgxvmError:
                pass
            else:
                held.append(ledger.last_held_s * 1000)
                waits.append(ledger.last_lock_wait_s * 1000)
                phases.append(phases_ms(ledger))
            state = ledger.read()
            if state.allocations and rng.random() < 0.5:
                ledger.release(rng.choice(sorted(state.allocations)))
    return held, waits, phases


def _one_prolog(args):
    state_dir, sysfs, job, barrier = args
    host = discover(SysfsRoot(sysfs))
    ledger = Ledger(state_dir)
    barrier.wait()
    t0 = time.perf_counter()
    with ledger.transaction() as txn:
        p = place(host, txn.occupancy(), Request(count=1), Policy())
        txn.allocate(Allocation.from_placement(f"job:{job}", p, owner="job", job_id=job,
                                               domain=f"dgxvm-job-{job}"))
    return (time.perf_counter() - t0) * 1000, ledger.last_held_s * 1000, phases_ms(ledger)


def bench_concurrent(n: int = 16):
    """n prologs allocate a 1-GPU VM at the same instant: time to get through the ledger."""
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="dgxvm-bench-c-") as d:
        sysfs = str(render("dgx2", Path(d) / "sys"))
        with ctx.Manager() as mgr:
            barrier = mgr.Barrier(n)
            with ctx.Pool(n) as pool:
                res = pool.map(_one_prolog, [(str(Path(d) / "state"), sysfs, j, barrier)
                                             for j in range(1, n + 1)])
        allocations = len(Ledger(Path(d) / "state").read().allocations)
    return [r[0] for r in res], [r[1] for r in res], [r[2] for r in res], allocations


def print_breakdown(seq, conc):
    """Where the lock hold went: per phase, p50 of the sequential transactions, p50 and max of
    the concurrent ones, and the longest concurrent hold phase by phase."""
    print(f"  where the lock hold went (ms){'':<13}{'seq p50':>9}{'conc p50':>9}{'conc max':>9}")
    for key, label in PHASES:
        s50 = pct([p[key] for p in seq], 50)
        c = [p[key] for p in conc]
        print(f"    {label:<38}{s50:>9.3f}{pct(c, 50):>9.3f}{max(c):>9.3f}")
    worst = max(conc, key=lambda p: p["held"])
    print(f"  longest concurrent hold {worst['held']:.3f} ms = "
          + " + ".join(f"{key} {worst[key]:.3f}" for key, _ in PHASES))
    print(f"  document parsed under the lock: {sum(p['parsed'] for p in seq)} of {len(seq)} "
          f"sequential, {sum(p['parsed'] for p in conc)} of {len(conc)} concurrent transactions")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=300, help="random occupancies (x 20 shapes)")
    ap.add_argument("--rounds", type=int, default=300, help="ledger allocate transactions")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    policy = Policy()
    with tempfile.TemporaryDirectory(prefix="dgxvm-bench-sys-") as tree:
        host = discover(SysfsRoot(render("dgx2", tree)))

    for _ in range(50):  # warm caches (host lookups are cached properties)
        place(host, Occupancy(), Request(count=4), policy)
    placed, refused = bench_placement(host, args.samples, rng, policy)
    held, waits, seq_phases = bench_ledger(host, args.rounds, rng, policy)
    through, held16, conc_phases, n_alloc = bench_concurrent(16)

    print(f"dgxvm placement benchmark: simulated {host.display_name}, {len(host.gpus)} GPUs, "
          f"seed {args.seed}")
    print(f"{'measure (ms)':<40}{'n':>6}{'p50':>9}{'p99':>9}{'max':>9}{'target':>10}  verdict")
    rows = [
        ("place(): placed", placed, PLACEMENT_TARGET_MS, "p99"),
        ("place(): refused (no fit)", refused, PLACEMENT_TARGET_MS, "p99"),
        ("ledger critical section (lock held)", held, CRITICAL_SECTION_TARGET_MS, "max"),
        ("ledger lock wait, uncontended", waits, None, None),
        ("16 concurrent prologs: lock held", held16, CRITICAL_SECTION_TARGET_MS, "max"),
        ("16 concurrent prologs: through ledger", through, None, None),
    ]
    ok = True
    for label, vals, target, on in rows:
        p50, p99, mx = pct(vals, 50), pct(vals, 99), max(vals)
        verdict = ""
        if target is not None:
            v = p99 if on == "p99" else mx
            good = v < target
            ok &= good
            verdict = f"{on} {'<' if good else '>='} target: {'OK' if good else 'MISSED'}"
        tgt = f"< {target:g}" if target is not None else "-"
        print(f"  {label:<38}{len(vals):>6}{p50:>9.3f}{p99:>9.3f}{mx:>9.3f}{tgt:>10}  {verdict}")
    print(f"  ({len(shapes(host, rng))} request shapes: 1/2/4/8/16 GPUs x no Slurm choice, Slurm "
          f"aligned, Slurm scattered, --gpu-index; {args.samples} random occupancies)")
    print(f"  (16 concurrent prologs left {n_alloc} allocations in the ledger; expected 16)")
    print_breakdown(seq_phases, conc_phases)
    ok &= n_alloc == 16
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
