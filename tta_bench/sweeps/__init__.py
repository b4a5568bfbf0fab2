"""Many runs: sweep specs expanded into jobs (`spec`) and their executors (local, Slurm)."""
