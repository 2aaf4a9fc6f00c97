"""GPU and NVSwitch health: what the host sees of a passed-through device (:mod:`.probe`), its
reset (:mod:`.reset`), the verdict (:mod:`.policy`), the quarantine record (:mod:`.store`) and the
checks that tie them together (:mod:`.device_checks`). Used by the lifecycle (after every VM, before
every launch) and by ``dgxvm gpu`` / ``dgxvm health``."""

from .device_checks import CheckResult, check
from .policy import Verdict, judge
from .probe import AerCounts, DeviceFacts, probe
from .reset import ResetResult, reset_devices
from .store import DeviceHealth, HealthStore

__all__ = ["AerCounts", "CheckResult", "DeviceFacts", "DeviceHealth", "HealthStore",
           "ResetResult", "Verdict", "check", "judge", "probe", "reset_devices"]
