"""Built-in methods, one module per family; discovered by `tta_bench.core.registry`."""
