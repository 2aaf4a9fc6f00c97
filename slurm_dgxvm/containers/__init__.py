"""Containers for ``dgxvm run`` (issue 11, in progress), the pure parts checked before anything
runs: image references (:mod:`.ref`), ``--container-mounts`` (:mod:`.mounts`) and the job's GPU
variables in the guest's numbering (:mod:`.gpuenv`)."""
