"""One run: the scan over a task's samples (`scan`), its summary metrics and its provenance."""
