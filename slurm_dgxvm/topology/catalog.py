"""The machine catalog: what neither sysfs nor NVML can say about a known machine.

Keyed by what sysfs does show (DMI product name, GPU PCI ids, bus addresses), a profile says which
GPU blocks are legal, which NVSwitches belong to which baseboard and go with which block, the
NVSwitch model, and the Fabric Manager partitions. Facts are cited to ../shared/notes/machines.md
(marks: [REAL] real output, [DOC] NVIDIA docs, [INF] inferred). Blocks and NVSwitch sets are
written in *slots*: positions in the reference unit's GPU list in PCI order, so that a GPU that
failed to enumerate does not shift the physical meaning of a block.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .model import FULL_PASSTHROUGH, SHARED_NVSWITCH


@dataclass(frozen=True)
class CatalogBlock:
    slots: tuple[int, ...]
    nvswitch_slots: tuple[int, ...] = ()     # positions in the profile's reference switch list
    fm_partition: int | None = None


@dataclass(frozen=True)
class FmPartition:
    id: int
    modules: tuple[int, ...]                 # Fabric Manager physical / module ids


@dataclass(frozen=True)
class MachineProfile:
    key: str
    display_name: str
    dmi_pattern: str                         # regex on DMI product_name
    gpu_ids: tuple[str, ...]                 # "vendor:device" of its GPUs
    gpu_name: str
    reference_gpus: tuple[str, ...]          # BDFs of the reference unit, PCI order (= slots)
    gpu_boards: tuple[int, ...]              # board of each slot
    reference_nvswitches: tuple[str, ...]
    nvswitch_boards: tuple[int, ...]
    nvswitch_model: str
    block_sizes: tuple[int, ...]
    fm_partitions: tuple[FmPartition, ...] = ()
    default_module_ids: tuple[int, ...] = ()  # module id of each slot (shared-nvswitch only)
    passthrough_blocks: tuple[CatalogBlock, ...] = ()
    sources: str = ""

    @property
    def gpu_count(self) -> int:
        return len(self.reference_gpus)

    def matches_dmi(self, product_name: str | None) -> bool:
        return bool(product_name) and re.search(self.dmi_pattern, product_name) is not None

    def blocks(self, module_ids: tuple[int, ...] | None = None) -> tuple[CatalogBlock, ...]:
        """Legal blocks of a healthy unit, in slots.

        full-passthrough: the profile's explicit blocks. shared-nvswitch: one block per Fabric
        Manager partition, its modules turned into slots through ``module_ids`` (default: the
        profile's; an admin may configure the real mapping, see etc/dgxvm.toml).
        """
        if self.nvswitch_model == FULL_PASSTHROUGH:
            return self.passthrough_blocks
        ids = module_ids or self.default_module_ids
        slot_of_module = {m: s for s, m in enumerate(ids)}
        out = []
        for part in self.fm_partitions:
            if all(m in slot_of_module for m in part.modules):
                out.append(CatalogBlock(slots=tuple(sorted(slot_of_module[m] for m in part.modules)),
                                        fm_partition=part.id))
        return tuple(out)


def _bdfs(buses: str) -> tuple[str, ...]:
    return tuple(f"0000:{b}:00.0" for b in buses.split())


def _dgx2_blocks() -> tuple[CatalogBlock, ...]:
    """Aligned blocks of 1/2/4/8/16 GPUs with their NVSwitches (FMG table 1) [DOC].

    Which 3 switches go with a 4-GPU set and which 1 with a 2-GPU set is not published [NOT FOUND];
    we nest them so that disjoint blocks never share a switch: on each baseboard (6 switches,
    positions 0-5) the first 4-GPU set takes switches 0-2 and the second 3-5; a 2-GPU set takes
    the first or second switch of its 4-GPU set's three [INF].
    """
    blocks: list[CatalogBlock] = [CatalogBlock(slots=tuple(range(16)), nvswitch_slots=tuple(range(12)))]
    for board in range(2):
        base_gpu, base_sw = 8 * board, 6 * board
        blocks.append(CatalogBlock(tuple(range(base_gpu, base_gpu + 8)),
                                   tuple(range(base_sw, base_sw + 6))))
        for half in range(2):
            g4 = base_gpu + 4 * half
            sw3 = tuple(range(base_sw + 3 * half, base_sw + 3 * half + 3))
            blocks.append(CatalogBlock(tuple(range(g4, g4 + 4)), sw3))
            for pair in range(2):
                g2 = g4 + 2 * pair
                blocks.append(CatalogBlock((g2, g2 + 1), (sw3[pair],)))
    blocks += [CatalogBlock((s,)) for s in range(16)]
    return tuple(sorted(blocks, key=lambda b: (-len(b.slots), b.slots)))


DGX2 = MachineProfile(
    key="dgx2",
    display_name="NVIDIA DGX-2",
    dmi_pattern=r"^NVIDIA DGX-2",                     # dmidecode, backend.ai#113 [REAL]
    gpu_ids=("10de:1db8",),                           # V100-SXM3-32GB, GDS [REAL]
    gpu_name="Tesla V100-SXM3-32GB",
    reference_gpus=_bdfs("34 36 39 3b 57 59 5c 5e b7 b9 bc be e0 e2 e5 e7"),  # IT4I, GDS [REAL]
    gpu_boards=(0,) * 8 + (1,) * 8,                   # FMG HGX-2 lspci example [DOC/INF]
    reference_nvswitches=_bdfs("61 62 63 65 66 67 c1 c2 c3 c5 c6 c7"),  # GDS lspci -tv [REAL]
    nvswitch_boards=(0,) * 6 + (1,) * 6,
    nvswitch_model=FULL_PASSTHROUGH,                  # the DGX-2 KVM model; FMG table 1 [DOC]
    block_sizes=(1, 2, 4, 8, 16),
    passthrough_blocks=_dgx2_blocks(),
    sources="notes/machines.md §1",
)

# Single baseboard strapped "bottom tray": physical ids 1-8 [DOC FMG]; the partitions that exist
# on one baseboard are 1, 7, 8, 11-14, 19-26 [INF from FMG's table].
_A100_PARTITIONS = (
    (FmPartition(1, tuple(range(1, 9))), FmPartition(7, (1, 2, 3, 4)), FmPartition(8, (5, 6, 7, 8)))
    + tuple(FmPartition(11 + i, (2 * i + 1, 2 * i + 2)) for i in range(4))
    + tuple(FmPartition(19 + i, (i + 1,)) for i in range(8))
)

DGX_A100 = MachineProfile(
    key="dgx-a100",
    display_name="NVIDIA DGX A100",
    dmi_pattern=r"^DGXA100",                          # dmidecode "DGXA100 920-23687-2531-001" [REAL]
    gpu_ids=("10de:20b0", "10de:20b2"),               # A100-SXM4-40GB / 80GB [REAL]
    gpu_name="A100-SXM4",
    reference_gpus=_bdfs("07 0f 47 4e 87 90 b7 bd"),  # charmed-kubernetes docs, cc-slurm-sync [REAL]
    gpu_boards=(0,) * 8,
    reference_nvswitches=_bdfs("c4 c5 c6 c7 c8 c9"),  # nccl#1505 [REAL]
    nvswitch_boards=(0,) * 6,
    nvswitch_model=SHARED_NVSWITCH,
    block_sizes=(1, 2, 4, 8),
    fm_partitions=_A100_PARTITIONS,
    # Physical id <-> BDF is not published [NOT FOUND]; PCI order is assumed [INF]. Configure
    # host.module_ids when `nvidia-smi -q` shows otherwise.
    default_module_ids=tuple(range(1, 9)),
    sources="notes/machines.md §2",
)

# FMG H100 default partitions, confirmed by real `partitioner -o 0` output [REAL].
_H100_PARTITIONS = (
    (FmPartition(0, tuple(range(1, 9))), FmPartition(1, (1, 2, 3, 4)), FmPartition(2, (5, 6, 7, 8)),
     FmPartition(3, (1, 3)), FmPartition(4, (2, 4)), FmPartition(5, (5, 7)), FmPartition(6, (6, 8)))
    + tuple(FmPartition(7 + i, (i + 1,)) for i in range(8))
)

DGX_H100 = MachineProfile(
    key="dgx-h100",
    display_name="NVIDIA DGX H100",
    # Real DMI string not found: "DGXH100" is the Redfish model name [INF]; accept the spaced form.
    dmi_pattern=r"^(NVIDIA )?DGX ?H100",
    gpu_ids=("10de:2330",),                           # H100 80GB HBM3 SXM5 [REAL]
    gpu_name="H100 80GB HBM3",
    reference_gpus=_bdfs("1b 43 52 61 9d c3 d1 df"),  # nvidia-smi on an 8480C DGX OS host [REAL]
    gpu_boards=(0,) * 8,
    reference_nvswitches=_bdfs("07 08 09 0a"),        # FMG lspci example [DOC]
    nvswitch_boards=(0,) * 4,
    nvswitch_model=SHARED_NVSWITCH,
    block_sizes=(1, 2, 4, 8),
    fm_partitions=_H100_PARTITIONS,
    # Module id <-> BDF on DGX H100 is not published and differs from PCI order on other HGX
    # boards [NOT FOUND / REAL elsewhere]; PCI order is assumed until host.module_ids says.
    default_module_ids=tuple(range(1, 9)),
    sources="notes/machines.md §3",
)

PROFILES: dict[str, MachineProfile] = {p.key: p for p in (DGX2, DGX_A100, DGX_H100)}
GENERIC = "generic"
