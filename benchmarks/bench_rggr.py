"""RGGR channel selection: vectorised vs the authors' per-sample loop form, side by side.

    python benchmarks/bench_rggr.py [--batch 64] [--channels 64 256 512] [--bank 24000] [--k 2] [--repeats 3]

Prints the median time of each form, the speed-up and whether the masks agree.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from cdd_plugin.rggr import select_unimportant, select_unimportant_loop


def _time(fn, repeats):
    times = []
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--channels", type=int, nargs="+", default=[64, 256, 512])
    ap.add_argument("--bank", type=int, default=24000)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--metric", default="cosine", choices=["cosine", "l2"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(f"RGGR selection, B={args.batch}, N={args.bank}, K={args.k}, ratio={args.ratio}, metric={args.metric}, "
          f"torch threads={torch.get_num_threads()}")
    print(f"{'C':>5}  {'vectorised ms':>14}  {'loop ms':>10}  {'speed-up':>8}  {'masks equal':>11}  {'unimportant':>11}")
    ok = True
    for C in args.channels:
        g = torch.Generator().manual_seed(args.seed + C)
        # pooled post-ReLU features are non-negative, like the real ones; a decaying channel
        # profile (as in a trained layer) makes some channels consistently unimportant
        profile = torch.logspace(0, -3, C)[torch.randperm(C, generator=g)]
        s = torch.rand(args.batch, C, generator=g) * profile
        t = torch.rand(args.batch, C, generator=g)
        bank = torch.cat([torch.rand(args.bank - args.batch, C, generator=g), t])
        tv, mv = _time(lambda: select_unimportant(s, t, bank, args.k, args.ratio, args.metric), args.repeats)
        tl, ml = _time(lambda: select_unimportant_loop(s, t, bank, args.k, args.ratio, args.metric), args.repeats)
        same = bool(torch.equal(mv, ml))
        ok &= same
        print(f"{C:>5}  {tv * 1e3:>14.1f}  {tl * 1e3:>10.1f}  {tl / tv:>7.1f}x  {str(same):>11}  {int(mv.sum()):>11}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
