"""Test, demo and benchmark harnesses (not part of the installed package)."""
