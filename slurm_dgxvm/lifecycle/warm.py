"""Warm VMs: a VM booted ahead of the job that will use it, claimed by that job's Prolog.

A warm VM is made by :func:`boot` like an admin's VM (``owner = "domain"``, ledger key
``domain:warm-N``), with the sizes a job of its partition gets and no tenant: the seed's account
is root, with a key nobody holds; no share; guest memory shared, so that shares can be plugged
into it later. Its name starts with :data:`PREFIX`.

:func:`claim` gives a job a warm VM on exactly the block the job's placement chooses:

1. the job's placement is made as if no warm VM held anything; a warm VM on exactly those
   devices (same sizes, image and data disk) is the candidate; every other warm VM on any of
   those devices is in the way and is deleted (never waited for), and the job goes cold;
2. the shares are checked as the job's user, as at a cold start (a refusal is the job's and
   leaves the warm VM warm);
3. **the commit**: one ledger transaction replaces ``domain:warm-N`` by ``job:N`` (same
   devices, owner job, the job's user). A second claim of the same VM finds no
   ``domain:warm-N`` and goes cold. From here a failure deletes the VM (used once) and the
   job goes cold;
4. the job's user key and known_hosts, the shares plugged live (:mod:`slurm_dgxvm.shares.
   hotplug`, served as the job's user), and the identity applied inside the guest by
   ``dgxvm-claim`` run as root through the QEMU guest agent.

Why the identity cannot be faked: the guest agent is a virtio-serial port only the host
reaches, and no tenant code has ever run in a warm VM (it boots from a fresh overlay of the
image, nobody can log in to it, the VM network lets no other VM reach it, and the Epilog
destroys every job's VM): what answers is the image's own qemu-ga and init.
"""

from __future__ import annotations

import base64
import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

from .. import failpoints, seed as seed_mod
from ..config import WARM_GPUS_MAX, WARM_RECENT_MAX
from ..errors import BootCancelled, ClaimFailed, DgxvmError, DomainNotFound, LockTimeout, is_job_fault
from ..fsutil import atomic_write, atomic_write_json
from ..ledger import Allocation, domain_key, job_key
from ..names import WARM_PREFIX, is_warm
from ..observe import opstats
from ..placement import Occupancy, Request, place
from ..records import HOST_KEY, OS_DISK, WARM_CANCEL, VmRecord
from . import vmlock
from .env import Env, Progress, quiet
from .identity import group_names, hostname_for

log = logging.getLogger("dgxvm.warm")

PREFIX = WARM_PREFIX
SEED_READERS = Path(__file__).resolve().parents[1] / "seedfiles" / "seed.sh"
CLAIM_SCRIPT = Path(__file__).resolve().parents[1] / "seedfiles" / "dgxvm-claim.sh"
CLAIM_TIMEOUT_S = 60.0
@dataclass(frozen=True)
class Outcome:
    """What a claim did: ``vm`` the claimed VM's record (None: the job goes cold), ``why`` one
    line when it went cold, ``destroyed`` the warm VMs deleted because they were in the way."""

    vm: VmRecord | None
    why: str = ""
    destroyed: tuple[str, ...] = ()
    seconds: float = 0.0


def _oldest_first(warm: dict[str, Allocation]) -> list[tuple[str, Allocation]]:
    """``warm``'s (name, entry) pairs, the longest waiting first (then by name)."""
    return sorted(warm.items(), key=lambda kv: (kv[1].created, kv[0]))


def waiting(env: Env) -> dict[str, Allocation]:
    """The warm VMs no job has claimed: name -> ledger entry."""
    return {a.domain: a for key, a in env.ledger.read().allocations.items()
            if a.owner == "domain" and is_warm(a.domain) and key == domain_key(a.domain)}


def next_name(env: Env) -> str:
    taken = set(env.vms.names()) | set(waiting(env))
    i = 1
    while f"{PREFIX}{i}" in taken:
        i += 1
    return f"{PREFIX}{i}"


def boot(env: Env, request: Request, *, image: str | None = None,
         data_disk_gib: int | None = None, name: str | None = None,
         progress: Progress = quiet, partition: str | None = None) -> VmRecord:
    """Boot a warm VM for ``request`` (the sizes of ``partition``'s jobs); its record."""
    from .create import CreateRequest, create
    name = name or next_name(env)
    req = CreateRequest(name=name, placement=request, data_disk_gib=data_disk_gib, image=image,
                        owner="domain", user="root", uid=0, gid=0, home="/root",
                        warm=partition or "")
    # the record says "warm": "booting" from its first write, "waiting" once create is done
    # (lifecycle.create); root's key is nobody's: create removes it, nobody logs in
    return create(env, req, progress)


def boot_for(env: Env, partition: str, gpus: int, *, gpu_index: int | None = None,
             progress: Progress = quiet) -> VmRecord:
    """Boot a warm VM for ``partition``'s jobs of ``gpus`` GPUs: the partition's sizes, image
    and data disk, exactly what a cold start of such a job makes (slurm.job.create_request)."""
    part = env.cfg.partition(partition)
    return boot(env, Request(count=gpus, gpu_index=gpu_index, **part.sizes(gpus)),
                image=part.image or None, data_disk_gib=part.data_disk, progress=progress,
                partition=partition)


def place_for_claim(host, taken: Occupancy, request: Request, policy,
                    warm: dict[str, Allocation]):
    """The job's placement (``taken``: what jobs hold, none of the warm VMs'), in this order:

    1. on the block of a warm VM of its size that no job holds any of: as good a place for the
       job as any (the refill placed the warm VM by the same rules), and there the job is
       spared its boot;
    2. where :func:`~slurm_dgxvm.placement.place` puts it with the warm VMs' devices counted as
       taken, on an aligned block only: a job that fits beside them leaves them warm for the
       jobs they suit (never at the cost of its alignment);
    3. where ``place`` puts it as if no warm VM held anything: the warm VMs there are in its
       way (a job never waits for one).

    Slurm's GPU indices are only its count here, as at a cold start whose Slurm choice is not an
    aligned free block."""
    if request.gpu_index is None:
        for _name, a in _oldest_first(warm):
            if len(a.gpus) != request.count:
                continue
            try:
                p = place(host, taken, replace(request, gpu_index=min(a.gpus)), policy)
            except DgxvmError:
                continue
            if tuple(p.gpus) == tuple(sorted(a.gpus)):
                return p
    if warm:
        beside = Occupancy.union([taken, *(a.occupancy() for a in warm.values())])
        try:
            return place(host, beside, request, replace(policy, alignment="strict"))
        except DgxvmError:
            pass
    return place(host, taken, request, policy)


def _same_vm(rec: VmRecord, p, image: str, data_disk_gib: int | None) -> bool:
    """Whether the warm VM ``rec`` is what a cold start of placement ``p`` would make."""
    wp = rec.placement
    return (tuple(wp.gpus) == tuple(p.gpus) and tuple(wp.nvswitches) == tuple(p.nvswitches)
            and wp.vcpus == p.vcpus and wp.memory_mib == p.memory_mib
            and wp.disk_gib == p.disk_gib and wp.ib_mode == p.ib_mode == "none"
            and wp.fm_partition == p.fm_partition
            and rec.image == image and rec.extra.get("data_disk_gib") == data_disk_gib)


def claim(env: Env, req, progress: Progress = quiet) -> Outcome:
    """Give the job of ``req`` (a CreateRequest of a job) a warm VM, or say why not (the job
    then starts cold). Raises only the job's own refusals (a share refused), which a cold
    start would raise too."""
    t0 = time.monotonic()
    warm = waiting(env)
    if not warm:
        return Outcome(None, "no warm VM on this node")
    out = _claim_one(env, req, warm, progress, t0)
    state_dir = env.cfg.host.state_dir
    if out.vm is not None:
        opstats.count(state_dir, "warm", "hit", stage="claim", seconds=out.seconds)
    else:
        opstats.count(state_dir, "warm", "miss")
    if out.destroyed:
        opstats.count(state_dir, "warm", "destroyed", len(out.destroyed))
    return out


def _claim_one(env: Env, req, warm: dict[str, Allocation], progress: Progress,
               t0: float) -> Outcome:
    policy = env.policy
    if req.alignment and req.alignment != policy.alignment:
        policy = replace(policy, alignment=req.alignment)
    state = env.ledger.read()
    taken = Occupancy.union([a.occupancy() for a in state.allocations.values()
                             if a.domain not in warm])
    quarantined = env.health.quarantined()
    if quarantined:
        from .create import quarantine_occupancy
        taken = Occupancy.union([taken, quarantine_occupancy(env.host, quarantined)])
    try:
        p = place_for_claim(env.host, taken, req.placement, policy, warm)
    except DgxvmError as exc:
        return Outcome(None, f"no placement: {exc}")
    wanted = set(p.gpu_pcis) | set(p.nvswitches)
    in_way = [n for n, a in warm.items() if wanted & (set(a.gpu_pcis) | set(a.nvswitches))]
    image = env.images.get(req.image)
    data_gib = req.data_disk_gib if req.data_disk_gib is not None else env.cfg.vm.data_disk_gib
    match = None
    # a multi-node job's fabric NIC and an InfiniBand job's functions are cold-plugged: such a
    # job starts cold, and a warm VM in its way goes
    cold_only = req.fabric is not None or req.placement.ib != "none"
    for n in in_way if not cold_only else ():
        rec = env.vms.load(n)
        # a warm VM still booting (or being deleted) is in the way like any other: deleting
        # it waits for its boot to end (its lock), never for a job
        if rec is not None and rec.state == "running" and rec.extra.get("warm") == "waiting" \
                and _same_vm(rec, p, image.name, data_gib) \
                and rec.image_version == image.version:
            match = n
    destroyed = tuple(n for n in in_way if n != match)
    for n in destroyed:                 # one still booting stops now, not when its boot ends
        cancel_boot(env, n)
    for n in destroyed:
        progress(f"deleting warm VM {n}: it holds devices this job needs")
        _delete_quietly(env, n, None)
    if match is None:
        why = ("a multi-node or InfiniBand job starts cold" if cold_only
               else "no warm VM of this job's block")
        why += f"; deleted {', '.join(destroyed)}, in the way" if destroyed else ""
        return Outcome(None, why, destroyed, time.monotonic() - t0)
    try:
        rec = _claim(env, req, match, progress, t0)
    except Exception as exc:  # noqa: BLE001 - any failure of a claim is a cold start
        if is_job_fault(exc):          # a share refused: a cold start refuses it too
            raise
        if not isinstance(exc, DgxvmError):
            log.exception("%s: claim by job %s failed", match, req.job_id)
        # not claimed before the commit (its lock busy): still warm, still in the way
        if domain_key(match) in env.ledger.read().allocations:
            _delete_quietly(env, match, None)
            destroyed += (match,)
        return Outcome(None, f"claim of {match} failed: {exc}", destroyed,
                       time.monotonic() - t0)
    return Outcome(rec, "", destroyed, time.monotonic() - t0)


def cancel_boot(env: Env, name: str) -> None:
    """Ask the boot of warm VM ``name``, if it is still booting, to stop: its create sees the
    mark while it waits for the guest and undoes itself (BootCancelled), so a job that needs
    its devices waits for that undo, not for the boot. The mark goes with the VM's directory."""
    rec = env.vms.load(name)
    if rec is not None and rec.state != "creating":
        return
    vmdir = env.vms.dir(name)
    try:
        if vmdir.is_dir():
            (vmdir / WARM_CANCEL).touch(mode=0o600)
    except OSError:
        pass                               # then the delete waits for the boot's end


def _delete_quietly(env: Env, name: str, job_id: int | None) -> None:
    """Delete a warm VM, destroyed outright: no tenant code has run in it, so nothing in it is
    to be flushed, and a job waits for the delete. With ``job_id`` None only while no job has
    claimed it (a Prolog may claim it until the delete holds its lock); with the claiming
    job's id, the half-claimed VM of that job."""
    from .delete import delete
    try:
        delete(env, name, job_id=job_id, graceful=False, unclaimed_only=job_id is None)
    except DomainNotFound:
        pass


def _claim(env: Env, req, name: str, progress: Progress, t0: float) -> VmRecord:
    from .create import check_image_cache, check_share
    with ExitStack() as held:
        try:
            held.enter_context(vmlock.held(env.cfg.host.state_dir, name, timeout=1.0))
        except LockTimeout:
            raise ClaimFailed(name=name, reason=f"{name} is being changed by another "
                                                f"dgxvm") from None
        share, share_refused = check_share(env.cfg, req)
        cache, cache_refused = check_image_cache(env.cfg, req, share)
        if not _commit(env, req, name):
            raise ClaimFailed(name=name, reason=f"{name} was claimed by another job")
        try:
            return _make_it_the_jobs(env, req, name, share, share_refused, cache,
                                     cache_refused, progress, t0)
        except BaseException:
            held.close()                  # the delete takes the name's lock itself
            _delete_quietly(env, name, req.job_id)
            raise


def _commit(env: Env, req, name: str) -> bool:
    """``domain:NAME`` becomes ``job:N`` in one ledger transaction; False when it is gone."""
    with env.ledger.transaction() as txn:
        held = txn.allocations.get(domain_key(name))
        if held is None or job_key(req.job_id) in txn.allocations:
            return False
        txn.release(held.key)
        txn.allocate(replace(held, key=job_key(req.job_id), owner="job", job_id=req.job_id,
                             user=req.user, slurm_gpus=req.placement.slurm_gpus,
                             created=time.time()))
    return True


def claim_script() -> str:
    """What the guest runs to take a job's identity: the seed readers, then dgxvm-claim."""
    return SEED_READERS.read_text() + "\n" + CLAIM_SCRIPT.read_text()


def _make_it_the_jobs(env: Env, req, name: str, share, share_refused, cache, cache_refused,
                      progress: Progress, t0: float) -> VmRecord:
    from ..virt import hypervisor
    from ..shares import hotplug
    from .create import share_files, user_files
    cfg = env.cfg
    vmdir = env.vms.dir(name)
    state_dir = cfg.host.state_dir
    # the record says whose it is at once: an undo from here on (a delete) releases job:N
    rec = env.vms.load(name)
    rec = rec.with_(owner="job", ledger_key=job_key(req.job_id), job_id=req.job_id,
                    user=req.user, uid=req.uid, gid=req.gid,
                    extra={**rec.extra, "warm": "claiming"})
    env.vms.save(rec)
    failpoints.hit(state_dir, "claim:committed", name)
    progress("claiming warm VM " + name)
    host_pub = (vmdir / (HOST_KEY + ".pub")).read_text().strip()
    user_pub = user_files(vmdir, req, name, rec.address, host_pub)
    dom = env.connect().lookupByName(name)
    what = f"claim of {name} by job {req.job_id}"
    served = share_files(cfg, vmdir, share, cache)
    for s in served:
        hotplug.plug(dom, qemu_owner=vmdir / OS_DISK, spec_path=s.spec, wrapper=s.wrapper,
                     source=s.mount.path, tag=s.mount.tag, what=what)
    mounts = tuple(s.mount for s in served)
    failpoints.hit(state_dir, "claim:plugged", name)
    home = req.home or f"/home/{req.user}"
    spec = seed_mod.SeedSpec(
        instance_id=f"{name}-{int(time.time())}", hostname=hostname_for(name),
        user_name=req.user, uid=req.uid, gid=req.gid, home=home, authorized_keys=(user_pub,),
        host_key_private=(vmdir / HOST_KEY).read_text(), host_key_public=host_pub,
        mounts=mounts, groups=group_names(req.groups))
    files = seed_mod.claim_files(spec)
    payload = "".join(f"{n} {oct(mode)[2:]} {base64.b64encode(text.encode()).decode()}\n"
                      for n, (text, mode) in files.items()).encode()
    code, out = hypervisor.agent_exec(dom, ["/bin/sh", "-c", claim_script(), "dgxvm-claim"],
                                      stdin=payload,
                                      timeout_s=CLAIM_TIMEOUT_S, what=what)
    if code != 0 or "claimed" not in out.split():
        raise ClaimFailed(name=name, reason=f"the guest did not take the job's identity (exit {code}): "
                    f"{' | '.join(out.strip().splitlines()[-3:])}")
    failpoints.hit(state_dir, "claim:applied", name)
    rec = rec.with_(workdir=share.path if share else None,
                    image_cache=cache.path if cache else None, groups=tuple(req.groups),
                    allocation=env.ledger.read().allocations[job_key(req.job_id)],
                    extra={**{k: v for k, v in rec.extra.items() if k != "warm"},
                           "warm": "claimed", "claimed": time.time(),
                           "claim_s": round(time.monotonic() - t0, 3),
                           **({"share_refused": share_refused} if share_refused else {}),
                           **({"image_cache_refused": cache_refused}
                              if cache_refused else {})})
    env.vms.save(rec)
    log.info("%s: claimed by job %s (user %s)", name, req.job_id, req.user)
    return rec


# -- refill ----------------------------------------------------------------------------------------
STOPPED = "warm.stopped"            # <state_dir>/warm.stopped: the admin stopped refills
REFILL_LOCK = "warm.lock"           # one refill at a time on a node
REFILL_LOG = "warm-refill.log"      # what a refill the Epilog started did
COMPLETING_WAIT_S = 120.0           # how long a refill waits for its job's Epilog to end
REFILL_LOG_MAX = 1 << 20            # past this the log becomes warm-refill.log.1 (one kept)


def rotate_log(state_dir: Path) -> None:
    """Keep the refill log bounded (every job of a warm partition appends to it): once it
    reaches :data:`REFILL_LOG_MAX` it becomes ``warm-refill.log.1``, replacing the one before."""
    import os
    log = state_dir / REFILL_LOG
    try:
        if log.stat().st_size >= REFILL_LOG_MAX:
            os.replace(log, log.with_name(REFILL_LOG + ".1"))
    except FileNotFoundError:
        pass


def stopped(env: Env) -> bool:
    return (Path(env.cfg.host.state_dir) / STOPPED).exists()


def stop(env: Env, progress: Progress = quiet) -> list[str]:
    """No refill from now on (``dgxvm warm stop``), and the warm VMs waiting deleted (their
    devices back to the jobs); returns their names. A refill in progress sees the mark before
    its next boot."""
    state_dir = Path(env.cfg.host.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(state_dir / STOPPED, f"stopped at {time.strftime('%Y-%m-%dT%H:%M:%S')}\n",
                 mode=0o644)
    gone = []
    for name in sorted(waiting(env)):
        progress(f"deleting {name}")
        _delete_quietly(env, name, None)
        gone.append(name)
    return gone


def start(env: Env) -> None:
    """Refills allowed again (``dgxvm warm start``)."""
    (Path(env.cfg.host.state_dir) / STOPPED).unlink(missing_ok=True)


RECENT = "warm-recent.json"         # <state_dir>/warm-recent.json: the last jobs' GPU counts
RECENT_LOCK = "warm-recent.lock"


def _read_recent(path: Path) -> dict[str, list[int]]:
    """The recorded counts by partition; what is not a table of lists of counts is dropped (the
    file is a hint: a bad one costs a policy that follows fewer jobs, nothing else)."""
    import json
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict):
        return {}
    return {k: [n for n in v if type(n) is int and 1 <= n <= WARM_GPUS_MAX][:WARM_RECENT_MAX]
            for k, v in doc.items() if isinstance(k, str) and isinstance(v, list)}


def remember(env: Env, partition: str, gpus: int) -> None:
    """Record that a job of ``partition`` with ``gpus`` GPUs ended on this node (its Epilog),
    newest first, the last :data:`WARM_RECENT_MAX` kept: what ``warm_recent`` follows. Only
    for a partition that follows its jobs, so the file holds nothing else."""
    from ..fsutil import locked
    if not env.cfg.partition(partition).warm_recent or not 1 <= gpus <= WARM_GPUS_MAX:
        return
    state_dir = Path(env.cfg.host.state_dir)
    with locked(state_dir / RECENT_LOCK, timeout=10, mode=0o600,
                timed_out=lambda: LockTimeout(path=str(state_dir / RECENT_LOCK), timeout=10),
                failed=lambda e: e):
        doc = _read_recent(state_dir / RECENT)
        doc[partition] = ([gpus] + doc.get(partition, []))[:WARM_RECENT_MAX]
        doc = {k: v for k, v in doc.items() if env.cfg.partition(k).warm_recent}
        atomic_write_json(state_dir / RECENT, doc, mode=0o600)


def recent(env: Env, partition: str) -> list[int]:
    """The GPU counts of ``partition``'s last ``warm_recent`` jobs on this node, each once,
    the newest job's first."""
    n = env.cfg.partition(partition).warm_recent
    if not n:
        return []
    last = _read_recent(Path(env.cfg.host.state_dir) / RECENT).get(partition, [])[:n]
    return list(dict.fromkeys(last))


def policy(env: Env, partition: str) -> list[int]:
    """The GPU counts of the warm VMs ``partition`` keeps on this node: its ``warm`` list, then
    each count of its recent jobs that list does not have, newest first. A refill boots them
    in this order while they fit."""
    fixed = list(env.cfg.partition(partition).warm)
    return fixed + [n for n in recent(env, partition) if n not in fixed]


def _theirs(env: Env, partition: str) -> list[tuple[str, int]]:
    """(name, GPU count) of the warm VMs waiting or booting for ``partition``, oldest first."""
    out = []
    for name, _ in _oldest_first(waiting(env)):
        rec = env.vms.load(name)
        if rec is not None and rec.extra.get("partition") == partition:
            out.append((name, len(rec.placement.gpus)))
    return out


def surplus(env: Env, partition: str) -> list[str]:
    """The warm VMs of ``partition`` its policy no longer keeps (a count of its recent jobs
    that fell out of the last N, or an admin's extra boot): the newest beyond each count's
    number. A refill deletes them so their devices go to what the policy wants."""
    keep = policy(env, partition)
    out = []
    for name, n in _theirs(env, partition):
        if n in keep:
            keep.remove(n)
        else:
            out.append(name)
    return out


def wanted(env: Env, partition: str) -> list[int]:
    """The GPU counts of the warm VMs ``partition``'s policy keeps that are not there (waiting
    or being booted for it)."""
    want = policy(env, partition)
    for _, n in _theirs(env, partition):
        if n in want:
            want.remove(n)
    return want


def refill(env: Env, partition: str, node_state, progress: Progress = quiet) -> tuple[list[str],
                                                                                    str]:
    """Boot the warm VMs ``partition``'s policy lacks on this node, one at a time; returns
    (the names booted, why it stopped: "" when the policy is met). ``node_state()`` says the
    node's Slurm state (``scontrol``'s State), or raises: a refill boots only on a node in
    service (not draining, drained, down or failing), after its last job's Epilog ended (it
    waits while the node is COMPLETING), and never while the admin stopped refills or another
    refill runs."""
    from ..errors import NoFit
    from ..fsutil import locked
    state_dir = Path(env.cfg.host.state_dir)
    booted: list[str] = []
    try:
        with locked(state_dir / REFILL_LOCK, timeout=0,
                    timed_out=lambda: LockTimeout(path=str(state_dir / REFILL_LOCK), timeout=0),
                    failed=lambda e: e):
            deadline = time.monotonic() + COMPLETING_WAIT_S
            while True:
                if stopped(env):
                    return booted, "stopped by the admin (dgxvm warm start resumes)"
                try:
                    state = node_state().upper()
                except DgxvmError as exc:
                    return booted, f"the node's state is unknown ({exc})"
                if any(s in state for s in ("DRAIN", "DOWN", "FAIL", "MAINT", "REBOOT")):
                    return booted, f"the node is not in service (State={state})"
                if "COMPLETING" in state and time.monotonic() < deadline:
                    time.sleep(0.5)
                    continue
                for name in surplus(env, partition):
                    progress(f"deleting {name}: partition {partition}'s policy no longer "
                             f"keeps it")
                    _delete_quietly(env, name, None)
                want = wanted(env, partition)
                if not want:
                    return booted, ""
                rec, why = None, ""
                for n in dict.fromkeys(want):          # the policy's order; a size that does
                    try:                               # not fit now leaves room for the next
                        rec = boot_for(env, partition, n, progress=progress)
                        break
                    except NoFit as exc:
                        why = why or f"no free block of {n} GPU(s): {exc}"
                    except BootCancelled as exc:
                        return booted, str(exc)
                if rec is None:
                    return booted, why
                booted.append(rec.name)
    except LockTimeout:
        return booted, "another refill is running"
