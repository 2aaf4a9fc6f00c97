"""slurm-dgxvm: topology-aligned GPU virtual machines for Slurm jobs on DGX-class servers."""

__version__ = "0.1.0"
