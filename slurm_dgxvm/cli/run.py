"""``dgxvm run`` and ``dgxvm shell``: the job's work inside its VM (slurm_dgxvm/access/).

Their exit status is the command's (0-255; 128+N when a signal N ended it). dgxvm's own failures
(no VM, bad flags, the VM unreachable, the connection lost) exit 125, the convention of
``docker run`` and ``podman run``, with one ``dgxvm: error:`` line on stderr; 126 and 127 are the
guest's "cannot execute" and "not found" (README "Exit status of dgxvm run").
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import click

from ..access import session
from ..access.container import RUNTIMES, ContainerFlags, container_request
from ..access.request import Request, guest_cwd, guest_environment
from ..access.target import job_from_env, target_for
from ..containers import ranlog
from ..errors import BadInput, TransportLost

#: the exit status of ``dgxvm run``/``shell`` when dgxvm itself failed
EXIT_RUN_FAILED = 125
VERBS = ("run", "shell")

_job_option = click.option("--job", "job_id", type=click.IntRange(min=1), metavar="ID",
                           help="The job whose VM to enter (default: $SLURM_JOB_ID; root may "
                                "name any job on this node).")


def _request(target, argv: tuple[str, ...], cfg) -> tuple[Request, str | None]:
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


def _container_options(f):
    for opt in reversed((
        click.option("--container-image", metavar="REF",
                     help="Run CMD in a container of this image: pyxis's syntax "
                          "[USER@][REGISTRY#]IMAGE[:TAG|@DIGEST], or Docker's."),
        click.option("--container-mounts", metavar="SRC[:DST[:FLAGS]],...",
                     help="Bind mounts into the container (FLAGS: ro, rw, rprivate, private, "
                          "rslave, slave, joined with '+'); SRC a path the VM has."),
        click.option("--container-workdir", metavar="DIR",
                     help="Working directory in the container (default: the current one "
                          "when the VM has it, else the image's)."),
        click.option("--container-env", metavar="NAME,...",
                     help="Variables whose job value wins over the image's ENV."),
        click.option("--container-name", metavar="NAME[:auto]",
                     help="A named container: made on its first run, used again by later "
                          "runs of the job (with or without --container-image), keeping what "
                          "they change in it; one run at a time; gone when the job ends."),
        click.option("--container-remap-root/--no-container-remap-root", default=False,
                     help="Be root in the container (mapped to your own uid)."),
        click.option("--container-writable/--container-readonly", default=None,
                     help="A writable container root (a layer of its own over the image, "
                          "removed when the run ends; a named container's is kept), or "
                          "read-only (the default for an unnamed container)."),
    )):
        f = opt(f)
    return f


def _container(target, flags: ContainerFlags, request: Request, cfg, quiet: bool, *,
               terminal: bool = False) -> Request:
    """The request of ``request``'s command in ``flags.image``'s container (or the named
    container's image). The image is held in use until the command ends (the click context
    closes after session.run): no eviction removes it under the running container."""
    from ..containers.cache import ImageCache
    from ..containers.ref import parse
    from ..containers.registry import Registry
    from ..images.profile import runtime_of
    from .image_cache import evict_for_run
    flags.check()             # the flags' own checks first, before any pull
    name = flags.container_name
    kind, gpu_devices = runtime_of(cfg.images.store, target.image)
    if kind not in RUNTIMES:
        raise BadInput(f"job {target.job_id}'s VM runs image {target.image}, whose container "
                       f"runtime is {kind!r}: dgxvm run --container-image needs one of "
                       f"{', '.join(RUNTIMES)}", value=target.image)
    if not target.image_cache:
        raise BadInput(f"job {target.job_id}'s VM has no image cache share ([containers] "
                       "cache_dir is empty or [vm] share is none)", value=target.job_id)
    cache = ImageCache(Path(target.image_cache),
                       Registry.for_user(insecure=cfg.containers.insecure_registries))
    vmdir = Path(target.key).parent
    hold = click.get_current_context().with_resource(contextlib.ExitStack())
    made = ranlog.named(vmdir, name) if name else None
    if made is not None:
        # pyxis's rule: a container that exists is used, and the image is not pulled again
        ref_text, digest = made
        hold.enter_context(cache.in_use(digest))
        image = cache.lookup(digest, parse(ref_text))
        if image is None:
            raise BadInput(f"container {name} of job {target.job_id} was made from "
                           f"{ref_text}@{digest}, which is no longer in your image cache",
                           value=name)
        if flags.image and parse(flags.image) != parse(ref_text) and not quiet:
            click.echo(f"dgxvm: note: container {name} exists (made from {ref_text}); "
                       f"--container-image {flags.image} is not used", err=True)
    elif not flags.image:
        raise BadInput(f"job {target.job_id} has no container named {name}: make it with "
                       f"--container-image REF --container-name {name}", value=name)
    else:
        ref = parse(flags.image)
        # skopeo's progress bars only on a terminal (stderr), one line per stage in a batch log
        image = cache.get_held(ref, hold, live=None if quiet else sys.stderr,
                               progress=lambda line: click.echo(f"dgxvm: {line}", err=True))
        # for the job's record in Slurm's accounting (the Epilog reads it): which exact image;
        # and, for a named container, which image it is made from
        ranlog.append(vmdir, image.digest, str(ref), name)
    evict_for_run(cache, cfg.containers, keep={image.digest}, quiet=quiet)
    n = len(target.gpus) if gpu_devices == "nvidia" else 0
    if target.gpus and not n and not quiet:
        click.echo(f"dgxvm: note: image {target.image} has no GPU devices for containers "
                   f"(simulated GPUs); with the NVIDIA driver it would bind /dev/nvidia0-"
                   f"{len(target.gpus) - 1}, /dev/nvidiactl and /dev/nvidia-uvm", err=True)
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


@click.command(context_settings={"ignore_unknown_options": False,
                                 "allow_interspersed_args": False})
@_job_option
@_container_options
@click.option("--quiet", "-q", is_flag=True, help="No notes on stderr (cwd not shared, ...).")
@click.argument("command", nargs=-1, required=True, metavar="-- CMD [ARGS]...")
@click.pass_obj
def run(c, job_id, container_image, container_mounts, container_workdir, container_env,
        container_name, container_remap_root, container_writable, quiet, command):
    """Run CMD in the job's VM as the job's user, in the current directory when the VM has it
    (the shared work dir), with stdin, stdout and stderr streamed and the job's environment (GPU
    indices in the guest's numbering); with --container-image, in a container of that image.
    Its exit status is CMD's; TERM, INT, HUP, USR1, USR2 and QUIT reach CMD; if dgxvm run dies,
    CMD is stopped in the guest. dgxvm's own failures exit 125."""
    env = c.env
    target = target_for(env, job_from_env(job_id, os.environ))
    request, note = _request(target, tuple(command), env.cfg)
    if note and not quiet and not (container_image or container_name):
        click.echo(note, err=True)
    _no_stray_container_flags(container_image or container_name, {
        "--container-mounts": container_mounts, "--container-workdir": container_workdir,
        "--container-env": container_env, "--container-remap-root": container_remap_root,
        "--container-writable/--container-readonly": container_writable})
    if container_image or container_name:
        flags = ContainerFlags(image=container_image, mounts=container_mounts,
                               workdir=container_workdir, env=container_env,
                               name=container_name, remap_root=container_remap_root,
                               writable=container_writable)
        request = _container(target, flags, request, env.cfg, quiet)
    with _why_lost(env, target):
        status = session.run(target, request)
    raise click.exceptions.Exit(status)


@contextlib.contextmanager
def _why_lost(env, target):
    """A connection lost because the VM itself stopped (its guest crashed or powered off, or it
    was destroyed: the libvirt hook recorded it) says so, instead of only "connection lost"."""
    from ..access.target import view_for
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


def _no_stray_container_flags(container: object, given: dict) -> None:
    """A container flag without a container is a mistake the user should hear about."""
    stray = [flag for flag, value in given.items() if value not in (None, False, "")]
    if stray and not container:
        raise BadInput(f"{', '.join(stray)} without --container-image or --container-name: "
                       "there is no container", value=stray[0])


@click.command()
@_job_option
@click.option("--container-image", metavar="REF",
              help="A shell (/bin/sh) in a container of this image instead.")
@click.option("--container-mounts", metavar="SRC[:DST[:FLAGS]],...",
              help="Bind mounts into the container, as for dgxvm run.")
@click.option("--container-name", metavar="NAME[:auto]",
              help="A named container of the job, as for dgxvm run.")
@click.option("--container-remap-root/--no-container-remap-root", default=False,
              help="Be root in the container (mapped to your own uid).")
@click.option("--container-writable/--container-readonly", default=None,
              help="A writable container root, as for dgxvm run.")
@click.pass_obj
def shell(c, job_id, container_image, container_mounts, container_name, container_remap_root,
          container_writable):
    """An interactive login shell in the job's VM (a terminal when stdin is one: window size,
    Ctrl-C, full-screen programs), in the current directory when the VM has it; with
    --container-image, /bin/sh in a container of that image."""
    env = c.env
    target = target_for(env, job_from_env(job_id, os.environ))
    tty = sys.stdin.isatty() and sys.stdout.isatty()
    _no_stray_container_flags(container_image or container_name, {
        "--container-mounts": container_mounts, "--container-remap-root": container_remap_root,
        "--container-writable/--container-readonly": container_writable})
    if container_image or container_name:
        request, _ = _request(target, ("/bin/sh",), env.cfg)
        flags = ContainerFlags(image=container_image, mounts=container_mounts,
                               name=container_name, remap_root=container_remap_root,
                               writable=container_writable)
        request = _container(target, flags, request, env.cfg, False, terminal=tty)
        raise click.exceptions.Exit(session.run(target, request, tty=tty))
    request, _ = _request(target, (), env.cfg)
    raise click.exceptions.Exit(session.run(target, request, verb="shell", tty=tty))


COMMANDS = (run, shell)
