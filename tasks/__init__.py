"""Built-in tasks, one module per family; discovered by `tta_bench.core.registry`."""
