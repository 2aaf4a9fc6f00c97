"""Everything that speaks Slurm: gres.conf, (later) the Prolog/Epilog hooks and accounting."""
