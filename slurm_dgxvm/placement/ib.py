"""Which InfiniBand functions a VM gets beside its GPUs: a pure choice from the host model, what
is taken and the mode (a partition's ``ib``).

GPUDirect RDMA moves data between a GPU and an HCA through the PCIe switch they share, so a VM's
HCA must be the one behind its GPU's switch (DGX A100: two HCAs per GPU pair, one per GPU as
NVIDIA's GDS guide pairs them; DGX H100: one HCA per GPU, H100 User Guide table 6). Each GPU gets
its own nearest HCA when the machine has one per GPU; where it has fewer (one per pair), the
GPUs of a pair share theirs.
"""

from __future__ import annotations

from ..errors import NoFit, RequestError
from ..ranges import format_index_list
from ..topology.model import Host, Nic
from .model import IB_MODES, IbFunction, Occupancy


def choose(host: Host, taken: Occupancy, mode: str, gpus: tuple[int, ...]) -> tuple[IbFunction, ...]:
    """The InfiniBand functions for a VM of ``gpus``, in GPU order; () for mode "none".

    HCAs are matched to GPUs nearest first (the most PCIe bridges shared, then the lowest GPU
    index and HCA address), each HCA to one GPU of the VM. "vf" gives each matched GPU its HCA's
    lowest free VF; "port" the HCA itself, when neither it nor any of its VFs is taken. A GPU
    that finds no HCA left because the VM's other GPUs took those beside it shares theirs.

    Raises RequestError (quantity ``ib``) for an unknown mode, or when no HCA near the GPUs can
    ever serve the mode (no SR-IOV VF enabled for "vf": ``sriov_numvfs`` is 0 or the machine has
    none, e.g. the DGX-2 here); NoFit (resource ``ib``) when a GPU's HCAs are all taken now.

    Example: 2 GPUs 0-1 on a DGX A100, mode "vf" -> GPU 1 gets VF 0 of 0000:0c:00.0 (mlx5_0, on
    GPU 1's own second-level switch), GPU 0 VF 0 of 0000:12:00.0 (mlx5_1).
    """
    if mode not in IB_MODES:
        raise RequestError(quantity="ib", value=mode,
                           reason=f"is not one of {', '.join(IB_MODES)}")
    if mode == "none":
        return ()

    def serves(nic: Nic | None) -> bool:
        return nic is not None and nic.kind == "infiniband" and (mode == "port" or bool(nic.vfs))

    def free(nic: Nic) -> bool:
        if nic.pci in taken.ib_functions:
            return False
        held = [vf for vf in nic.vfs if vf.pci in taken.ib_functions]
        return not held if mode == "port" else len(held) < len(nic.vfs)

    near = {g: [(pci, depth) for pci, depth in host.gpu(g).hcas
                if serves(host.nic_by_pci.get(pci))] for g in gpus}
    if not any(near.values()):
        what = "an SR-IOV VF enabled (sriov_numvfs)" if mode == "vf" else "an InfiniBand HCA"
        raise RequestError(quantity="ib", value=mode,
                           reason=f"needs {what} behind the PCIe switches of GPUs "
                                  f"{format_index_list(gpus)} on {host.display_name}; none has")
    pairs = sorted(((depth, g, pci) for g, cands in near.items() for pci, depth in cands),
                   key=lambda t: (-t[0], t[1], t[2]))
    hca_of: dict[int, str] = {}
    for _, g, pci in pairs:
        if g not in hca_of and pci not in hca_of.values() and free(host.nic_by_pci[pci]):
            hca_of[g] = pci
    for g, cands in near.items():
        if g not in hca_of and cands and not {pci for pci, _ in cands} & set(hca_of.values()):
            raise NoFit(count=len(gpus), resource="ib",
                        reason=f"GPU {g}'s InfiniBand HCAs "
                               f"{', '.join(pci for pci, _ in cands)} have no "
                               f"{'free VF' if mode == 'vf' else 'port free'}")
    out = []
    for g in sorted(hca_of):
        nic = host.nic_by_pci[hca_of[g]]
        if mode == "port":
            out.append(IbFunction(pci=nic.pci, hca=nic.pci, gpu=g, vf=None))
            continue
        vf = next(v for v in nic.vfs if v.pci not in taken.ib_functions)
        out.append(IbFunction(pci=vf.pci, hca=nic.pci, gpu=g, vf=vf.index))
    return tuple(out)
