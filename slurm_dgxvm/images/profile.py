"""An installed image and its profile, ``<store>/<name>/image.json``: :class:`Image`,
:class:`BrokenImage`, and the one reader (:func:`load`) and writer (:func:`write`) of the file.

* **The profile keeps relative file names** (``disk.qcow2``, ``vmlinuz``) and the loader accepts
  only those exact names, so a hand-edited ``image.json`` cannot point a VM at another file;
  :class:`Image` carries absolute paths.
* **Files are world-readable** (0644, directories 0755): qemu runs as another user and opens
  the image read-only as a backing file; and any user may ask an image's container runtime
  (:func:`runtime_of`, for ``dgxvm run --container-image``).
* **The container runtime is the image's** (``container_runtime``: :data:`CONTAINER_RUNTIMES`;
  ``gpu_devices``: :data:`GPU_DEVICES`), recorded at install time from the builder manifest or
  the install options. Both keys are optional in the file: a profile written before they
  existed reads as ``none``/``none``, and older readers ignore them, so ``schema_version``
  stays 1 (the loader accepts exactly its own version; a bump would make every installed
  image unreadable to an older dgxvm and is kept for changes old readers cannot ignore).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadName, ImageError
from ..fsutil import atomic_write_json
from ..names import image_name
from .sniff import allocated

FORMATS = ("qcow2", "raw")
PROFILE_FILE = "image.json"
KERNEL_FILE = "vmlinuz"
INITRD_FILE = "initrd.img"
SCHEMA = "dgxvm-image"
SCHEMA_VERSION = 1

# The container runtime the guest image has (what ``dgxvm run --container-image`` drives):
# rootless runc (the test guest: runc and umoci), podman, docker, enroot; ``none`` refuses
# ``--container-image`` on VMs of this image.
CONTAINER_RUNTIMES = ("runc", "podman", "docker", "enroot", "none")
# How the GPUs reach a container in the image: ``nvidia`` (the NVIDIA driver is installed: bind
# /dev/nvidia*), ``cdi`` (an NVIDIA Container Toolkit CDI spec), ``none`` (e.g. simulated GPUs).
GPU_DEVICES = ("nvidia", "cdi", "none")
NO_RUNTIME = "none"         # the default of both, and what a profile without the keys means
# When a VM of the image is ready (guest.wait_ready): ``agent`` (its QEMU guest agent answers:
# an image whose own init applies the seed before starting the agent, the test guest),
# ``cloud-init`` (the agent answers and cloud-init's init stages, where the seed is applied,
# finished without errors), ``auto`` (cloud-init's when /usr/bin/cloud-init is in the guest:
# what a profile without the key means). Every VM is reached the same way: ssh as the job's
# user with the job's key, the seed's pinned host key, through the guest helper.
READINESS = ("auto", "agent", "cloud-init")
AUTO_READINESS = "auto"
# Whether the job's runs may share one ssh connection to a VM of the image
# (access.connection): ``yes`` for a guest whose sshd multiplexes sessions reliably (OpenSSH,
# with the MaxSessions the seed sets); ``no`` (the default, and what a profile without the key
# means) makes every run its own connection. Dropbear before 2024.86 closes a session opened
# while another session's process exits, and may abort the whole connection (mkj/dropbear#321).
SHARED_CONNECTION = ("no", "yes")
NO_SHARED_CONNECTION = "no"

DIR_MODE = 0o755
FILE_MODE = 0o644


def disk_file(fmt: str) -> str:
    """The disk's file name in an image directory: ``disk.qcow2`` or ``disk.raw``."""
    return f"disk.{fmt}"


@dataclass(frozen=True)
class Image:
    """One installed image: what the VM designer needs to build a domain from it."""

    name: str
    path: str                 # absolute path of the disk file
    format: str               # "qcow2" | "raw"
    virtual_size: int         # bytes the guest sees (qemu-img info)
    actual_size: int          # bytes the file occupies on the host
    version: str
    sha256: str               # of the disk file as installed
    kernel: str | None        # absolute paths when the image boots by direct kernel boot
    initrd: str | None
    cmdline: str | None
    installed: float          # epoch seconds
    source: str               # what it was installed from
    container_runtime: str = NO_RUNTIME   # one of CONTAINER_RUNTIMES
    gpu_devices: str = NO_RUNTIME         # one of GPU_DEVICES
    readiness: str = AUTO_READINESS       # one of READINESS
    shared_connection: str = NO_SHARED_CONNECTION   # one of SHARED_CONNECTION

    @property
    def boot(self) -> str:
        """``kernel`` (direct kernel boot: kernel + initrd + cmdline) or ``disk`` (firmware)."""
        return "kernel" if self.kernel else "disk"

    def to_json(self) -> dict:
        return {"name": self.name, "path": self.path, "format": self.format,
                "virtual_size": self.virtual_size, "actual_size": self.actual_size,
                "version": self.version, "sha256": self.sha256, "boot": self.boot,
                "kernel": self.kernel, "initrd": self.initrd, "cmdline": self.cmdline,
                "installed": self.installed, "source": self.source,
                "container_runtime": self.container_runtime, "gpu_devices": self.gpu_devices,
                "readiness": self.readiness, "shared_connection": self.shared_connection}


@dataclass(frozen=True)
class BrokenImage:
    """A directory in the store that is not a usable image (no/invalid profile, disk gone)."""

    name: str
    path: str
    reason: str

    def to_json(self) -> dict:
        return {"name": self.name, "path": self.path, "reason": self.reason}


def check_choice(value, key: str, where: str, *, label: str | None = None) -> str:
    """``value`` when it is one of ``key``'s values (``container_runtime``: CONTAINER_RUNTIMES,
    ``gpu_devices``: GPU_DEVICES); else ImageError (``image <where>: <label> 'x' is not one of
    ...``) naming the value, what gave it (``label``, default ``key``) and the values there
    are."""
    choices = _CHOICES[key]
    if not isinstance(value, str) or value not in choices:
        raise ImageError(name=where, reason=f"{label or key} {value!r} is not one of "
                                            f"{', '.join(choices)}")
    return value


def write(directory: Path, *, name: str, fmt: str, virtual_size: int, version: str,
          sha256: str, kernel_boot: bool, cmdline: str | None, source: str,
          container_runtime: str = NO_RUNTIME, gpu_devices: str = NO_RUNTIME,
          readiness: str = AUTO_READINESS,
          shared_connection: str = NO_SHARED_CONNECTION) -> None:
    """Write ``directory``'s profile (atomically, 0644; this also makes the names of the files
    already copied into ``directory`` durable). The disk must be in place: its allocation is
    recorded. ImageError for a ``container_runtime``, ``gpu_devices`` or ``readiness`` that is
    not one."""
    check_choice(container_runtime, "container_runtime", name)
    check_choice(gpu_devices, "gpu_devices", name)
    check_choice(readiness, "readiness", name)
    check_choice(shared_connection, "shared_connection", name)
    doc = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "name": name,
        "disk": disk_file(fmt), "format": fmt, "virtual_size": virtual_size,
        "actual_size": allocated(directory / disk_file(fmt)), "version": version,
        "sha256": sha256,
        "kernel": KERNEL_FILE if kernel_boot else None,
        "initrd": INITRD_FILE if kernel_boot else None,
        "cmdline": cmdline if kernel_boot else None,
        "installed": time.time(), "source": source,
        "container_runtime": container_runtime, "gpu_devices": gpu_devices,
        "readiness": readiness, "shared_connection": shared_connection,
    }
    atomic_write_json(directory / PROFILE_FILE, doc, mode=FILE_MODE, indent=2)


def load(directory: Path) -> Image:
    """The Image installed in ``directory`` (named after it).

    ImageError when the profile is missing, unreadable, not valid JSON or not a valid profile
    for this name, or when the disk (kernel, initrd) is missing or not a regular file.
    """
    name = directory.name
    prof = directory / PROFILE_FILE
    try:
        doc = json.loads(prof.read_text())
    except FileNotFoundError:
        raise ImageError(name=name, reason=f"no {PROFILE_FILE} (an interrupted copy by "
                                           f"hand?); remove it and install again") from None
    except OSError as e:
        raise ImageError(name=name, reason=f"cannot read {prof}: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ImageError(name=name, reason=f"{prof} is not valid JSON: {e}") from None
    try:
        installed = _validate(doc, name)
    except (KeyError, TypeError, ValueError) as e:
        raise ImageError(name=name, reason=f"{prof} is invalid: {e}") from None
    files = [directory / doc["disk"]]
    if doc["kernel"]:
        files += [directory / KERNEL_FILE, directory / INITRD_FILE]
    for f in files:
        if f.is_symlink() or not f.is_file():
            raise ImageError(name=name, reason=f"{f} is missing or not a regular file")
    disk = files[0]
    return Image(name=name, path=str(disk), format=doc["format"],
                 virtual_size=doc["virtual_size"], actual_size=allocated(disk),
                 version=doc["version"], sha256=doc["sha256"],
                 kernel=str(files[1]) if doc["kernel"] else None,
                 initrd=str(files[2]) if doc["kernel"] else None,
                 cmdline=doc.get("cmdline") if doc["kernel"] else None,
                 installed=installed, source=doc["source"],
                 container_runtime=doc.get("container_runtime", NO_RUNTIME),
                 gpu_devices=doc.get("gpu_devices", NO_RUNTIME),
                 readiness=doc.get("readiness", AUTO_READINESS),
                 shared_connection=doc.get("shared_connection", NO_SHARED_CONNECTION))


def runtime_of(store_root: str | os.PathLike, name: str) -> tuple[str, str]:
    """``(container_runtime, gpu_devices)`` of the image ``name`` installed in ``store_root``.

    Reads only the world-readable profile (and stats the disk), so an ordinary user may call it.
    ImageError when ``name`` is not an image name, the image is not installed, or it is broken
    (the same checks as :func:`load`: a VM could not be made from it either).
    """
    try:
        image_name(name)
    except BadName as e:
        raise ImageError(name=repr(name), reason=str(e)) from None
    directory = Path(store_root) / name
    try:
        if not directory.is_dir():
            raise ImageError(name=name, reason=f"not installed in {store_root}")
        image = load(directory)
    except OSError as e:                         # a store this user cannot reach
        raise ImageError(name=name, reason=f"cannot read {directory}: "
                                           f"{e.strerror or e}") from None
    return image.container_runtime, image.gpu_devices


def shares_connection(store_root: str | os.PathLike, name: str) -> bool:
    """Whether the profile of image ``name`` lets a job's runs share one ssh connection
    (``shared_connection`` "yes"); False when it says no, or the image cannot be read."""
    try:
        image = load(Path(store_root) / image_name(name))
    except (BadName, ImageError, OSError):
        return False
    return image.shared_connection == "yes"


def _validate(doc, name: str) -> float:
    """Check a parsed profile for image ``name``; return its ``installed`` time. KeyError,
    TypeError or ValueError saying what is wrong."""
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ValueError(f"not a {SCHEMA} profile")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"unsupported schema_version {doc.get('schema_version')!r}")
    if doc.get("name") != name:
        raise ValueError(f"records name {doc.get('name')!r}")
    fmt = doc["format"]
    if fmt not in FORMATS or doc["disk"] != disk_file(fmt):
        raise ValueError(f"disk {doc.get('disk')!r} / format {fmt!r}")
    if (doc["kernel"], doc["initrd"]) not in ((None, None), (KERNEL_FILE, INITRD_FILE)):
        raise ValueError("kernel/initrd must be vmlinuz/initrd.img or both null")
    for key in ("virtual_size", "actual_size"):
        if not isinstance(doc[key], int) or isinstance(doc[key], bool) or doc[key] < 0:
            raise ValueError(f"{key} {doc[key]!r}")
    for key in ("version", "sha256", "source"):
        if not isinstance(doc[key], str):
            raise ValueError(f"{key} {doc[key]!r}")
    if doc.get("cmdline") is not None and not isinstance(doc["cmdline"], str):
        raise ValueError(f"cmdline {doc['cmdline']!r}")
    for key, choices in _CHOICES.items():        # optional: absent in profiles written before
        if key in doc and doc[key] not in choices:
            raise ValueError(f"{key} {doc[key]!r} is not one of {', '.join(choices)}")
    return float(doc["installed"])


_CHOICES = {"container_runtime": CONTAINER_RUNTIMES, "gpu_devices": GPU_DEVICES,
            "readiness": READINESS, "shared_connection": SHARED_CONNECTION}


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'; for tables."""
    if n < 1024:
        return f"{n} B"
    exp = min(int(math.log(n, 1024)), 4)
    return f"{n / 1024 ** exp:.1f} {'KMGT'[exp - 1]}iB"


__all__ = ["AUTO_READINESS", "BrokenImage", "CONTAINER_RUNTIMES", "DIR_MODE", "FILE_MODE", "FORMATS",
           "GPU_DEVICES", "READINESS", "INITRD_FILE", "Image", "KERNEL_FILE", "NO_RUNTIME",
           "PROFILE_FILE", "check_choice", "disk_file", "human_bytes", "load", "runtime_of", "write"]
