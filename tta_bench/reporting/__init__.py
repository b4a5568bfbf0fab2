"""Leaderboards from finished runs: reading them, choosing hyperparameters, statistics, tables,
plots and the static site."""
