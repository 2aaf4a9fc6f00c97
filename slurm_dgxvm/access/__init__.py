"""Into a job's VM: the target (job -> address, user, key, known_hosts; the one place that
builds an ssh command), the request (what the command sees: argv, environment, working
directory), the session (``dgxvm run``/``dgxvm shell``: streams, signals, exit status) and the
runner (:mod:`.runner`: a ``dgxvm run``/``shell`` whole, from its flags to the command's status).

The guest side is ``dgxvm-guest.sh``, delivered with the NoCloud seed."""
