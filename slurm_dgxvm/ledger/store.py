"""The ledger on disk: :class:`Ledger` reads ``<state_dir>/ledger.json`` without a lock, and
writes it in a transaction under ``ledger.lock`` (the package's docstring says how and why).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from slurm_dgxvm import fsutil
from slurm_dgxvm.errors import LedgerCorrupt, LedgerError, LedgerLockTimeout

from .document import (DEFAULT_LOCK_TIMEOUT, DIR_MODE, EMPTY_STATE, FILE_MODE, LEDGER_FILE,
                       LOCK_FILE, Allocation, LedgerState, LedgerTxn, parse_document,
                       salvaged_generation)

log = logging.getLogger("dgxvm.ledger")

LOCK_POLL_S = 0.002


@dataclass
class TxnTimes:
    """Where one transaction's time went (seconds), for benchmarks: the lock's wait and hold,
    and inside the hold: reading the document (``parsed``: whether it had to be parsed then),
    the caller's block, encoding the new document, and its write (``write``: None when nothing
    was written). The rest of the hold is bookkeeping and the lock's release."""

    lock: fsutil.LockTimes = field(default_factory=fsutil.LockTimes)
    read_s: float | None = None
    parsed: bool | None = None
    body_s: float | None = None
    encode_s: float | None = None
    write: fsutil.WriteTimes | None = None


class Ledger:
    """The ledger in ``state_dir``. Cheap to construct; touches the disk only when used.

    ``lock_timeout`` (seconds) bounds the wait for the lock; past it a transaction raises
    :class:`LedgerLockTimeout`. Transactions must not be nested (the inner one would wait for the
    outer one's lock and time out).
    """

    def __init__(self, state_dir: str | os.PathLike[str],
                 lock_timeout: float = DEFAULT_LOCK_TIMEOUT):
        if isinstance(lock_timeout, bool) or not isinstance(lock_timeout, (int, float)) \
                or lock_timeout < 0:
            raise ValueError(f"lock_timeout must be a non-negative number, got {lock_timeout!r}")
        self.state_dir = os.fspath(state_dir)
        self.path = os.path.join(self.state_dir, LEDGER_FILE)
        self.lock_path = os.path.join(self.state_dir, LOCK_FILE)
        self.lock_timeout = float(lock_timeout)
        self._times = TxnTimes()                   # of the last transaction
        # the bytes of the last document this instance read or wrote, and what they say
        self._known: tuple[bytes, LedgerState] | None = None

    def __repr__(self) -> str:
        return f"Ledger({self.state_dir!r}, lock_timeout={self.lock_timeout})"

    # reading ------------------------------------------------------------------------------------
    def read(self) -> LedgerState:
        """The current ledger, without taking the lock (writes are atomic renames, so the file
        opened is always one complete version). A missing file is an empty ledger.

        The file is read every time; only its parse is reused, when its bytes are exactly those
        this instance last read or wrote (the state is a pure function of the bytes)."""
        return self._load()[0]

    def _load(self) -> tuple[LedgerState, bool]:
        """The current ledger, and whether its bytes had to be parsed (False: a missing file, or
        the bytes of the last document this instance read or wrote)."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return EMPTY_STATE, False
        except OSError as e:
            raise LedgerError(path=self.path, reason=f"cannot read: {e.strerror or e}") from e
        known = self._known
        if known is not None and known[0] == raw:
            return known[1], False
        state = parse_document(raw, self.path, known=known[1] if known is not None else None)
        self._known = (raw, state)
        return state, True

    # writing ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self) -> Iterator[LedgerTxn]:
        """Lock, load, yield a :class:`LedgerTxn`; on normal exit write if anything changed.

        An exception in the block writes nothing and propagates. A corrupt ledger raises
        :class:`LedgerCorrupt` before the block runs.
        """
        self._ensure_dir()
        self._times = times = TxnTimes()
        clock = time.perf_counter
        txn: LedgerTxn | None = None
        # Parse the document now, before the lock: under it, the same bytes are only compared
        # (and when another writer got in first, its records that this parse already checked
        # are not built again). What counts is still what is read under the lock; a corrupt or
        # unreadable ledger is reported there.
        with contextlib.suppress(LedgerError):
            self._load()
        fsutil.sweep_dead_temps(self.path)
        with contextlib.ExitStack() as stack:
            # The temp file of the write, made and fsynced before the lock: that fsync commits
            # what the filesystem had pending from everyone else, which the write's own fsync
            # would otherwise wait for under the lock (fsutil.pending_write). Not possible here
            # (a read-only state dir): the write, if any, makes its own, as before.
            try:
                pending = stack.enter_context(fsutil.pending_write(self.path, mode=FILE_MODE))
            except OSError:
                pending = None
            # fsutil.locked polls; its default 50 ms poll would make 16 concurrent prologs queue
            # for up to a second behind critical sections of ~2 ms each.
            stack.enter_context(fsutil.locked(
                self.lock_path, timeout=self.lock_timeout, poll_s=LOCK_POLL_S, mode=FILE_MODE,
                times=times.lock,
                timed_out=lambda: LedgerLockTimeout(path=self.lock_path,
                                                    timeout=self.lock_timeout),
                failed=lambda e: LedgerError(path=self.lock_path,
                                             reason=f"cannot lock: {e.strerror or e}")))
            try:
                t0 = clock()
                base, times.parsed = self._load()
                txn = LedgerTxn(base)
                times.read_s = clock() - t0
                t0 = clock()
                yield txn
                times.body_s = clock() - t0
                txn._open = False
                if txn.changed:
                    self._write(txn._result(), times, pending)
            finally:
                if txn is not None:
                    txn._open = False

    @property
    def last_lock_wait_s(self) -> float | None:
        """Seconds the last transaction waited for the lock (None before the first)."""
        return self._times.lock.waited_s

    @property
    def last_held_s(self) -> float | None:
        """Seconds the last transaction held the lock, acquired -> released (None before the
        first, during one, and after a lock time-out)."""
        return self._times.lock.held_s

    @property
    def last_times(self) -> TxnTimes:
        """Where the last transaction's time went (:class:`TxnTimes`; all None before the
        first)."""
        return self._times

    def allocate(self, allocation: Allocation) -> Allocation:
        """Record one allocation in its own transaction (see :meth:`LedgerTxn.allocate`)."""
        with self.transaction() as txn:
            return txn.allocate(allocation)

    def release(self, key: str) -> Allocation | None:
        """Release one key in its own transaction (see :meth:`LedgerTxn.release`)."""
        with self.transaction() as txn:
            return txn.release(key)

    # a corrupt ledger ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the ledger's lock for the block without reading the ledger (it may be corrupt):
        :meth:`replace_corrupt` is called inside it."""
        self._ensure_dir()
        with fsutil.locked(self.lock_path, timeout=self.lock_timeout, poll_s=LOCK_POLL_S,
                           mode=FILE_MODE,
                           timed_out=lambda: LedgerLockTimeout(path=self.lock_path,
                                                               timeout=self.lock_timeout),
                           failed=lambda e: LedgerError(path=self.lock_path,
                                                        reason=f"cannot lock: {e.strerror or e}")):
            yield

    def replace_corrupt(self, state: LedgerState, *, now: float | None = None) -> str:
        """Replace a corrupt ledger with ``state``; return where the corrupt file was kept.

        Only inside :meth:`locked`, and only for a ledger that is corrupt now (LedgerError
        otherwise: one that parses is never replaced). The corrupt file is first given a second
        name, ``ledger.json.corrupt-<UTC time>`` (made durable), then the new document is
        written atomically over ``ledger.json`` with the next generation the corrupt one
        names, if any can be read. Never a reset by accident: ``dgxvm reconcile
        --rebuild-ledger`` calls it, saying what it wrote.
        """
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise LedgerError(path=self.path, reason="there is no ledger to replace") from None
        except OSError as e:
            raise LedgerError(path=self.path, reason=f"cannot read: {e.strerror or e}") from e
        try:
            parse_document(raw, self.path)
        except LedgerCorrupt:
            pass
        else:
            raise LedgerError(path=self.path, reason="it is not corrupt: not replaced")
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
        aside = f"{self.path}.corrupt-{stamp}"
        n = 1
        while os.path.lexists(aside):
            n += 1
            aside = f"{self.path}.corrupt-{stamp}-{n}"
        try:
            os.link(self.path, aside)
            fsutil.fsync_dir(self.state_dir)
        except OSError as e:
            raise LedgerError(path=aside, reason=f"cannot keep the corrupt ledger aside: "
                                                 f"{e.strerror or e}") from e
        self._write(LedgerState(generation=salvaged_generation(raw) + 1,
                                allocations=state.allocations))
        log.warning("ledger %s was corrupt: rebuilt with %d allocation(s), the corrupt file "
                    "kept as %s", self.path, len(state.allocations), aside)
        return aside

    # internals ----------------------------------------------------------------------------------
    def _ensure_dir(self) -> None:
        if os.path.isdir(self.state_dir):
            return
        try:
            os.makedirs(self.state_dir, mode=DIR_MODE, exist_ok=True)
            os.chmod(self.state_dir, DIR_MODE)  # mode= is filtered by the umask
        except OSError as e:
            raise LedgerError(path=self.state_dir,
                              reason=f"cannot create state dir: {e.strerror or e}") from e

    def _write(self, state: LedgerState, times: TxnTimes | None = None,
               pending: fsutil.PendingWrite | None = None) -> None:
        """Atomically replace the ledger file with ``state`` (:func:`fsutil.atomic_write`, or
        the ``pending`` one's commit)."""
        t0 = time.perf_counter()
        data = state.encode()
        write_times = None
        if times is not None:
            times.encode_s = time.perf_counter() - t0
            times.write = write_times = fsutil.WriteTimes()
        try:
            if pending is not None:
                pending.commit(data, times=write_times)
            else:
                fsutil.atomic_write(self.path, data, mode=FILE_MODE, times=write_times)
        except OSError as e:
            raise LedgerError(path=self.path, reason=f"cannot write: {e.strerror or e}") from e
        self._known = (data, state)
