"""The contract every layer above builds on: errors, hyperparameters, the protocol, the Method and
Task interfaces and the registry that finds them; and the statistics every layer reports with."""
