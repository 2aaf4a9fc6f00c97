"""Containers for ``dgxvm run``: image references (:mod:`.ref`, pure)."""
