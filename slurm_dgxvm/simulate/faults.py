"""Inject GPU faults into a simulated sysfs tree (``dgxvm simulate --fault GPU:KIND``).

A fault changes the files a GPU health module reads (:mod:`.signals`, through
:class:`~slurm_dgxvm.topology.sysfs.SysfsRoot`) the way a real host shows that fault for a GPU
bound to vfio-pci. Only a tree holding the simulation marker (``.dgxvm-simulated``) is ever
changed, never a real ``/sys``; every injection is appended to the marker's ``"faults"`` list
(``{"gpu": bdf, "kind": kind, "at": UTC ISO time}``) so that every output can say it is simulated.

A GPU is named by its PCI address (``0000:43:00.0``, ``43:00.0``) or by its index: its position
among the GPUs present on the bus in PCI order, the way topology discovery numbers them (a GPU
made ``missing`` has no index, and those after it move down one; name it by address to clear it).

Kinds, and what a real GPU shows:

``fell-off-bus``
    ``config`` reads all ones (vendor id ``0xffff``): the device no longer answers config reads,
    what a GPU that has "fallen off the bus" (Xid 79) returns. The ``vendor``/``device``/``class``
    attributes keep their values, as on a real host, where the kernel caches them.
``aer-fatal``
    ``aer_dev_fatal``: ``MalfTLP`` and ``TOTAL_ERR_FATAL`` each go up by one (an uncorrectable
    error of fatal severity; MalfTLP is fatal by the PCIe default severities [INF: the bucket]).
``aer-nonfatal``
    ``aer_dev_nonfatal``: ``CmpltTO`` and ``TOTAL_ERR_NONFATAL`` go up by one (a completion
    timeout, non-fatal by default: the GPU asked and nothing answered [INF: the bucket]).
``aer-correctable``
    ``aer_dev_correctable``: ``RxErr`` and ``TOTAL_ERR_COR`` go up by one (a receiver error the
    link corrected [INF: the bucket]). Correctable errors happen on healthy links: this signal
    alone should not quarantine a GPU.
``reset-fail``
    ``reset`` becomes a directory, so writing ``1`` to it fails with an OSError (EISDIR): a reset
    the kernel refuses. (A real refusal is another errno, e.g. ENOTTY or EIO: a reader must treat
    any OSError from the write as a failed reset.)
``reset-hang``
    ``reset`` becomes a FIFO with no reader, so opening it for writing blocks: a reset that never
    returns. The reader of these files must bound its wait (open and write in a thread or child
    process with a timeout). Opening it for reading blocks as well: tools that read every file of
    the tree (``grep -r``) hang on it, and ``shutil.copytree`` refuses it.
``missing``
    The device leaves the bus: its ``sys/bus/pci/devices/<bdf>`` link goes, and so do its
    driver's link (``sys/bus/pci/drivers/vfio-pci/<bdf>``) and its IOMMU group's
    (``sys/kernel/iommu_groups/<n>/devices/<bdf>``), as after a surprise removal. Its directory
    under ``sys/devices`` stays (a real one goes too) so that ``clear`` can put it back.
``clear``
    Undoes every fault on that GPU: ``config`` rewritten from the device's attributes, ``reset``
    an empty regular file again, the links back. AER counters keep their values: they only ever
    grow on a real host (until a reboot).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ..errors import SimulateError
from ..topology import sysfs as S
from . import signals as SIG

#: every fault kind, in the order the docs list them
KINDS = ("fell-off-bus", "aer-fatal", "aer-nonfatal", "aer-correctable", "reset-fail",
         "reset-hang", "missing", "clear")
#: AER kinds -> (counter file basename, the bucket that goes up)
AER_KINDS = {
    "aer-fatal": (SIG.AER_FATAL, "MalfTLP"),
    "aer-nonfatal": (SIG.AER_NONFATAL, "CmpltTO"),
    "aer-correctable": (SIG.AER_CORRECTABLE, "RxErr"),
}
_SHORT_BDF_RE = re.compile(r"^[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
_NVIDIA = "0x10de"


@dataclass(frozen=True)
class _Gpu:
    bdf: str
    dir: Path                       # its directory under sys/devices
    present: bool                   # its sys/bus/pci/devices link exists


def inject(root: str | os.PathLike, gpu: str | int, kind: str) -> dict:
    """Apply fault ``kind`` to GPU ``gpu`` (index or PCI address) of the simulated tree ``root``.

    Returns the record appended to the marker's ``"faults"``: ``{"gpu": bdf, "kind": kind,
    "at": ...}``. Raises SimulateError for a root without the simulation marker (naming the
    path), an unknown kind or GPU (naming it and listing the valid ones), a fault other than
    ``missing``/``clear`` on a GPU that is missing from the bus, or a tree file that cannot be
    read or changed (naming the file).
    """
    root = Path(root)
    check_kind(kind)
    marker_path = _check_root(root)
    with _locked(root):
        marker = _read_marker(marker_path)
        g = _resolve(root, gpu)
        if not g.present and kind not in ("missing", "clear"):
            raise SimulateError(reason=f"GPU {g.bdf} is missing from the bus (a 'missing' fault): "
                                       f"only 'clear' applies to it", value=gpu)
        try:
            _APPLY[kind](root, g)
        except OSError as exc:
            raise SimulateError(reason=f"{kind} on GPU {g.bdf}: {exc}", value=gpu) from exc
        record = {"gpu": g.bdf, "kind": kind,
                  "at": datetime.now(UTC).isoformat(timespec="seconds")}
        marker.setdefault("faults", []).append(record)
        _write_marker(marker_path, marker)
    return record


def inject_all(root: str | os.PathLike, faults: Iterable[tuple[str | int, str]]) -> list[dict]:
    """Apply ``(gpu, kind)`` pairs in order, every GPU index counted on the tree as it is before
    the first (``1:missing`` then ``2:aer-fatal`` hits the GPU that was 2, not the one that moved
    down to 2). Checks every kind and GPU before changing anything; returns the records."""
    root = Path(root)
    faults = list(faults)
    for _, kind in faults:
        check_kind(kind)
    _check_root(root)
    resolved = [(_resolve(root, gpu).bdf, kind) for gpu, kind in faults]
    return [inject(root, bdf, kind) for bdf, kind in resolved]


def parse_fault(text: str) -> tuple[str, str]:
    """``"GPU:KIND"`` -> ``(gpu, kind)``: GPU an index or a PCI address (whose own colons stay:
    the kind is after the last one). SimulateError naming the text for a malformed one or an
    unknown kind (the GPU is checked against a tree by :func:`inject`)."""
    gpu, sep, kind = str(text).strip().rpartition(":")
    if not sep or not gpu or not kind:
        raise SimulateError(reason=f"fault {text!r} is not GPU:KIND (e.g. 0:fell-off-bus or "
                                   f"0000:43:00.0:aer-fatal)", value=text)
    check_kind(kind, text)
    return gpu, kind


# -- checks ----------------------------------------------------------------------------------------
def check_kind(kind: str, text: str | None = None) -> None:
    """SimulateError naming ``kind`` (and the ``text`` it came from) unless it is one of KINDS."""
    if kind not in KINDS:
        what = f"fault kind {kind!r}" + (f" in {text!r}" if text is not None else "")
        raise SimulateError(reason=f"unknown {what} (kinds: {', '.join(KINDS)})",
                            value=text if text is not None else kind)


def _check_root(root: Path) -> Path:
    marker = root / S.SIMULATED_MARKER
    if not root.is_dir() or not marker.is_file() or root.resolve() == Path("/"):
        raise SimulateError(reason=f"{str(root)!r} is not a simulated tree (no {S.SIMULATED_MARKER} "
                                   f"marker): faults go only into the output of dgxvm simulate, "
                                   f"never into a real /sys", value=str(root))
    return marker


def _read_marker(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SimulateError(reason=f"cannot read the marker {str(path)!r}: {exc}",
                            value=str(path)) from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("faults", []), list):
        raise SimulateError(reason=f"the marker {str(path)!r} is not a simulation marker",
                            value=str(path))
    return doc


def _write_marker(path: Path, doc: dict) -> None:
    _write_atomic(path, (json.dumps(doc, indent=2) + "\n").encode())


@contextlib.contextmanager
def _locked(root: Path):
    """One injection at a time per tree (the marker is read, changed and replaced)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# -- which GPU -------------------------------------------------------------------------------------
def _device_dirs(root: Path) -> dict[str, Path]:
    """Every PCI device directory under sys/devices/pci*, present on the bus or not."""
    found: dict[str, Path] = {}
    top = root / "sys/devices"
    if not top.is_dir():
        return found
    real_root = os.path.realpath(root)
    for host_bridge in sorted(top.iterdir()):
        if not host_bridge.name.startswith("pci") or host_bridge.is_symlink():
            continue
        for dirpath, dirnames, _ in os.walk(host_bridge):
            for name in dirnames:
                p = Path(dirpath) / name
                if S.BDF_RE.match(name) and not p.is_symlink():
                    found[name] = p
            dirnames[:] = [n for n in dirnames if not (Path(dirpath) / n).is_symlink()]
    # a tree whose directories resolve outside the root is not ours to change
    return {b: p for b, p in found.items()
            if os.path.realpath(p).startswith(real_root + os.sep)}


def _gpus(root: Path) -> list[_Gpu]:
    gpus = []
    for bdf, d in sorted(_device_dirs(root).items()):
        try:
            vendor = (d / "vendor").read_text().strip().lower()
            cls = int((d / "class").read_text().strip(), 16)
        except (OSError, ValueError):
            continue
        if vendor == _NVIDIA and cls >> 16 == 0x03:
            gpus.append(_Gpu(bdf, d, os.path.lexists(root / S.PCI_DEVICE.format(bdf=bdf))))
    return gpus


def _resolve(root: Path, gpu: str | int) -> _Gpu:
    gpus = _gpus(root)
    present = [g for g in gpus if g.present]
    text = str(gpu).strip().lower()
    if text.isdigit():
        if int(text) < len(present):
            return present[int(text)]
    else:
        bdf = "0000:" + text if _SHORT_BDF_RE.match(text) else text
        for g in gpus:
            if g.bdf == bdf:
                return g
    listing = ", ".join(f"{i}={g.bdf}" for i, g in enumerate(present)) or "none"
    gone = [g.bdf for g in gpus if not g.present]
    if gone:
        listing += f"; missing from the bus (by address): {', '.join(gone)}"
    raise SimulateError(reason=f"unknown GPU {gpu!r} in {str(root)!r} (GPUs by index or PCI "
                               f"address: {listing})", value=gpu)


# -- the faults ------------------------------------------------------------------------------------
def _fell_off_bus(root: Path, g: _Gpu) -> None:
    _write_atomic(g.dir / SIG.CONFIG, SIG.FELL_OFF_BUS_CONFIG)


def _aer(kind: str):
    name, bucket = AER_KINDS[kind]

    def apply(root: Path, g: _Gpu) -> None:
        path = g.dir / name
        try:
            counts = SIG.parse_aer(path.read_text())
        except ValueError as exc:
            raise SimulateError(reason=f"{str(path)!r}: {exc}", value=str(path)) from None
        total = SIG.AER_FILES[name][1]
        counts[bucket] = counts.get(bucket, 0) + 1
        counts[total] = counts.get(total, 0) + 1
        lines = [f"{n} {c}" for n, c in counts.items() if n != total] + [f"{total} {counts[total]}"]
        _write_atomic(path, ("\n".join(lines) + "\n").encode())
    return apply


def _reset_fail(root: Path, g: _Gpu) -> None:
    path = g.dir / SIG.RESET
    _remove(path)
    path.mkdir()


def _reset_hang(root: Path, g: _Gpu) -> None:
    path = g.dir / SIG.RESET
    _remove(path)
    os.mkfifo(path, 0o600)


def _missing(root: Path, g: _Gpu) -> None:
    for link in _views(root, g):
        if os.path.lexists(link):
            link.unlink()


def _clear(root: Path, g: _Gpu) -> None:
    _write_atomic(g.dir / SIG.CONFIG, _healthy_config(g.dir))
    reset = g.dir / SIG.RESET
    if os.path.lexists(reset) or (g.dir / SIG.RESET_METHOD).exists():
        if not (reset.is_file() and not reset.is_symlink()):
            _remove(reset)
        reset.write_bytes(b"")
    for link in _views(root, g):
        if not os.path.lexists(link):
            link.symlink_to(os.path.relpath(g.dir, link.parent))


_APPLY = {"fell-off-bus": _fell_off_bus, "reset-fail": _reset_fail, "reset-hang": _reset_hang,
          "missing": _missing, "clear": _clear, **{k: _aer(k) for k in AER_KINDS}}


# -- helpers ---------------------------------------------------------------------------------------
def _views(root: Path, g: _Gpu) -> list[Path]:
    """The links through which the kernel shows the device: the bus's, its driver's, its group's."""
    links = [root / S.PCI_DEVICE.format(bdf=g.bdf)]
    real_root = os.path.realpath(root)
    for attr, under in (("driver", ""), ("iommu_group", "devices")):
        link = g.dir / attr
        if link.is_symlink():
            target = os.path.normpath(os.path.join(g.dir, os.readlink(link)))
            if os.path.realpath(target).startswith(real_root + os.sep):   # never outside the tree
                links.append(Path(target, under, g.bdf))
    return links


def _healthy_config(d: Path) -> bytes:
    def attr(name: str, default: int | None = None) -> int:
        path = d / name
        if default is not None and not path.exists():
            return default
        text = path.read_text().strip()
        try:
            return int(text, 16)
        except ValueError:
            raise SimulateError(reason=f"{str(path)!r}: expected a hex number, found {text!r}",
                                value=str(path)) from None
    prefix = d.name[:-2]                               # "0000:61:00" of "0000:61:00.1"
    functions = [n for n in os.listdir(d.parent) if S.BDF_RE.match(n) and n[:-2] == prefix]
    return SIG.config_space(vendor=attr("vendor"), device=attr("device"),
                            revision=attr("revision", 0), class_code=attr("class"),
                            subsystem_vendor=attr("subsystem_vendor"),
                            subsystem_device=attr("subsystem_device"),
                            multifunction=len(functions) > 1)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
