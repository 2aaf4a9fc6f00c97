"""Is this host able to run GPU VMs, and making it so: ``dgxvm host check|setup|revert``.

:mod:`.roots` says where everything is (each root injectable, so tests run on a temp tree);
:mod:`.check` reads the host and says, line by line, what is missing and the fix;
:mod:`.setup` plans and makes the changes that can be made safely, recording each in
:mod:`.setup_record` so that revert undoes exactly them; :mod:`.kernel` is the one place that writes
to sysfs (driver binding, huge page pools), with simulated twins in :mod:`slurm_dgxvm.simulate`.
"""
