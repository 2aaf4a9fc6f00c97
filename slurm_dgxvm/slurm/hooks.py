"""``dgxvm prolog`` and ``dgxvm epilog``: a job's VM, from Slurm's allocation to its end.

Prolog (slurmd runs it as root when the job is allocated, PrologFlags=Alloc): read the job from
the environment and check every value it controls (:mod:`.jobinput`; its user against the
host's passwd), make the VM request (partition defaults, the job comment's image) -- nothing
is touched before this --, clear anything an earlier run of the same job id left, create the VM
through the lifecycle (place in the ledger, carve, boot, wait for the guest), then write the VM
record into the job's AdminComment. No Slurm command runs before the VM is ready.

Epilog: delete the job's VM whatever state it is in (none, half made, crashed, only a ledger
entry, the job's ledger entry under another VM name); idempotent. Then write the final record
(teardown time, how it ended) with sacctmgr. An inconsistency it met is one line naming it; the
Epilog cleans only its own job's pieces and never runs a node-wide ``dgxvm reconcile``, which
asks Slurm and libvirt about every VM and would hold the job in COMPLETING
(docs/admin/operations.md, "From the Epilog").

Exit status, on purpose (Slurm drains the node for any non-zero Prolog or Epilog status):

* 0 -- the VM is ready; or the job got no VM because of the job itself: a value it controls
  that is refused (JobInputError: its work dir, user, uid/gid, GPU list, partition, comment;
  a root job; a work dir the share policy refuses), a comment that does not parse, an image
  that is not installed or not offered, a GPU count that is never a block (the job is
  cancelled), or no aligned block free under ``alignment = "strict"`` (the job is requeued and
  waits). The node stays in service.
* 1 -- the node is at fault (libvirt down, the partition's default image missing, disk full,
  Fabric Manager, a guest that never boots, the ledger, a teardown that left something held):
  Slurm drains the node ("Prolog error" / "Epilog error") and requeues the job held.

Every outcome is one line on stderr, which slurmd writes into its log, naming the job, the
stage and the cause.
"""

from __future__ import annotations

import os
from pathlib import Path
from collections.abc import Callable, Mapping

from .. import lifecycle
from ..observe import opstats
from ..containers import ranlog
from ..errors import BadName, DgxvmError, DomainNotFound, NoFit, SlurmCommandError
from ..fsutil import atomic_write
from ..ranges import format_index_list
from ..observe.stages import StageTimer
from .accounting import converge, encode, failure_fields, vm_fields
from .commands import Slurm
from . import jobinput
from .job import SlurmJob, create_request, domain_for, is_job_fault, job_nodes, sourced
from ..lifecycle.identity import vm_of_job

Emit = Callable[[str], None]

EXIT_OK = 0
EXIT_DRAIN = 1


class _Stage:
    """The stage a hook is at, for the one line that says where it failed."""

    def __init__(self, first: str):
        self.now = first

    def __call__(self, stage: str) -> None:
        self.now = stage


def _one_line(env: lifecycle.Env, name: str, exc: BaseException) -> str:
    """The cause on one line; a longer message (a console tail) is kept in a file it names."""
    text = str(exc) if isinstance(exc, DgxvmError) else f"internal error: {type(exc).__name__}: {exc}"
    first, _, rest = text.partition("\n")
    if not rest.strip():
        return first
    path = Path(env.cfg.host.state_dir) / "failures" / f"{name}.txt"
    try:                               # root's only: a console tail may show the job's secrets
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path.parent, 0o700)
        atomic_write(path, text + "\n", mode=0o600)
        return f"{first} (full text: {path})"
    except OSError:
        return first + " | " + rest.strip().replace("\n", " | ")[-300:]


def _account(emit: Emit, where: str, write: Callable[[], None]) -> bool:
    """Write accounting; a failure is one logged line, never the job's failure."""
    try:
        write()
        return True
    except SlurmCommandError as exc:
        emit(f"{where}: accounting not written (the job is not affected): {exc}")
        return False


def _record_writer(slurm: Slurm, environ: Mapping[str, str], job_id: int, *,
                   after_end: bool = False) -> Callable[[dict], None]:
    """How this node writes its record into the job's AdminComment: the whole value for a job
    on one node (as ever); for a job on several nodes, this node's record merged into the
    others' and read back until it stays (accounting.converge), ``node=`` naming it."""
    set_ = slurm.set_admin_comment_after_end if after_end else slurm.set_admin_comment
    node = environ.get("SLURMD_NODENAME") or ""
    if node and len(job_nodes(jobinput.raw_nodelist(environ))) > 1:
        read = ((lambda: slurm.admin_comment_after_end(job_id)) if after_end
                else (lambda: slurm.admin_comment(job_id)))
        return lambda fields: converge(read, lambda text: set_(job_id, text), node, fields)
    return lambda fields: set_(job_id, encode(fields))


def _describe(environ: Mapping[str, str], job_id: int) -> str:
    """The job as a log line names it, even when some of its values do not pass."""
    try:
        return SlurmJob.from_environ(environ).describe()
    except DgxvmError:
        return f"job {job_id}"


# -- Prolog ----------------------------------------------------------------------------------------
def prolog(env: lifecycle.Env, environ: Mapping[str, str], slurm: Slurm, emit: Emit) -> int:
    stage = _Stage("reading the job's environment")
    job_id: int | None = None
    job: SlurmJob | None = None
    timer = StageTimer()               # the create's stages, kept when it fails
    in_lifecycle = False               # from there on, the lifecycle counts its own failures
    try:
        job_id = jobinput.job_id(environ)         # NotAJob: no job to refuse, the node's fault
        if not (environ.get("SLURM_JOB_GPUS") or "").strip():
            # not dgxvm's job: its other values are not checked (nothing of them is used)
            emit(f"dgxvm prolog: {_describe(environ, job_id)}: no GPUs asked for, no VM")
            return EXIT_OK
        job = SlurmJob.from_environ(environ)      # JobInputError: refuse the job
        where = f"dgxvm prolog: {job.describe()}"
        stage("checking the job's user and groups on this host")
        job = job.on_this_host()
        stage("reading the request (partition, job comment, image)")
        req = create_request(env.cfg, job, env.images)
        # every value of the job is checked: only now are libvirt and the ledger touched
        stage("clearing what an earlier run of this job left")
        in_lifecycle = True
        for left in dict.fromkeys((vm_of_job(env, job.job_id), req.name)):
            try:
                lifecycle.delete(env, left, job_id=job.job_id)
                emit(f"{where}: removed {left} left by an earlier run of this job")
            except DomainNotFound:
                pass
        rec = _warm_vm(env, req, stage, emit, where)
        if rec is None:
            rec = lifecycle.create(env, req, stage, timer)
    except BaseException as exc:  # noqa: BLE001 - every failure is one line and an exit status
        # counted here: the node's faults before the lifecycle (a partition's image missing),
        # and a domain of the job's name that delete refused as not dgxvm's. A job refused for
        # its own values writes nothing on the node (its AdminComment says why)
        if not is_job_fault(exc) and (not in_lifecycle or isinstance(exc, DomainNotFound)):
            opstats.count_failure(env.cfg.host.state_dir, "prolog", exc)
        return _prolog_failed(env, job_id, job, stage.now, exc, slurm, emit, timer.seconds(),
                              environ)
    p = rec.placement
    if rec.extra.get("warm") == "claimed":
        what = (f"warm VM {rec.name} claimed in {rec.extra.get('claim_s', 0):.1f}s on GPUs "
                f"{format_index_list(p.gpus)}, {rec.address}")
    else:
        how = "Slurm's block" if not p.remapped else \
            f"remapped from Slurm's {format_index_list(job.gpus)}"
        if not p.aligned:
            how += ", NOT aligned (alignment = prefer)"
        what = (f"VM {rec.name} ready in {rec.boot_s:.1f}s on GPUs {format_index_list(p.gpus)} "
                f"({how}), NUMA {format_index_list(p.numa_nodes)}, {rec.address}")
    emit(f"{where}: {what}"
         + (f"; work dir NOT shared: {rec.extra['share_refused']}"
            if rec.extra.get("share_refused") else "")
         + (f"; image cache NOT shared: {rec.extra['image_cache_refused']}"
            if rec.extra.get("image_cache_refused") else ""))
    if env.cfg.slurm.accounting:
        write = _record_writer(slurm, environ, job.job_id)
        _account(emit, where, lambda: write(vm_fields(rec, state="running")))
    return EXIT_OK


def _warm_vm(env: lifecycle.Env, req, stage: _Stage, emit: Emit, where: str):
    """The warm VM of the job's block, claimed (lifecycle.warm), or None: the job starts cold.
    Why not, and any warm VM deleted because it held the job's devices, is one line each."""
    from ..lifecycle import warm
    if not warm.waiting(env):
        return None
    stage("claiming a warm VM")
    out = warm.claim(env, req, stage)
    for name in out.destroyed:
        emit(f"{where}: warm VM {name} deleted: it held devices of this job's block")
    if out.vm is None:
        emit(f"{where}: no warm VM claimed in {out.seconds:.2f}s ({out.why}); starting cold")
        return None
    return out.vm


def _prolog_failed(env: lifecycle.Env, job_id: int | None, job: SlurmJob | None, stage: str,
                   exc: BaseException, slurm: Slurm, emit: Emit,
                   create_stages: dict[str, float], environ: Mapping[str, str]) -> int:
    if job_id is None or (job is None and not is_job_fault(exc)):
        emit(f"dgxvm prolog: job {job_id if job_id is not None else '?'}: failed at {stage}: "
             f"{exc}; exit 1 drains the node")
        return EXIT_DRAIN
    where = f"dgxvm prolog: {job.describe() if job else f'job {job_id}'}"
    name = vm_of_job(env, job_id)
    exc = sourced(env.cfg, job, exc)       # a size placement refused: the partition key
    cause = _one_line(env, name, exc)
    gpus = job.gpus if job else ()
    if is_job_fault(exc):
        state = "refused"
        if isinstance(exc, NoFit):
            action, act = "requeued to wait for an aligned block", slurm.requeue
        else:
            action, act = "cancelled", slurm.cancel
        emit(f"{where}: refused at {stage}: {cause}; job {action}, node stays in service")
        fields = failure_fields(domain=name, state=state, stage=stage, cause=cause,
                                slurm_gpus=gpus, create_stages=create_stages)
        if env.cfg.slurm.accounting:
            write = _record_writer(slurm, environ, job_id)
            _account(emit, where, lambda: write(fields))
        try:
            act(job_id)
        except SlurmCommandError as err:
            if act == slurm.cancel:
                emit(f"{where}: could not cancel the job ({err}); exit 1 drains the node")
                return EXIT_DRAIN
            try:                          # a job that may not be requeued is cancelled
                slurm.cancel(job_id)
            except SlurmCommandError as err2:
                emit(f"{where}: could not requeue ({err}) nor cancel ({err2}) the job; "
                     f"exit 1 drains the node")
                return EXIT_DRAIN
        return EXIT_OK
    emit(f"{where}: failed at {stage}: {cause}; exit 1 drains the node, the job is requeued")
    if env.cfg.slurm.accounting:
        fields = failure_fields(domain=name, state="failed", stage=stage, cause=cause,
                                slurm_gpus=gpus, create_stages=create_stages)
        write = _record_writer(slurm, environ, job_id)
        _account(emit, where, lambda: write(fields))
    return EXIT_DRAIN


# -- Epilog ----------------------------------------------------------------------------------------
def _left_under_the_jobs_name(env: lifecycle.Env, job_id: int, name: str, stage: _Stage,
                              emit: Emit, where: str) -> bool:
    """After the job's VM (``name``, the one its ledger entry named) is gone: pieces under the
    name a VM made for the job gets, when that is another (a Prolog killed before its ledger
    entry, with the domain prefix changed since). Remove them too, through delete, and say so
    in one line. True when there were some.

    Only this job's pieces: a node-wide ``dgxvm reconcile`` is not run from here, as it asks
    Slurm and libvirt about every VM and would hold up the job's completion
    (docs/admin/operations.md, "From the Epilog")."""
    other = domain_for(env.cfg, job_id)
    if other == name:
        return False
    stage(f"removing what is left under {other}")
    try:
        lifecycle.delete(env, other, job_id=job_id)
    except (DomainNotFound, BadName):
        return False
    emit(f"{where}: inconsistent: its VM was {name}, and {other} was here too; removed it; "
         f"`dgxvm reconcile` checks the rest of the node")
    return True


def epilog(env: lifecycle.Env, environ: Mapping[str, str], slurm: Slurm, emit: Emit) -> int:
    """Only the job id is needed to clean up: a job whose other values the Prolog refused (or
    that changed since) still has whatever is left of its VM removed."""
    stage = _Stage("reading the job's environment")
    job_id: int | None = None
    name: str | None = None
    where = "dgxvm epilog: job ?"
    in_lifecycle = False               # from there on, delete counts its own failures
    try:
        job_id = jobinput.job_id(environ)
        where = f"dgxvm epilog: {_describe(environ, job_id)}"
        name = vm_of_job(env, job_id)
        stage("reading the VM record")
        before = env.vms.load(name)
        ran = ranlog.read(env.vms.dir(name))   # the images the job ran: gone with the VM dir
        in_lifecycle = True
        try:
            rec = lifecycle.delete(env, name, stage, job_id=job_id)
        except DomainNotFound:
            _left_under_the_jobs_name(env, job_id, name, stage, emit, where)
            return EXIT_OK                 # no VM: no GPUs, or the Prolog refused the job
        _left_under_the_jobs_name(env, job_id, name, stage, emit, where)
    except BaseException as exc:  # noqa: BLE001 - every failure is one line and exit 1
        if not in_lifecycle:
            opstats.count_failure(env.cfg.host.state_dir, "epilog", exc)
        if job_id is None:
            emit(f"dgxvm epilog: job {environ.get('SLURM_JOB_ID', '?')!r}: failed at "
                 f"{stage.now}: {exc}; exit 1 drains the node")
            return EXIT_DRAIN
        cause = _one_line(env, name or domain_for(env.cfg, job_id), exc)
        emit(f"{where}: teardown failed at {stage.now}: {cause}; exit 1 drains the node")
        return EXIT_DRAIN
    if rec is None:
        emit(f"{where}: cleaned up what was left of {name} (no VM record: a Prolog killed "
             f"before it wrote one, or its directory removed by hand); `dgxvm reconcile` "
             f"checks the rest of the node")
        return EXIT_OK
    if before is not None and before.state == "stopped":
        ended = f"the VM stopped before the job ended ({before.ended}); removed"
    elif before is not None and before.state in ("creating", "deleting"):
        ended = f"removed a VM left {before.state}"
    else:
        ended = f"job ended; {rec.ended}"
    rec = rec.with_(ended=ended)
    quarantined = ""
    if rec.quarantined:
        quarantined = ("; quarantined " + "; ".join(f"{p} ({r})" for p, r in
                                                    rec.quarantined.items())
                       + ": the node serves VMs from its healthy GPUs (`dgxvm gpu show`)")
    emit(f"{where}: VM {name} removed in {rec.teardown_s:.2f}s ({ended}){quarantined}")
    if env.cfg.slurm.accounting:
        # the log is the user's file: only images their cache holds are recorded
        ran = ranlog.in_cache(ran, rec.image_cache, rec.uid, rec.gid, rec.groups)
        write = _record_writer(slurm, environ, job_id, after_end=True)
        _account(emit, where, lambda: write(
            vm_fields(rec, state="ended") | {"containers": ranlog.field(ran)}))
    _start_refill(env, environ, emit, where, len(rec.placement.gpus))
    return EXIT_OK


def _start_refill(env: lifecycle.Env, environ: Mapping[str, str], emit: Emit,
                  where: str, gpus: int) -> None:
    """After a job of ``gpus`` GPUs of a partition with a warm policy ([partitions.NAME] warm,
    warm_recent), record its size (what warm_recent follows) and start ``dgxvm warm refill``
    detached: in a session of its own, its output in the state dir's warm-refill.log, nothing
    of the Epilog's held open, so the Epilog (and the node's COMPLETING) ends now; the refill
    waits for it. The partition name is Slurm's, checked."""
    import subprocess
    import sys
    try:
        partition = jobinput.partition(environ.get("SLURM_JOB_PARTITION")) or "default"
    except DgxvmError:
        return
    if not env.cfg.partition(partition).keeps_warm:
        return
    from ..lifecycle import warm
    try:
        warm.remember(env, partition, gpus)
    except (DgxvmError, OSError) as exc:     # a hint for the next refill, never the job's fault
        emit(f"{where}: the job's size not recorded for warm_recent: {exc}")
    if warm.stopped(env):
        return
    exe = sys.argv[0]
    if not os.path.isabs(exe) or not os.access(exe, os.X_OK):
        emit(f"{where}: warm refill not started: {exe!r} is not dgxvm's absolute path")
        return
    state_dir = Path(env.cfg.host.state_dir)
    # the job's values stay behind; where Slurm's config is (scontrol needs it) goes along
    keep = {k: v for k, v in os.environ.items()
            if not k.startswith("SLURM_") or k == "SLURM_CONF"}
    args = [exe, "warm", "refill", "--partition", partition]
    node = environ.get("SLURMD_NODENAME")
    if node:
        args += ["--node", node]
    try:
        warm.rotate_log(state_dir)
        with open(state_dir / warm.REFILL_LOG, "ab") as log:
            subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                             start_new_session=True, close_fds=True, env=keep, cwd="/")
    except OSError as exc:
        emit(f"{where}: warm refill not started: {exc}")
        return
    emit(f"{where}: warm refill of partition {partition} started (log: "
         f"{state_dir / warm.REFILL_LOG})")
