"""Containers for ``dgxvm run`` (issue 11, in progress): image references (:mod:`.ref`) and
``--container-mounts`` (:mod:`.mounts`), both pure and checked before anything runs."""
