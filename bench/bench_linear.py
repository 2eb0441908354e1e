"""Benchmark behind model.py's FastLinear: x @ W^T (nn.Linear) vs. (W @ x^T)^T for few rows.

What: for each weight shape (out, in) and row count N we time y = F.linear(x, W) and
y = (W @ x^T)^T made contiguous (what `FastLinear.forward` does), fp32 on the CPU, and print
plain / swapped (> 1 = the swap is faster). Each shape gets several distinct weights that are cycled
through, so every product reads its weight from memory as in a real forward pass (a single weight
would sit in cache). The two variants alternate and the best of --repeats rounds is kept, so
background load hits both alike.
Shapes: the toy world's (128-wide), the 58M model of bench_sample.py (512-wide, vocab 32000) and
LLaMA-7B's.
Why the swap can win: a decoding step feeds one token per sequence, and CPU BLAS splits the skinny
x @ W^T poorly across threads; as (W @ x^T)^T the long side (out) is the GEMM's M.
Measured (2 threads, on a shared machine): the swap was up to 3.8x faster for fp32 weights of
>= 2^18 elements and N = 2-64 (about 2-3x for the 32000-row LM head at N = 2-8); about even for
one row or > 64 rows; mixed (0.7-2.4x) for small weights such as all of the toy world's. Hence
`FastLinear` takes the swap for 2 <= N <= 64 rows and weights of >= 2^18 elements.
Run (repo root): `python -m bench.bench_linear [--threads N] [--repeats R]`
"""
import argparse
import time

import torch
import torch.nn.functional as F

SHAPES = [(384, 128), (1000, 128),                      # toy world: MLP, LM head (< 2^18)
          (512, 512), (1408, 512), (512, 1408), (32000, 512),   # bench_sample.py's 58M model
          (4096, 4096), (11008, 4096)]                  # LLaMA-7B: attention, MLP
ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def timed(fn, weights, x):
    """Seconds for one product with each weight."""
    t0 = time.perf_counter()
    for w in weights:
        fn(x, w)
    return time.perf_counter() - t0


def swapped(x, w):
    """(W @ x^T)^T, contiguous: model.py's FastLinear fast path."""
    return (w @ x.T).T.contiguous()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=5, help="rounds per cell; the best is kept")
    parser.add_argument("--bytes", type=float, default=64e6,
                        help="weight bytes per shape cycled through (> cache)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"F.linear time / swapped time, fp32 CPU, {args.threads} threads, "
          f"torch {torch.__version__} (> 1: the swap is faster)")
    print(f"{'weight (out, in)':>18s} " + " ".join(f"{f'N={n}':>6s}" for n in ROWS))
    for out_f, in_f in SHAPES:
        copies = max(1, int(args.bytes // (out_f * in_f * 4)))
        weights = [torch.randn(out_f, in_f) for _ in range(copies)]
        cells = []
        for n in ROWS:
            x = torch.randn(n, in_f)
            plain, swap = float("inf"), float("inf")
            for _ in range(args.repeats + 1):            # the first round warms up
                plain = min(plain, timed(F.linear, weights, x))
                swap = min(swap, timed(swapped, weights, x))
            cells.append(f"{plain / swap:6.2f}")
        print(f"{str((out_f, in_f)):>18s} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
