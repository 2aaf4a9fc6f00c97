"""The ``dgxvm`` command line."""
