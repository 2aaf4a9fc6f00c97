"""Host topology: what the machine is made of (sysfs + NVML + the machine catalog)."""

from .discover import discover
from .model import (FULL_PASSTHROUGH, NO_NVSWITCH, SHARED_NVSWITCH, Core, Gpu, GpuBlock, Host,
                    MissingGpu, Nic, NumaNode, NvSwitch, VirtualFunction)
from .sysfs import SysfsRoot

__all__ = ["discover", "SysfsRoot", "Host", "Gpu", "GpuBlock", "Core", "NumaNode", "NvSwitch",
           "Nic", "VirtualFunction", "MissingGpu", "FULL_PASSTHROUGH", "SHARED_NVSWITCH", "NO_NVSWITCH"]
