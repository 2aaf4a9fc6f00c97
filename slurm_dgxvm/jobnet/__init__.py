"""The job fabric of multi-node jobs, the host's side: Slurm hostlists (:mod:`.hostlist`), the
per-node plan of a job's VXLAN segment (:mod:`.plan`, pure) and making and removing it
(:mod:`.apply`: ip, bridge, nft). docs/admin/jobnet.md says what a site provides."""
