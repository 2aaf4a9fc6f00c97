"""Containers for ``dgxvm run`` (issue 11, in progress), the pure parts checked before anything
runs: image references (:mod:`.ref`), ``--container-mounts`` (:mod:`.mounts`) and the job's GPU
variables in the guest's numbering (:mod:`.gpuenv`); the user's image cache (:mod:`.cache`) and
its administration as the user (:mod:`.cache_admin`: root's refusal, listing, prune, eviction
after a run)."""
