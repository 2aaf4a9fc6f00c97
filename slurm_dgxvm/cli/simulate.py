"""``dgxvm simulate``: the sysfs tree of a known machine, or GPU faults injected into one
(slurm_dgxvm.simulate). Registered by name in ``cli.main.LAZY_COMMANDS``."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("machine", metavar="[MACHINE]", required=False)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Directory to write MACHINE's sysfs tree into (empty, or an earlier simulation).")
@click.option("--missing-gpu", "missing", multiple=True, metavar="PCI",
              help="Leave this GPU off the bus (a GPU that failed to enumerate). Repeatable.")
@click.option("--unknown-numa", "unknown_numa", multiple=True, metavar="PCI",
              help="Make this device's numa_node read -1 (a BIOS quirk). Repeatable.")
@click.option("--ib-vfs", "ib_vfs", type=click.IntRange(0), default=None, metavar="N",
              help="SR-IOV virtual functions enabled on each compute HCA of a DGX A100/H100 "
                   "(sriov_numvfs; default 8, 0 = SR-IOV off).")
@click.option("--serial", type=click.IntRange(0, 65535), default=None, metavar="N",
              help="The machine's serial number, which its HCAs' InfiniBand GUIDs carry: give "
                   "each node of a simulated cluster its own (default 0).")
@click.option("--fault", "fault_specs", multiple=True, metavar="GPU:KIND",
              help="Inject a fault into GPU (an index or a PCI address): with MACHINE into the "
                   "new tree, without it into the tree of --into. Repeatable; GPU indices count "
                   "the GPUs on the bus before the first fault.")
@click.option("--into", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="An existing simulated tree to inject the --fault's into (no MACHINE): "
                   "nothing is re-rendered, earlier faults and AER counts stay.")
def simulate(machine, out, missing, unknown_numa, ib_vfs, serial, fault_specs, into):
    """Write the sysfs tree of a known machine (dgx2, dgx-a100, dgx-h100), or inject GPU faults.

    \b
    dgxvm simulate MACHINE --out DIR [--fault GPU:KIND]...
    dgxvm simulate --fault GPU:KIND [--fault GPU:KIND]... --into DIR

    The tree is for --sysfs-root. A fault changes the files a real host shows changed for a GPU
    bound to vfio-pci, and the tree's simulation marker records it. KIND:

    \b
      fell-off-bus     config reads all ones (vendor 0xffff): the GPU fell off the bus (Xid 79)
      aer-fatal        aer_dev_fatal: MalfTLP and TOTAL_ERR_FATAL + 1
      aer-nonfatal     aer_dev_nonfatal: CmpltTO and TOTAL_ERR_NONFATAL + 1
      aer-correctable  aer_dev_correctable: RxErr and TOTAL_ERR_COR + 1 (alone, no cause to quarantine)
      reset-fail       writing 1 to reset fails (OSError, EISDIR): the kernel refuses the reset
      reset-hang       opening reset for writing blocks: a reset that never returns
      missing          the GPU leaves the bus (sys/bus/pci/devices/<pci> goes)
      clear            undo every fault on the GPU (AER counters stay, as on a real host)
    """
    from ..errors import SimulateUsage
    from ..simulate.request import simulate as simulate_tree
    from ..topology.sysfs import SIMULATED_MARKER
    try:
        done = simulate_tree(machine, out=out, missing=missing, unknown_numa=unknown_numa,
                             fault_specs=fault_specs, into=into, ib_vfs=ib_vfs,
                             serial=serial)
    except SimulateUsage as exc:
        if exc.param is None:
            raise click.UsageError(exc.reason) from None
        raise click.BadParameter(exc.reason, param_hint=exc.param) from None
    root = done.root
    if done.machine is not None:
        click.echo(f"simulated {done.machine} written to {root}; use: dgxvm --sysfs-root {root} "
                   "topology show")
    for r in done.records:
        click.echo(f"fault {r['kind']} on GPU {r['gpu']} (simulated), recorded in "
                   f"{root / SIMULATED_MARKER}")


COMMANDS = (simulate,)
