"""The data layer, shared by the built-in tasks and the scripts: the per-user cache of weights and
data (cache root, manifests, offline checks, file hashing), the CIFAR-10-C / ImageNet-C corruption
library, AugMix views, and the retrieval methods' data spaces. Below the plugins (tta_bench.tasks,
tta_bench.methods); imports only core and storage."""
