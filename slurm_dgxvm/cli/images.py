"""``dgxvm image show|install|remove|default``: the guest image store (after ``nvidia-vm image``).

Registered by the main CLI by name (``cli.main.LAZY_COMMANDS``). The commands take the click object
(``click.pass_obj``), which must offer:

* ``config``: a :class:`slurm_dgxvm.config.Config` (``config.images.store`` is the store), and
* ``image_users()``: ``{image name: [domain names]}`` of the VMs whose disks are backed by each
  image (libvirt's view), used by ``show`` and, as the refusal, by ``remove``.

Not imported from ``cli.main`` (which imports this module when the command is looked up): errors
are raised as DgxvmError and ``main()`` turns them into one line and an exit code, as for every
other command.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from ..errors import DgxvmError
from ..images import Image, ImageStore, human_bytes
from ..images.profile import CONTAINER_RUNTIMES, GPU_DEVICES, READINESS, SHARED_CONNECTION


def _store(obj) -> ImageStore:
    return ImageStore(obj.config.images.store)


def _emit_json(doc) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=True))


@click.group("image")
def image():
    """Guest OS images: show, install, remove, choose the default."""


# -- show ------------------------------------------------------------------------------------------
@image.command("show")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (stable keys).")
@click.pass_obj
def image_show(obj, as_json):
    """Show installed images, the default (*), and the VMs that use each."""
    store = _store(obj)
    images, broken = store.scan()
    try:
        default = store.default_name()
    except DgxvmError as exc:
        click.echo(f"dgxvm: warning: {exc}", err=True)
        default = None
    try:
        users = {k: sorted(v) for k, v in obj.image_users().items()}
    except DgxvmError as exc:         # libvirt down: still show the store, say what is unknown
        click.echo(f"dgxvm: warning: cannot tell which VMs use the images: {exc}", err=True)
        users = None

    def used_by(name):
        return None if users is None else users.get(name, [])

    if as_json:
        _emit_json({
            "store": str(store.root),
            "default": default,
            "images": [img.to_json() | {"default": img.name == default,
                                        "used_by": used_by(img.name)} for img in images],
            "broken": [b.to_json() | {"default": b.name == default, "used_by": used_by(b.name)}
                       for b in broken],
        })
        return
    if not images and not broken:
        click.echo(f"no images in {store.root}; install one with: "
                   f"dgxvm image install SRC --default")
        return
    header = ("  NAME", "FORMAT", "VIRTUAL", "ON DISK", "VERSION", "BOOT", "READY", "RUNTIME",
              "GPU DEVICES", "INSTALLED", "USED BY")
    rows = [header]
    for img in images:
        u = used_by(img.name)
        rows.append((("* " if img.name == default else "  ") + img.name, img.format,
                     human_bytes(img.virtual_size), human_bytes(img.actual_size), img.version,
                     img.boot, img.readiness, img.container_runtime, img.gpu_devices,
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(img.installed)),
                     "?" if u is None else (", ".join(u) or "-")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    for r in rows:
        cells = [c.ljust(w) for c, w in zip(r, widths)] + [r[-1]]
        click.echo("  ".join(cells).rstrip())
    for b in broken:
        u = used_by(b.name)
        extra = f" (used by {', '.join(u)})" if u else ""
        click.echo(f"{'* ' if b.name == default else '  '}{b.name}  BROKEN: {b.reason}{extra}")
    if default and default not in {i.name for i in images} | {b.name for b in broken}:
        click.echo(f"default image {default} is not installed")
    elif default:
        click.echo("* default image")


# -- install ---------------------------------------------------------------------------------------
class _Bar:
    """A click progress bar on stderr, created on the first report (when the size is known)."""

    def __init__(self, label: str):
        self.label, self.bar, self.last = label, None, 0

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = click.progressbar(length=max(total, 1), label=self.label, file=sys.stderr,
                                         show_eta=True, show_percent=True)
            self.bar.__enter__()
        self.bar.update(done - self.last)
        self.last = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


@image.command("install")
@click.argument("src", type=click.Path(path_type=Path), metavar="SRC")
@click.option("--name", metavar="NAME", help="Image name. [default: the manifest's name, else "
                                             "the file name without its extension]")
@click.option("--default", "make_default", is_flag=True, help="Make it the default image.")
@click.option("--version", "version", metavar="V",
              help="Version label. [default: the manifest's, else the sha256 prefix]")
@click.option("--kernel", type=click.Path(path_type=Path), metavar="FILE",
              help="Kernel for direct kernel boot (with --initrd).")
@click.option("--initrd", type=click.Path(path_type=Path), metavar="FILE",
              help="Initrd for direct kernel boot (with --kernel).")
@click.option("--cmdline", metavar="ARGS", help="Kernel command line (with --kernel).")
@click.option("--container-runtime", metavar="NAME",
              help=f"The container runtime the image has, for `dgxvm run --container-image`: "
                   f"{', '.join(CONTAINER_RUNTIMES)} (none: refused). [default: the manifest's, "
                   f"else none]")
@click.option("--readiness", metavar="WHEN",
              help=f"When a VM of the image is ready: {', '.join(READINESS)} (agent: its QEMU "
                   f"guest agent answers; cloud-init: and cloud-init's init stages are done; "
                   f"auto: cloud-init's when the guest has it). [default: the manifest's, else "
                   f"auto]")
@click.option("--gpu-devices", metavar="KIND",
              help=f"How GPUs reach a container in the image: {', '.join(GPU_DEVICES)} "
                   f"(nvidia: the driver's /dev/nvidia*; cdi: an NVIDIA Container Toolkit CDI "
                   f"spec). [default: the manifest's, else none]")
@click.option("--shared-connection", metavar="YES|NO",
              help=f"Whether a job's runs share one ssh connection to a VM of the image: "
                   f"{', '.join(SHARED_CONNECTION)} (yes only for a guest sshd that multiplexes "
                   f"sessions reliably: OpenSSH, not dropbear before 2024.86). [default: the "
                   f"manifest's, else no]")
@click.pass_obj
def image_install(obj, src, name, make_default, version, kernel, initrd, cmdline,
                  container_runtime, readiness, gpu_devices, shared_connection):
    """Install SRC: a qcow2 or raw disk image, or a builder manifest (manifest.json, or a
    directory holding one). The disk is copied into the store and checked."""
    bar = _Bar(f"installing {name or Path(src).name}") if sys.stderr.isatty() else None
    try:
        img = _store(obj).install(src, name=name, default=make_default, version=version,
                                  kernel=kernel, initrd=initrd, cmdline=cmdline,
                                  container_runtime=container_runtime, gpu_devices=gpu_devices,
                                  readiness=readiness, shared_connection=shared_connection,
                                  progress=bar)
    finally:
        if bar is not None:
            bar.close()
    click.echo(f"installed {_line(img)}{' (default)' if make_default else ''}")


def _line(img: Image) -> str:
    return (f"image {img.name}: {img.format}, {human_bytes(img.virtual_size)} virtual, "
            f"{human_bytes(img.actual_size)} on disk, version {img.version}, boots from "
            f"{img.boot}, ready when {_ready_when(img.readiness)}, container runtime "
            f"{img.container_runtime}, GPU devices {img.gpu_devices}, sha256 {img.sha256[:12]}")


def _ready_when(readiness: str) -> str:
    return {"agent": "its guest agent answers",
            "cloud-init": "cloud-init applied the seed",
            }.get(readiness, "its guest agent answers (and cloud-init applied the seed, if "
                             "it has cloud-init)")


# -- remove / default ------------------------------------------------------------------------------
@image.command("remove")
@click.argument("name", metavar="NAME")
@click.pass_obj
def image_remove(obj, name):
    """Delete image NAME from the store (refused while VMs use it)."""
    users = obj.image_users().get(name, [])
    _store(obj).remove(name, in_use_by=users)
    click.echo(f"removed image {name}")


@image.command("default")
@click.argument("name", metavar="NAME")
@click.pass_obj
def image_default(obj, name):
    """Make the installed image NAME the default."""
    _store(obj).set_default(name)
    click.echo(f"default image is now {name}")
