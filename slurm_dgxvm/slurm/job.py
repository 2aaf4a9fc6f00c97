"""A Slurm job as the Prolog and Epilog see it: their environment, parsed strictly, and the
VM request made from it with the partition's defaults and the job comment's choices.

Only the environment slurmd gives the hooks is read (no Slurm command on the way to a VM):
SLURM_JOB_ID, SLURM_JOB_UID, SLURM_JOB_GID, SLURM_JOB_USER, SLURM_JOB_GPUS (Slurm's GPU
indices, e.g. ``0,1,2,3``), SLURM_JOB_WORK_DIR, SLURM_JOB_PARTITION, SLURM_JOB_COMMENT (only when
the job set one), SLURMD_NODENAME, SLURM_NODELIST (a multi-node job's fabric,
:mod:`slurm_dgxvm.jobnet`; SLURM_JOB_NODELIST when that is the one set).

The job comment (``sbatch --comment``) is free text; dgxvm reads the words that start with
``dgxvm:`` and ignores the rest::

    dgxvm:image=NAME          boot the installed guest image NAME instead of the partition's

Several settings may share a word (``dgxvm:image=a,...``) or come as separate words. An unknown
key, a malformed word or an image the partition does not offer refuses the job (not the node).
A partition offers its own image, and others only when its ``images`` list names them.

Every value is checked for its form by :mod:`.jobinput` before anything is allocated.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..config import Config
from ..errors import BadName, ImageError, JobRefused, QuantityNamed
from ..errors import is_job_fault as is_job_fault   # where the hooks and their tests look
from ..lifecycle.identity import domain_for as domain_for   # the job's VM is the lifecycle's
from ..names import image_name
from ..placement import Request
from ..ranges import format_index_list
from . import jobinput

if TYPE_CHECKING:
    from ..lifecycle import CreateRequest

COMMENT_PREFIX = "dgxvm:"
COMMENT_KEYS = ("image",)
#: The partition key (``[partitions.NAME]``) that sizes each quantity of a job's request.
PARTITION_KEYS = {"vcpus": "vcpus_per_gpu", "memory_mib": "memory_mib_per_gpu",
                  "disk_gib": "disk_gib_per_gpu"}


@dataclass(frozen=True)
class SlurmJob:
    job_id: int
    uid: int
    gid: int
    user: str
    gpus: tuple[int, ...]             # Slurm's GPU indices on this node; () = no GPU asked
    work_dir: str | None
    partition: str | None
    comment: str | None
    node: str | None
    home: str | None = None           # from the host's passwd (on_this_host)
    nodelist: str | None = None       # SLURM_NODELIST: every node of the job (a hostlist)
    groups: tuple[int, ...] = ()      # the user's supplementary gids (on_this_host)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> SlurmJob:
        """The job slurmd describes in ``environ``, every value checked for its form
        (:mod:`.jobinput`). Raises NotAJob when the job id or a variable slurmd always sets is
        missing (nothing to refuse), JobInputError naming the variable for a bad value."""
        e = os.environ if environ is None else environ
        job_id = jobinput.job_id(e)
        raw_uid = jobinput.required(e, "SLURM_JOB_UID")
        raw_gid = jobinput.required(e, "SLURM_JOB_GID")
        user = jobinput.required(e, "SLURM_JOB_USER")
        return cls(job_id=job_id,
                   uid=jobinput.decimal("SLURM_JOB_UID", raw_uid, 0, jobinput.ID_MAX),
                   gid=jobinput.decimal("SLURM_JOB_GID", raw_gid, 0, jobinput.ID_MAX),
                   user=jobinput.account_name("SLURM_JOB_USER", user),
                   gpus=jobinput.gpus(e.get("SLURM_JOB_GPUS")),
                   work_dir=jobinput.work_dir(e.get("SLURM_JOB_WORK_DIR")),
                   partition=jobinput.partition(e.get("SLURM_JOB_PARTITION")),
                   comment=jobinput.comment(e.get("SLURM_JOB_COMMENT")),
                   node=e.get("SLURMD_NODENAME") or None,
                   nodelist=jobinput.nodelist(jobinput.raw_nodelist(e)))

    def on_this_host(self) -> SlurmJob:
        """This job with its user's home and groups from the host's accounts, after checking
        that SLURM_JOB_USER is the name of SLURM_JOB_UID and SLURM_JOB_GID exists (neither
        root). Raises JobInputError naming the value that does not fit."""
        home, groups = jobinput.host_account(self.user, self.uid, self.gid)
        return replace(self, home=home, groups=groups)

    def describe(self) -> str:
        gpus = format_index_list(self.gpus) if self.gpus else "none"
        return f"job {self.job_id} (user {self.user}, Slurm GPUs {gpus})"


def parse_comment(comment: str | None) -> dict[str, str]:
    """The ``dgxvm:key=value`` settings of a job comment. Raises JobRefused naming the bad word."""
    out: dict[str, str] = {}
    for word in (comment or "").split():
        if not word.startswith(COMMENT_PREFIX):
            continue
        body = word[len(COMMENT_PREFIX):]
        for item in body.split(","):
            key, eq, value = item.partition("=")
            if not eq or not key or not value:
                raise JobRefused(reason=f"job comment {word!r}: expected dgxvm:KEY=VALUE "
                                        f"(keys: {', '.join(COMMENT_KEYS)})")
            if key not in COMMENT_KEYS:
                raise JobRefused(reason=f"job comment {word!r}: unknown key {key!r} "
                                        f"(keys: {', '.join(COMMENT_KEYS)})")
            if key in out and out[key] != value:
                raise JobRefused(reason=f"job comment: {key} given twice ({out[key]!r}, "
                                        f"{value!r})")
            out[key] = value
    return out


def offered_images(cfg: Config, partition: str | None, images) -> tuple[str, ...]:
    """The images a job of ``partition`` may boot: the partition's ``images`` list when it has
    one, else only its own image (``image``, or the store's default when that is "" too)."""
    part = cfg.partition(partition)
    if part.images:
        return tuple(dict.fromkeys(((part.image,) if part.image else ()) + part.images))
    if part.image:
        return (part.image,)
    try:
        return (images.get(None).name,)
    except ImageError:
        return ()


def create_request(cfg: Config, job: SlurmJob, images, home: str | None = None) -> CreateRequest:
    """The VM request for ``job``: its GPUs, the partition's sizing and alignment, the image.

    ``images`` is the ImageStore. A job boots the partition's image; its comment may pick
    another one only from the partition's ``images`` list (an empty list offers none). Raises
    JobRefused for what the job asked wrongly (comment, an image not installed or not offered);
    ImageError when the partition's own default image is missing (the node is misconfigured,
    not the job). ``home`` defaults to the job's (SlurmJob.on_this_host).
    """
    part = cfg.partition(job.partition)
    chosen = parse_comment(job.comment).get("image")
    if chosen is not None:
        try:
            image_name(chosen)
        except BadName as exc:
            raise JobRefused(reason=f"job comment: {exc}") from None
        offered = offered_images(cfg, job.partition, images)
        if chosen not in offered:
            where = f"partition {job.partition}" if job.partition else "this partition"
            raise JobRefused(reason=f"image {chosen!r} is not offered in {where} (offered: "
                                    f"{', '.join(offered) or 'none'}; an admin lists more in "
                                    f"the partition's images)")
        try:
            image = images.get(chosen)
        except ImageError as exc:
            raise JobRefused(reason=f"job comment dgxvm:image={chosen}: {exc}") from None
    else:
        try:
            image = images.get(part.image or None)
        except ImageError as exc:                # the node's fault: its config or its store
            where = (f"partition {job.partition}'s image" if part.image
                     else "the default image")
            raise ImageError(f"{where}: {exc}", name=part.image or None,
                             reason=exc.reason) from None
    fabric = job_fabric(cfg, job)
    # here, not at the top: lifecycle.create loads libvirt
    from ..lifecycle import CreateRequest
    return CreateRequest(
        name=domain_for(cfg, job.job_id),
        placement=Request(count=len(job.gpus), slurm_gpus=job.gpus,
                          **part.sizes(len(job.gpus)), ib=part.ib),
        data_disk_gib=part.data_disk, image=image.name, owner="job", job_id=job.job_id,
        user=job.user, uid=job.uid, gid=job.gid, groups=job.groups,
        home=home if home is not None else job.home, workdir=job.work_dir,
        alignment=part.alignment or None, fabric=fabric)


def job_fabric(cfg: Config, job: SlurmJob):
    """This node's part of the job's fabric (jobnet.JobFabric), or None: ``[jobnet]`` is off, or
    the job runs on one node. Raises JobInputError for a node list or node name that the
    fabric's config does not know (the job's values), ConfigError when this node has no
    underlay address."""
    if not cfg.jobnet.enabled or not job.nodelist:
        return None
    from ..jobnet.plan import plan
    if job.node is None:
        raise JobRefused(reason="SLURMD_NODENAME is not set: a multi-node job's VM cannot "
                                "tell which of its nodes this is")
    return plan(cfg.jobnet, job.job_id, job.nodelist, job.node)


def job_nodes(nodelist: str | None) -> tuple[str, ...]:
    """The names of the job's node list (a hostlist), () when it is unset or does not parse
    (the fabric refuses such a job; its accounting is then written as a one-node job's)."""
    from ..jobnet.hostlist import expand
    try:
        return expand(nodelist) if nodelist else ()
    except ValueError:
        return ()


def partition_table(cfg: Config, partition: str | None) -> str | None:
    """The config table whose defaults a job of ``partition`` gets (``partitions.gpu``,
    ``partitions.default``), as :meth:`Config.partition` chooses it; None for the built-in
    defaults."""
    if (partition or "") in cfg.partitions:
        return f"partitions.{partition}"
    return "partitions.default" if "default" in cfg.partitions else None


def sourced(cfg: Config, job: SlurmJob | None, exc: BaseException) -> BaseException:
    """``exc`` naming where a job's quantity came from, when placement refused one: the
    partition key that sized it, e.g. ``vcpus 5 (partitions.gpu.vcpus_per_gpu 5 x 1 GPU)``.
    A Slurm job has no CLI flags; any other error is returned as it is."""
    if job is None or not isinstance(exc, QuantityNamed):
        return exc
    key = PARTITION_KEYS.get(exc.quantity)
    table = partition_table(cfg, job.partition)
    if key is None or table is None:
        return exc
    per_gpu = getattr(cfg.partition(job.partition), key)
    n = len(job.gpus)
    return exc.naming(f"{exc.subject} ({table}.{key} {per_gpu} x {n} GPU{'s' if n != 1 else ''})")
