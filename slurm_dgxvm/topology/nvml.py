"""What NVML can add to sysfs: Fabric Manager module ids and active NVLink counts.

Optional: nvidia-ml-py may be missing, the driver may be absent, and on a VM host the GPUs are
bound to vfio-pci so NVML sees none of them. Every such case is a note, never an error.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NvmlGpu:
    pci: str                  # normalised "0000:34:00.0"
    module_id: int | None
    active_nvlinks: int


@dataclass(frozen=True)
class NvmlFacts:
    gpus: tuple[NvmlGpu, ...]
    note: str


def _norm_bus_id(bus_id: str | bytes) -> str:
    if isinstance(bus_id, bytes):
        bus_id = bus_id.decode()
    # NVML reports "00000000:34:00.0" (8-digit domain); sysfs uses 4 digits.
    domain, rest = bus_id.lower().split(":", 1)
    return f"{int(domain, 16):04x}:{rest}"


def query() -> NvmlFacts:
    """Ask NVML, if it is there. Never raises."""
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return NvmlFacts((), "NVML: nvidia-ml-py not installed; NVLink facts from the catalog")
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return NvmlFacts((), f"NVML: unavailable ({exc}); NVLink facts from the catalog")
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            pci = _norm_bus_id(pynvml.nvmlDeviceGetPciInfo(h).busId)
            module = None
            if hasattr(pynvml, "nvmlDeviceGetModuleId"):
                try:
                    module = int(pynvml.nvmlDeviceGetModuleId(h))
                except Exception:  # noqa: BLE001 - no module id from this driver
                    module = None
            links = 0
            for link in range(getattr(pynvml, "NVML_NVLINK_MAX_LINKS", 18)):
                try:
                    if pynvml.nvmlDeviceGetNvLinkState(h, link) == pynvml.NVML_FEATURE_ENABLED:
                        links += 1
                except Exception:  # noqa: BLE001 - a link NVML cannot report ends the count
                    break
            out.append(NvmlGpu(pci, module, links))
        return NvmlFacts(tuple(out), f"NVML: {len(out)} GPU(s) visible to the driver")
    except Exception as exc:  # noqa: BLE001 - any NVML failure: the catalog's facts
        return NvmlFacts((), f"NVML: query failed ({exc})")
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001 - a failed shutdown changes nothing
            pass
