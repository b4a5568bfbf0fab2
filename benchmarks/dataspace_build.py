"""Data-space build cost per embedded corpus and embedder, on one CPU thread (issue 13): how many
sequences the held-out half of each corpus gives (--data-space split), the tokenizing time, each
embedder's throughput measured on a sample of sequences, and the extrapolated embedding time and
index size of the whole data space.

    python -m benchmarks.dataspace_build [--seq-len 64] [--sample 256]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from tabulate import tabulate

from tta_bench.core.registry import get_task
from tta_bench.data.dataspace import DEFAULT_EMBEDDER


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--sample", type=int, default=256, help="sequences embedded to measure each embedder")
    args = parser.parse_args()
    torch.set_num_threads(1)
    table = []
    for corpus in ("shakespeare", "python-stdlib", "licenses"):
        task = get_task("text", corpus=corpus, data_space="split", seq_len=args.seq_len)
        t0 = time.perf_counter()
        tokens, offsets = task.data_space_sequences()
        tokenize_s = time.perf_counter() - t0
        n = len(offsets) - 1
        sample = [tokens[offsets[i]:offsets[i + 1]] for i in np.linspace(0, n - 1, min(n, args.sample)).astype(int)]
        for name in (DEFAULT_EMBEDDER, "self"):
            embedder = task.embedder(name)
            t0 = time.perf_counter()
            rows = [embedder.embed(sample[i:i + embedder.batch_size]) for i in range(0, len(sample), embedder.batch_size)]
            rate = len(sample) / (time.perf_counter() - t0)
            dim = rows[0].shape[1]
            table.append([corpus, name, n, len(tokens), f"{tokenize_s:.0f}", f"{rate:.1f}", f"{n / rate / 60:.1f}",
                          f"{n * dim * 4 / 2**20:.1f}"])
            print(table[-1], flush=True)
    print(tabulate(table, headers=["corpus", "embedder", "sequences", "tokens", "tokenize s", "seq/s",
                                   "embed min (all)", "index MiB"], tablefmt="github"))


if __name__ == "__main__":
    main()
