"""``dgxvm reconcile``: what the node holds that no live job or admin VM owns, and its removal.

- :mod:`.plan`: the plan. Pure: the node's facts (:class:`~.plan.NodeFacts`) in, findings out.
- :mod:`.apply`: reads the node (:func:`~.apply.collect`), plans, and carries the plan out, each
  VM under its lock (:mod:`slurm_dgxvm.lifecycle.vmlock`).
- :mod:`.cache_partials`: the partial entries of the users' container image caches, listed and
  swept as each user.

Above :mod:`slurm_dgxvm.lifecycle` (whose delete and locks it uses) and
:mod:`slurm_dgxvm.containers` (whose cache sweep it runs): the lifecycle itself never imports the
containers package (tests/unit/test_layers.py).
"""
