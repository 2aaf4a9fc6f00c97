"""``dgxvm run`` and ``dgxvm shell`` whole: from the flags as given to the command's exit status in
the job's VM (:func:`run_command`, :func:`shell_command`), with or without a container.

Their exit status is the command's (0-255; 128+N when a signal N ended it). dgxvm's own failures
(no VM, bad flags, the VM unreachable, the connection lost) are DgxvmError, which the CLI turns
into :data:`EXIT_RUN_FAILED` (125, the convention of ``docker run`` and ``podman run``) and one
``dgxvm: error:`` line on stderr; 126 and 127 are the guest's "cannot execute" and "not found"
(docs/user/run.md, "Exit status").

The order of a run, so that a mistake costs nothing:

1. every flag alone (:func:`checked_flags`): the image reference parsed, the mounts' syntax, the
   working directory, the variable names, the container's name, flags that contradict each
   other or are given twice with different values (pyxis refuses these too) -- before the
   config, the job's record, the cache or the VM are touched;
2. the job's target; root reaching a user's job becomes that user for good here
   (access.target.become_job_user): from now on nothing is done as root;
3. what needs the VM's facts (:func:`vm_checks`: the guest image's runtime, the cache share, a
   mount source that is a host path the VM does not have, the named container) -- before any
   pull;
4. the image (pulled into the user's cache if needed, and held in use until the command ends),
   then the command in the VM.

Notes and progress lines for stderr go to the caller's ``say``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from ..containers import ranlog
from ..errors import BadInput, TransportLost
from . import session
from .container import (OVERLAY_UNSAFE, RUNTIMES, ContainerFlags, check_mounts,
                        container_request)
from .request import Request, guest_cwd, guest_environment
from .target import become_job_user, job_from_env, must_become_user, target_for

#: the exit status of ``dgxvm run``/``shell`` when dgxvm itself failed
EXIT_RUN_FAILED = 125

Say = Callable[[str], None]


# -- 1. the flags alone ----------------------------------------------------------------------------
def single(flag: str, values: tuple):
    """The one value of an option given once or more (None when not given); given again with
    another value it is refused, as pyxis refuses it: which one was meant?"""
    distinct = list(dict.fromkeys(values))
    if len(distinct) > 1:
        raise BadInput(f"{flag} given with different values ({', '.join(map(repr, distinct))}):"
                       " give it once", value=distinct[-1])
    return distinct[0] if distinct else None


def _joined(flag: str, values: tuple[str, ...]) -> str | None:
    """Every occurrence of a list option joined with ',' (None when not given); an empty one
    is refused, as pyxis refuses it."""
    for v in values:
        if v == "":
            raise BadInput(f"{flag} '': an argument is required", value=v)
    return ",".join(values) if values else None


def _pair(on_flag: str, on: bool, off_flag: str, off: bool) -> bool | None:
    """A flag and its opposite: True, False, or None when neither; both is a contradiction."""
    if on and off:
        raise BadInput(f"both {on_flag} and {off_flag} were given: they contradict each other",
                       value=f"{on_flag} {off_flag}")
    return True if on else False if off else None


def checked_flags(opts: Mapping) -> ContainerFlags | None:
    """The container flags of ``opts`` (each option's values as given, keyed by its name:
    ``container_image``, ``container_mounts``, ...), every check the flags alone allow done
    (BadInput naming the flag and the value): None when there is no container. Touches
    nothing: no config, no record, no cache, no registry, no VM."""
    image = single("--container-image", opts.get("container_image", ()))
    name = single("--container-name", opts.get("container_name", ()))
    if image == "":
        raise BadInput("--container-image '': an argument is required (an image such as "
                       "ubuntu:24.04 or nvcr.io#nvidia/pytorch:24.01-py3)", value=image)
    if name == "":
        raise BadInput("--container-name '': an argument is required (NAME[:auto])", value=name)
    given = {
        "--container-mounts": _joined("--container-mounts", opts.get("container_mounts", ())),
        "--container-workdir": single("--container-workdir", opts.get("container_workdir", ())),
        "--container-env": _joined("--container-env", opts.get("container_env", ())),
        "--container-remap-root": _pair(
            "--container-remap-root", opts.get("container_remap_root", False),
            "--no-container-remap-root", opts.get("no_container_remap_root", False)),
        "--container-writable": _pair(
            "--container-writable", opts.get("container_writable", False),
            "--container-readonly", opts.get("container_readonly", False)),
    }
    flags = ContainerFlags(image=image, mounts=given["--container-mounts"],
                           workdir=given["--container-workdir"], env=given["--container-env"],
                           name=name, remap_root=bool(given["--container-remap-root"]),
                           writable=given["--container-writable"])
    flags.check()
    if image is None and name is None:
        # a flag that would change the container is a mistake without one (saying the
        # default, --container-readonly or --no-container-remap-root, is not)
        stray = [f for f, v in given.items() if v not in (None, False)]
        if stray:
            raise BadInput(f"{', '.join(stray)} without --container-image or --container-name: "
                           "there is no container", value=stray[0])
        return None
    return flags


# -- 2. the job's VM -------------------------------------------------------------------------------
def reach(env, job: int):
    """(job ``job``'s VM as the caller may reach it, whether the caller may use the job's
    shared connection); root reaching a user's job is that user from here on
    (access.target.become_job_user), before anything of theirs is touched, and shares no
    connection with them (access.connection)."""
    target = target_for(env, job)
    if must_become_user(target):
        become_job_user(target)
        return target, False
    return target, True


def shared_connection(target, may_share: bool, cfg) -> str | None:
    """The job's shared connection's socket (access.connection), its master started if need
    be; None for a caller that shares none, or a VM whose image's profile does not say its
    sshd multiplexes reliably (``shared_connection``). Asked for once the run's checks are
    done."""
    if not may_share or not target.image:
        return None
    from ..images.profile import shares_connection
    if not shares_connection(cfg.images.store, target.image):
        return None
    from .connection import shared_socket
    return shared_socket(target)


def job_request(target, argv: tuple[str, ...], cfg) -> tuple[Request, str | None]:
    """The request for ``argv`` and a note for stderr when the cwd is not in the VM."""
    cwd = os.getcwd()
    where = guest_cwd(cwd, target.shared)
    note = None
    if where is None:
        note = (f"dgxvm: note: {cwd} is not shared with job {target.job_id}'s VM"
                + (f" (only {target.workdir} is)" if target.workdir else "")
                + "; the command starts in the user's home in the VM")
    env = guest_environment(os.environ, target.slurm_gpus,
                            relative=cfg.slurm.constrain_devices)
    return Request(argv=argv, env=env, cwd=where), note


# -- 3. what needs the VM's facts, 4. the image ----------------------------------------------------
def vm_checks(target, flags: ContainerFlags, cfg) -> tuple[str, str, tuple[str, str] | None]:
    """What needs the VM's facts, checked before any pull (as the job's user): the guest
    image's container runtime, the image cache share, the mount sources (a host path the VM
    does not have), a writable root the cache's path allows, and the named container (made
    before, or an image to make it from). Returns (runtime, gpu devices, (ref, digest) of the
    named container made before or None)."""
    from ..images.profile import runtime_of
    kind, gpu_devices = runtime_of(cfg.images.store, target.image)
    if kind not in RUNTIMES:
        raise BadInput(f"job {target.job_id}'s VM runs image {target.image}, whose container "
                       f"runtime is {kind!r}: dgxvm run --container-image needs one of "
                       f"{', '.join(RUNTIMES)}", value=target.image)
    if not target.image_cache:
        raise BadInput(f"job {target.job_id}'s VM has no image cache share ([containers] "
                       "cache_dir is empty or [vm] share is none)", value=target.job_id)
    check_mounts(flags.mounts, target.shared)
    if flags.rootfs_writable and any(c in target.image_cache for c in OVERLAY_UNSAFE):
        raise BadInput(f"--container-writable: the image cache {target.image_cache} has a "
                       "character an overlay mount cannot take (',', ':', '\\'); the admin's "
                       "[containers] cache_dir must avoid them", value=target.image_cache)
    name = flags.container_name
    made = ranlog.named(Path(target.key).parent, name) if name else None
    if made is None and name and not flags.image:
        raise BadInput(f"job {target.job_id} has no container named {name}: make it with "
                       f"--container-image REF --container-name {name}", value=name)
    return kind, gpu_devices, made


def in_container(target, flags: ContainerFlags, request: Request, cfg,
                 hold: contextlib.ExitStack, *, quiet: bool, say: Say,
                 terminal: bool = False) -> Request:
    """The request of ``request``'s command in ``flags.image``'s container (or the named
    container's image); ``flags`` come from :func:`checked_flags`. The image is held in use
    until ``hold`` closes (after the command ends): no eviction removes it under the running
    container."""
    from ..containers.cache import ImageCache
    from ..containers.cache_admin import evict_for_run
    from ..containers.ref import parse
    from ..containers.registry import Registry
    kind, gpu_devices, made = vm_checks(target, flags, cfg)     # before any pull
    name = flags.container_name
    cache = ImageCache(Path(target.image_cache),
                       Registry.for_user(insecure=cfg.containers.insecure_registries))
    vmdir = Path(target.key).parent
    if made is not None:
        # pyxis's rule: a container that exists is used, and the image is not pulled again
        ref_text, digest = made
        hold.enter_context(cache.in_use(digest))
        image = cache.lookup(digest, parse(ref_text))
        if image is None:
            raise BadInput(f"container {name} of job {target.job_id} was made from "
                           f"{ref_text}@{digest}, which is no longer in your image cache",
                           value=name)
        if flags.image and flags.image_ref() != parse(ref_text) and not quiet:
            say(f"dgxvm: note: container {name} exists (made from {ref_text}); "
                f"--container-image {flags.image} is not used")
    else:
        ref = flags.image_ref()
        # skopeo's progress bars only on a terminal (stderr), one line per stage in a batch log
        image = cache.get_held(ref, hold, live=None if quiet else sys.stderr,
                               progress=lambda line: say(f"dgxvm: {line}"))
        # for the job's record in Slurm's accounting (the Epilog reads it): which exact image;
        # and, for a named container, which image it is made from
        ranlog.append(vmdir, image.digest, str(ref), name)
    evict_for_run(cache, cfg.containers, keep={image.digest}, quiet=quiet, say=say)
    n = len(target.gpus) if gpu_devices == "nvidia" else 0
    if target.gpus and not n and not quiet:
        say(f"dgxvm: note: image {target.image} has no GPU devices for containers "
            f"(simulated GPUs); with the NVIDIA driver it would bind /dev/nvidia0-"
            f"{len(target.gpus) - 1}, /dev/nvidiactl and /dev/nvidia-uvm")
    return container_request(flags, argv=request.argv, env=request.env, cwd=request.cwd,
                             shared=target.shared, uid=target.uid, gid=target.gid,
                             groups=target.groups, user=target.user, home=_home(target),
                             rootfs=str(image.rootfs), image_config=image.config,
                             run_name=image.digest.split(":")[-1][:12], gpu_devices=n,
                             terminal=terminal, runtime_kind=kind)


def _home(target) -> str:
    """The user's home in the guest (the seed's: the host account's)."""
    import pwd
    try:
        return pwd.getpwuid(target.uid).pw_dir or "/"
    except KeyError:
        return "/"


@contextlib.contextmanager
def why_lost(env, target):
    """A connection lost because the VM itself stopped (its guest crashed or powered off, or it
    was destroyed: the libvirt hook recorded it) says so, instead of only "connection lost"."""
    from .target import view_for
    try:
        yield
    except TransportLost as exc:
        try:
            view = view_for(env, target.job_id)
        except Exception:  # noqa: BLE001 - the original error is what matters then
            raise exc from None
        if view.get("state") != "running":
            raise TransportLost(job=target.job_id, domain=target.domain,
                                reason=f"the VM stopped ({view.get('ended') or view.get('state')})"
                                       f": its guest crashed or powered off, or it was destroyed; "
                                       f"{exc.reason}") from None
        raise


# -- the verbs -------------------------------------------------------------------------------------
def run_command(env_of: Callable[[], object], *, job_ids: tuple[int, ...],
                argv: tuple[str, ...], options: Mapping, quiet: bool, say: Say) -> int:
    """``dgxvm run``: ``argv`` in job ``job_ids``' VM (``$SLURM_JOB_ID`` when not given), in a
    container when ``options`` name one; its exit status. ``env_of`` gives the library's
    environment (lifecycle.Env), asked for only once every flag is checked."""
    flags = checked_flags(options)
    job = job_from_env(single("--job", job_ids), os.environ)
    env = env_of()
    target, may_share = reach(env, job)
    request, note = job_request(target, tuple(argv), env.cfg)
    if note and not quiet and flags is None:
        say(note)
    with contextlib.ExitStack() as hold:
        if flags is not None:
            request = in_container(target, flags, request, env.cfg, hold, quiet=quiet, say=say)
        with why_lost(env, target):
            return session.run(target, request,
                               shared=shared_connection(target, may_share, env.cfg))


def shell_command(env_of: Callable[[], object], *, job_ids: tuple[int, ...], options: Mapping,
                  tty: bool, say: Say) -> int:
    """``dgxvm shell``: a login shell in the job's VM, or /bin/sh in a container when
    ``options`` name one (a terminal with ``tty``); its exit status."""
    flags = checked_flags(options)
    job = job_from_env(single("--job", job_ids), os.environ)
    env = env_of()
    target, may_share = reach(env, job)
    with contextlib.ExitStack() as hold:
        if flags is not None:
            request, _ = job_request(target, ("/bin/sh",), env.cfg)
            request = in_container(target, flags, request, env.cfg, hold, quiet=False,
                                   say=say, terminal=tty)
            return session.run(target, request, tty=tty,
                               shared=shared_connection(target, may_share, env.cfg))
        request, _ = job_request(target, (), env.cfg)
        return session.run(target, request, verb="shell", tty=tty,
                           shared=shared_connection(target, may_share, env.cfg))
