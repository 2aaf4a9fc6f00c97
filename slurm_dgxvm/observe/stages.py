"""The stages of a VM's create and teardown, and the one way they are timed.

A stage is one real step of :mod:`slurm_dgxvm.lifecycle.create` or ``delete``, named once here;
the VM record (``create_stages``, ``teardown_stages``), the job's AdminComment, ``dgxvm report``
and ``dgxvm metrics`` all use these names. In the order they run:

create
    ``preflight`` (libvirt reached, the name free, the image and the work dir share checked),
    ``placement`` (place and record in the ledger, the ledger lock included), ``seed`` (the VM
    directory, SSH keys, the network and the address, the NoCloud seed), ``disks`` (the OS
    overlay and the data disk), ``define`` (design the domain, write the record, define it in
    libvirt), ``fm`` (activate the Fabric Manager partition: only on machines that have one,
    absent elsewhere), ``ib`` (the InfiniBand functions' GUIDs and the job's partition key at
    the subnet manager: only for a job's VM with InfiniBand, ``partitions.NAME.ib``), ``jobnet``
    (the job fabric's devices, forwarding entries and firewall on
    this node: only for a multi-node job with ``[jobnet]`` enabled, absent otherwise),
    ``start``, ``ready`` (waiting until the guest is ready, as its image's
    ``readiness`` says).
teardown
    ``shutdown`` (the graceful, bounded shutdown), ``destroy`` (only when the guest did not stop
    within ``libvirt.shutdown_timeout_s``: absent otherwise), ``undefine``, ``reset`` (the
    Fabric Manager partition deactivated, then the VM's GPUs and, in full passthrough, its
    NVSwitches reset in parallel and checked, a failing one quarantined:
    :mod:`slurm_dgxvm.health`; absent for a VM without GPUs), ``release`` (the job's partition
    key and fabric on this node, address, VM directory, ledger).

A stage that is not run is absent, never 0.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

CREATE_STAGES = ("preflight", "placement", "seed", "disks", "define", "fm", "ib", "jobnet",
                 "start", "ready")
TEARDOWN_STAGES = ("shutdown", "destroy", "undefine", "reset", "release")
#: op -> its stages in the order they run
STAGES = {"create": CREATE_STAGES, "teardown": TEARDOWN_STAGES}


class StageTimer:
    """Seconds per stage, measured with a monotonic clock around each real step.

    >>> t = StageTimer()
    >>> with t.stage("placement"):
    ...     pass
    >>> list(t.seconds())
    ['placement']

    A stage entered twice adds up. A step that raises still has its time taken, and the timer
    remembers it as :attr:`failed`: :meth:`seconds` has every stage reached, the failed one
    included (how long it ran before it failed), :meth:`completed` only those that finished.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._times: dict[str, float] = {}
        self.failed: str | None = None

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = self._clock()
        try:
            yield
        except BaseException:
            self.failed = name
            raise
        finally:
            self._times[name] = self._times.get(name, 0.0) + (self._clock() - start)

    def seconds(self) -> dict[str, float]:
        """Every stage reached, in the order first entered, in seconds rounded to the ms."""
        return {name: round(s, 3) for name, s in self._times.items()}

    def completed(self) -> dict[str, float]:
        """:meth:`seconds` without the stage that failed."""
        return {k: v for k, v in self.seconds().items() if k != self.failed}


def ordered(stages: dict[str, float], op: str) -> list[tuple[str, float]]:
    """``stages`` in the order ``op`` runs them; names this version does not know follow,
    sorted (a record written by a later dgxvm)."""
    known = STAGES[op]
    return ([(k, stages[k]) for k in known if k in stages]
            + sorted((k, v) for k, v in stages.items() if k not in known))
