"""The job's GPU environment, made true inside its VM.

Slurm hands the job (and each step's tasks) GPU indices of the *host*: ``SLURM_JOB_GPUS`` and
``SLURM_STEP_GPUS`` always, ``CUDA_VISIBLE_DEVICES`` and ``GPU_DEVICE_ORDINAL`` too unless the
node constrains devices with cgroups (then those two are already relative to the job: 0..n-1).
Inside the VM the GPUs are numbered 0..n-1 in the guest's PCI order, which follows the job's
GPUs in Slurm's order (when placement remapped the job to another block, position i of Slurm's
set is still guest GPU i). So the rule, for every variable:

- a host index h of the job becomes its position in the job's sorted Slurm GPUs;
- an index that is already relative (``relative=True`` for CUDA_VISIBLE_DEVICES and
  GPU_DEVICE_ORDINAL) stays as it is, checked to be below the job's GPU count;
- a GPU UUID (``GPU-...``, ``MIG-...``) stays: passthrough keeps the device's UUID;
- a task's subset stays a subset, in its own order; an empty value stays empty.

An index that is not the job's is an error naming the variable and the value: the command would
otherwise run on the wrong GPUs. Pure: the caller reads the environment and the job's GPUs.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import JobInputError

HOST_INDEXED = ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS")
MAYBE_RELATIVE = ("CUDA_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL")
VARIABLES = HOST_INDEXED + MAYBE_RELATIVE


def translate(environ: Mapping[str, str], job_gpus: tuple[int, ...], *,
              relative: bool) -> dict[str, str]:
    """``{variable: value in the guest's numbering}`` for each GPU variable in ``environ``.

    ``job_gpus``: the job's GPUs as Slurm numbers them on the host (SLURM_JOB_GPUS).
    ``relative``: whether CUDA_VISIBLE_DEVICES / GPU_DEVICE_ORDINAL are job-relative already
    (Slurm with ConstrainDevices=yes). Raises JobInputError naming a variable whose value is not
    a list of the job's GPUs.
    """
    order = {h: i for i, h in enumerate(sorted(set(job_gpus)))}
    out = {}
    for var in VARIABLES:
        if var not in environ:
            continue
        value = environ[var]
        items = [v.strip() for v in value.split(",")] if value.strip() else []
        guest = []
        for item in items:
            if item.startswith(("GPU-", "MIG-")):
                guest.append(item)
                continue
            if not (item.isascii() and item.isdigit()):
                raise JobInputError(what=var, value=value,
                                    reason=f"{item!r} is not a GPU index or UUID")
            index = int(item)
            if var in MAYBE_RELATIVE and relative:
                if index >= len(order):
                    raise JobInputError(what=var, value=value,
                                        reason=f"GPU {index} is not one of the job's "
                                               f"{len(order)} GPU(s)")
                guest.append(str(index))
            elif index in order:
                guest.append(str(order[index]))
            else:
                known = ",".join(str(h) for h in sorted(order)) or "none"
                raise JobInputError(what=var, value=value,
                                    reason=f"GPU {index} is not one of the job's ({known})")
        out[var] = ",".join(guest)
    return out


__all__ = ["HOST_INDEXED", "MAYBE_RELATIVE", "VARIABLES", "translate"]
