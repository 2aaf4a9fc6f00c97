"""Into a job's VM: the target (job -> address, user, key, known_hosts; the one place that
builds an ssh command), the request (what the command sees: argv, environment, working
directory) and the session (``dgxvm run``/``dgxvm shell``: streams, signals, exit status).

The guest side is ``dgxvm-guest.sh``, delivered with the NoCloud seed."""
