"""The cost of the as-the-user primitive: ``shares.policy.pin()`` of a directory as a user (what
each Prolog does for the work dir and the image cache) before and after it moved onto
``shares.asuser`` (a deadline, every inherited descriptor closed, no-new-privs, a verified
drop), side by side in one run.

"before" is the code of ``open_as_user`` as it was (fork, drop, walk, send the descriptor back,
block in recv and waitpid with no deadline), copied here verbatim; "after" is the package's
``policy.pin``. Both pin the same directory as the same user, alternately (so drift in the
machine's load hits both alike), in a process that has imported what a Prolog imports and holds
a few descriptors. Prints p50/p95/max in milliseconds over ``--calls`` calls each.

Run as root: python benchmarks/asuser_bench.py [--calls 200] [--uid 65534]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import stat
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from slurm_dgxvm import lifecycle  # noqa: E402,F401 - what a Prolog has imported
from slurm_dgxvm.errors import ShareRefused  # noqa: E402
from slurm_dgxvm.shares import policy  # noqa: E402
from slurm_dgxvm.shares.policy import ShareSpec  # noqa: E402

_DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


# -- before: shares/policy.py's open_as_user and _walk as they were (commit 9e463aa^) ---------------
def open_as_user_before(path: str, uid: int, gid: int, groups: Sequence[int]) -> int:
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            parent.close()
            os.setgroups(list(groups))
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            try:
                fd = _walk_before(path)
            except _Refused as exc:
                child.sendall(json.dumps({"reason": str(exc)}).encode())
            else:
                socket.send_fds(child, [b"{}"], [fd])
        except BaseException:  # noqa: BLE001 - the forked child's any failure is its exit 1
            code = 1
        finally:
            os._exit(code)
    child.close()
    try:
        msg, fds, _flags, _addr = socket.recv_fds(parent, 65536, 1)
    finally:
        parent.close()
        os.waitpid(pid, 0)
    if fds:
        return fds[0]
    raise ShareRefused(value=path, reason=msg.decode() or f"it could not be opened as uid {uid}")


class _Refused(Exception):
    pass


def _walk_before(path: str) -> int:
    fd = os.open("/", _DIR_PATH)
    done = ""
    for part in [p for p in path.split("/") if p]:
        here = f"{done}/{part}"
        try:
            nfd = os.open(part, _DIR_PATH, dir_fd=fd)
        except OSError as exc:
            raise _Refused(f"{here}: {exc.strerror}") from None
        os.close(fd)
        fd, done = nfd, here
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            raise _Refused(f"{here} is a symbolic link (share the real path)")
    try:
        rd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
    except OSError as exc:
        raise _Refused(f"the job's user cannot read {done or '/'} ({exc.strerror})") from None
    finally:
        os.close(fd)
    return rd


def pin_before(path: str, uid: int, gid: int, groups: Sequence[int]) -> ShareSpec:
    fd = open_as_user_before(path, uid, gid, groups)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return ShareSpec(path=path, uid=uid, gid=gid, groups=tuple(sorted(set(groups))),
                     dev=st.st_dev, ino=st.st_ino)


# -- the run ---------------------------------------------------------------------------------------
def figures(samples: list[float]) -> tuple[float, float, float]:
    ms = sorted(s * 1000 for s in samples)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    return statistics.median(ms), p95, ms[-1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--uid", type=int, default=65534)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root (the pin becomes another user)", file=sys.stderr)
        return 2
    uid = gid = args.uid
    base = Path(tempfile.mkdtemp(prefix="dgxvm-asuser-bench-", dir="/tmp"))
    held = []
    try:
        base.chmod(0o755)
        work = base / "home" / "user" / "run"
        work.mkdir(parents=True)
        os.chown(work, uid, gid)
        work.chmod(0o700)
        # what a Prolog holds open: a few files and sockets (the ledger, libvirt)
        held = [open(base / f"held-{i}", "w") for i in range(4)] + \
            [socket.socket(socket.AF_UNIX) for _ in range(2)]
        runs = {"before": pin_before, "after": policy.pin}
        times: dict[str, list[float]] = {k: [] for k in runs}
        for name, fn in runs.items():                            # warm up both
            assert fn(str(work), uid, gid, [gid]).ino == work.stat().st_ino, name
        for _ in range(args.calls):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn(str(work), uid, gid, [gid])
                times[name].append(time.perf_counter() - t0)
        print(f"policy.pin() of a directory as uid {uid}, {args.calls} calls each, "
              f"alternating (python {sys.version.split()[0]}, {os.cpu_count()} CPUs)")
        print(f"{'':8}{'p50 ms':>10}{'p95 ms':>10}{'max ms':>10}")
        for name in runs:
            p50, p95, top = figures(times[name])
            print(f"{name:8}{p50:10.2f}{p95:10.2f}{top:10.2f}")
        b50, b95, _ = figures(times["before"])
        a50, a95, _ = figures(times["after"])
        print(f"{'after/before':14}{a50 / b50:6.2f}x p50{a95 / b95:8.2f}x p95")
    finally:
        for h in held:
            h.close()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
