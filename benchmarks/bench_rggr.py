"""RGGR channel selection: vectorised vs the authors' per-sample loop form, side by side; and a
whole refresh of a ResNet-50's sites, one call per site vs one batched call.

    python benchmarks/bench_rggr.py [--batch 64] [--channels 64 256 512] [--bank 24000] [--k 2] [--repeats 3]
    python benchmarks/bench_rggr.py --refresh [--batch 16] [--rounds 7]

Prints the median time of each form, the speed-up and whether the masks agree.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from cdd_plugin.rggr import MemoryQueue, select_unimportant, select_unimportant_loop, select_unimportant_many

# the compactor widths of a ResNet-50 (torchvision's, or FastReID's backbone): the authors' placement
# (each bottleneck's 3x3 output) and every independent set (the stem, each bottleneck's 1x1 and 3x3 outputs)
RESNET50_SITES = {"paper": [64] * 3 + [128] * 4 + [256] * 6 + [512] * 3,
                  "all": [64] + [64] * 6 + [128] * 8 + [256] * 12 + [512] * 6}


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
    ap.add_argument("--refresh", action="store_true",
                    help="time a whole refresh of a ResNet-50's sites: one call per site vs one batched call")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds of the --refresh comparison")
    ap.add_argument("--queue-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args(argv)
    if args.refresh:
        return refresh(args)
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


def _sites(widths, batch, bank, seed, dtype):
    """Pooled features and full queues shaped like a training refresh (non-negative, decaying channel profiles)."""
    items = {}
    for i, C in enumerate(widths):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        profile = torch.logspace(0, -3, C)[torch.randperm(C, generator=g)]
        s = torch.rand(batch, C, generator=g) * profile
        t = torch.rand(batch, C, generator=g)
        q = MemoryQueue(bank, C, dtype)
        q.push(torch.rand(bank - batch, C, generator=g))
        q.push(t)
        items[f"site{i}"] = (s, t, q.bank(), q.bank_norms())
    return items


def refresh(args) -> int:
    """One mask refresh over every site: a call per site (the loop RGGR ran before) vs the batched call,
    timed in alternation (medians of ``--rounds``), masks compared site by site."""
    print(f"RGGR refresh over a ResNet-50's sites, B={args.batch}, N={args.bank}, K={args.k}, ratio={args.ratio}, "
          f"queues {args.queue_dtype}, torch threads={torch.get_num_threads()}")
    print(f"{'placement':>9}  {'sites':>5}  {'per site ms':>11}  {'batched ms':>10}  {'speed-up':>8}  {'masks equal':>11}")
    ok = True
    for placement, widths in RESNET50_SITES.items():
        items = _sites(widths, args.batch, args.bank, args.seed, args.queue_dtype)

        def per_site():
            return {n: select_unimportant(s, t, b, args.k, args.ratio, args.metric, bank_norms=nb)
                    for n, (s, t, b, nb) in items.items()}

        def batched():
            return select_unimportant_many(items, args.k, args.ratio, args.metric)

        per_site(), batched()                                   # warm-up
        times = {"per_site": [], "batched": []}
        for _ in range(args.rounds):
            for key, fn in (("per_site", per_site), ("batched", batched)):
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
        a, b = per_site(), batched()
        same = all(torch.equal(a[n], b[n]) for n in items)
        ok &= same
        tp, tb = statistics.median(times["per_site"]), statistics.median(times["batched"])
        print(f"{placement:>9}  {len(widths):>5}  {tp * 1e3:>11.1f}  {tb * 1e3:>10.1f}  {tp / tb:>7.2f}x  {str(same):>11}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
