"""The node-local allocation ledger: which job or domain holds which physical resources.

Slurm's gres/gpu is only the admission *count*; this ledger is the authority for *which* physical
GPUs, NVSwitches, host CPUs, memory (MiB per NUMA node) and Fabric Manager partitions a VM holds
(DESIGN.md, decision 1). Prologs of different jobs run concurrently on one node, and admins run
``dgxvm create`` by hand, so every read-modify-write goes through one file lock and one JSON file:

    <state_dir>/ledger.json   the document (mode 0644: ``dgxvm list`` / status read it unprivileged)
    <state_dir>/ledger.lock   the lock file (:func:`fsutil.locked`) that serialises writers

Decisions that live here:

* **Atomic replace, not in-place writes.** A new document is written with
  :func:`fsutil.atomic_write`: a temporary file in the same directory, flushed and fsync'ed, then
  ``os.replace``'d over ``ledger.json`` and the directory fsync'ed. A crash (or a killed Prolog)
  therefore leaves either the old or the new document, never a mix, and readers
  (``Ledger.read``) need no lock: a rename is atomic, so any open() sees one complete version.
  A transaction makes (and fsyncs) its temp file before it takes the lock
  (:func:`fsutil.pending_write`), so that under the lock its fsyncs carry its own change and not
  what the rest of the node left pending in the filesystem's journal; the temp file of a
  transaction that writes nothing is removed. A process SIGKILLed while it waits for the lock
  leaves its empty ``.ledger.json.<pid>.*.tmp`` behind: the next transaction removes the temp
  files of writers that are dead (:func:`fsutil.sweep_dead_temps`); no reader opens those
  names.
* **A checksum over the allocations.** The rename protects against torn writes by *us*; the
  checksum (sha256 of the canonical JSON of ``allocations``) catches everything else: a hand
  edit, a partial copy back from a backup, a filesystem that lost data. A ledger that lies is
  worse than no ledger — it would hand one GPU to two VMs — so a mismatch is corruption.
* **One serialisation per record.** The file holds the document one allocation per line, each
  record in exactly the canonical JSON the checksum is computed over, so a record is serialised
  once for both, and a record a transaction keeps is not serialised again (its text, from the
  parse or the write that made it, is reused). Any JSON layout of the same document reads the
  same (a hand-written ``indent=2`` file is fine).
* **Corruption stops the node, it is never "repaired".** Invalid JSON, a wrong format or version,
  a checksum mismatch, a malformed record, one resource held twice inside the file, or an empty
  (0-byte) file (a torn write by something that did not use this module) raise
  :class:`~slurm_dgxvm.errors.LedgerCorrupt`; the file is left exactly as it is for an admin to
  inspect, and ``transaction()`` refuses to proceed. Resetting it would silently forget VMs that
  are running.
* **Conflicts are explicit.** Recording a key twice, or any GPU (by PCI address), NVSwitch, host
  CPU or FM partition that another allocation holds, raises
  :class:`~slurm_dgxvm.errors.LedgerConflict` naming the resource and its holder. Nothing is ever
  overwritten. Memory is *not* exclusive: it is a quantity, the ledger only sums it
  (:meth:`Occupancy.union`) and placement checks it against the node's capacity.
* **Writes only when something changed.** A transaction that ends with the same allocations it
  started with leaves the file (and its generation) alone; a transaction that raises writes
  nothing.
* **The critical section is measured.** Each transaction records the time spent waiting for the
  lock and the time the lock was held on the :class:`Ledger` (``last_lock_wait_s``,
  ``last_held_s``) so benchmarks can check the < 10 ms target (DESIGN.md, targets), and where
  the hold went (``last_times``: read, the caller's block, encoding, write, fsyncs).

No module-level state: everything hangs off a :class:`Ledger` instance. The document and its
allocations are :mod:`.document`; the file, its lock and transactions are :mod:`.store`.
"""

from .document import (DEFAULT_LOCK_TIMEOUT, DIR_MODE, EMPTY_STATE, FILE_MODE, FORMAT, LEDGER_FILE,
                       LOCK_FILE, OWNERS, VERSION, Allocation, LedgerState, LedgerTxn,
                       canonical_json, checksum_of, domain_key, job_key, parse_document)
from .store import LOCK_POLL_S, Ledger, TxnTimes

__all__ = [
    "Allocation", "Ledger", "LedgerState", "LedgerTxn", "TxnTimes", "EMPTY_STATE", "FORMAT",
    "VERSION", "canonical_json", "checksum_of", "domain_key", "job_key", "parse_document",
    "DEFAULT_LOCK_TIMEOUT", "DIR_MODE", "FILE_MODE", "LEDGER_FILE", "LOCK_FILE", "LOCK_POLL_S",
    "OWNERS",
]
