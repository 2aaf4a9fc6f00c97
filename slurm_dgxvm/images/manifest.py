"""Where an install comes from: a disk image file, or a builder manifest naming one.

A **manifest** is a ``*.json`` file, or a directory holding ``manifest.json``, with keys
``name``, ``version``, ``disk``, ``kernel``, ``initrd``, ``cmdline`` (paths relative to the
manifest; only ``disk`` is required; an optional ``sha256`` of the disk is verified after the
copy), and the image's container runtime, ``container_runtime`` (one of
:data:`.profile.CONTAINER_RUNTIMES`) and ``gpu_devices`` (:data:`.profile.GPU_DEVICES`), both
optional and checked here. :func:`resolve_source` turns what was given into a :class:`Source`.

Version of an image: ``--version`` if given; else the ``version`` of the source manifest (or of
a ``manifest.json`` next to the disk that describes it, :func:`sibling_version`); else the
first 12 hex digits of the disk's sha256.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ImageError
from .profile import check_choice
from .sniff import regular_readable

log = logging.getLogger("dgxvm.images")

MANIFEST_FILE = "manifest.json"
CMDLINE_LIMIT = 4096
VERSION_LIMIT = 128
NAME_LIMIT = 63


@dataclass(frozen=True)
class Source:
    """What to install: absolute paths of the files, and what a manifest said about them."""

    disk: Path
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str | None = None
    version: str | None = None
    name: str | None = None
    sha256: str | None = None
    manifest: Path | None = None
    container_runtime: str | None = None    # None: the manifest did not say
    gpu_devices: str | None = None
    readiness: str | None = None
    shared_connection: str | None = None


def one_line(value: Any, what: str, where: str, *, limit: int) -> str | None:
    """``value`` stripped, or None when absent or blank; ImageError (naming ``where``) unless
    it is one line of at most ``limit`` characters. A number is taken as a ``version``."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and what == "version":
        value = str(value)
    if not isinstance(value, str):
        raise ImageError(name=where, reason=f"{what} must be a string, not {value!r}")
    value = value.strip()
    if not value:
        return None
    if len(value) > limit or any(ord(c) < 32 for c in value):
        raise ImageError(name=where, reason=f"{what} must be one line of at most {limit} "
                                            f"characters")
    return value


def resolve_source(src: str | os.PathLike, *, kernel: str | os.PathLike | None = None,
                   initrd: str | os.PathLike | None = None) -> Source:
    """The Source for ``src`` (a disk file, a manifest, or a directory with ``manifest.json``).

    ``kernel``/``initrd`` given here replace the manifest's pair (both of them, even when only
    one is given: the install then refuses the lone one).
    """
    source = _resolve(src)
    if kernel is not None or initrd is not None:
        source = dataclasses.replace(source, kernel=_opt_path(kernel), initrd=_opt_path(initrd))
    return source


def _resolve(src: str | os.PathLike) -> Source:
    p = Path(src).expanduser().absolute()
    if p.is_dir():
        if not (p / MANIFEST_FILE).is_file():
            raise ImageError(name=str(p), reason=f"a directory without {MANIFEST_FILE}; give the "
                                                 f"disk file or the manifest")
        return _source_from_manifest(p / MANIFEST_FILE)
    if p.suffix.lower() == ".json":
        regular_readable(p, "manifest")
        return _source_from_manifest(p)
    return Source(disk=p)


def _opt_path(p: str | os.PathLike | None) -> Path | None:
    return None if p is None else Path(p).expanduser().absolute()


def _read_manifest(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except OSError as e:
        raise ImageError(name=str(path), reason=f"manifest: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ImageError(name=str(path), reason=f"manifest is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ImageError(name=str(path), reason="manifest must be a JSON object")
    return doc


def _source_from_manifest(path: Path) -> Source:
    """A builder manifest: ``{"name", "version", "disk", "kernel", "initrd", "cmdline"}``.

    ``disk`` is required; paths are relative to the manifest's directory (absolute ones are
    taken as they are); ``kernel`` and ``initrd`` come together or not at all; an optional
    ``sha256`` of the disk is verified after the copy; ``container_runtime``,
    ``gpu_devices``, ``readiness`` and ``shared_connection``, when present (not null), must be
    values the profile
    knows. Other keys are
    ignored.
    """
    doc = _read_manifest(path)
    where = str(path)

    def rel(key: str) -> Path | None:
        value = doc.get(key)
        if value in (None, ""):
            return None
        if not isinstance(value, str):
            raise ImageError(name=where, reason=f"manifest {key} must be a path, not {value!r}")
        return (path.parent / value).absolute()

    disk = rel("disk")
    if disk is None:
        raise ImageError(name=where, reason="manifest has no disk")
    sha = one_line(doc.get("sha256"), "sha256", where, limit=80)
    if sha is not None:
        sha = sha.lower().removeprefix("sha256:")
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise ImageError(name=where, reason=f"manifest sha256 {sha!r} is not a sha256")
    runtime = {key: check_choice(doc[key], key, where, label=f"manifest {key}")
               for key in ("container_runtime", "gpu_devices", "readiness", "shared_connection")
               if doc.get(key) is not None}
    return Source(disk=disk, kernel=rel("kernel"), initrd=rel("initrd"),
                  cmdline=one_line(doc.get("cmdline"), "cmdline", where, limit=CMDLINE_LIMIT),
                  version=one_line(doc.get("version"), "version", where, limit=VERSION_LIMIT),
                  name=one_line(doc.get("name"), "name", where, limit=NAME_LIMIT),
                  sha256=sha, manifest=path, **runtime)


def sibling_version(disk: Path) -> str | None:
    """The ``version`` of a ``manifest.json`` next to ``disk`` that describes ``disk``.

    Used only when the manifest names no disk or names this one (a directory of several images
    with one manifest must not label them all). A sibling manifest that does not parse is
    ignored with a warning: the disk was named directly, the manifest is only a hint.
    """
    path = disk.parent / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        doc = _read_manifest(path)
        named = doc.get("disk")
        if named and (path.parent / str(named)).absolute() != disk:
            return None
        return one_line(doc.get("version"), "version", str(path), limit=VERSION_LIMIT)
    except ImageError as e:
        log.warning("ignoring %s: %s", path, e)
        return None


__all__ = ["CMDLINE_LIMIT", "MANIFEST_FILE", "Source", "VERSION_LIMIT", "one_line",
           "resolve_source", "sibling_version"]
