"""What every job runs on, apart from the math: the process group and rank-0 helpers (dist), DeepSpeed configs,
checkpoints and their resharding, safe loading, the run's lock, record and log, stop requests, crash-safe writes
(atomic), the lockstep shard loop of the jobs that write files (shards), and fault injection for tests (faults)."""
