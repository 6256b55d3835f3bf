"""Launch helpers for clusters: the Slurm -> torch.distributed environment (slurm_env) and preflight checks."""
