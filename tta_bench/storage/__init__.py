"""What outlives a process: checkpoints and atomic writes, locks, signal handling around writes,
and the MLflow tracking store."""
