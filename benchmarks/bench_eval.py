"""Time ``cdd_plugin.evaluation.evaluate_reid`` against FastReID's pure-Python ``evaluate_rank``.

Builds a Market-1501-sized problem (3,368 queries x 19,732 gallery by default) whose
pids/camids are the real Market-1501 labels when the data is present (query labels,
the 15,913 evaluated gallery labels, topped up to ``--gallery`` with distractor
labels standing in for the junk images) or a synthetic Market-like distribution
otherwise.  Distances come from random embeddings (identity prototype + noise), so
mAP is non-trivial.  FastReID's Python path is slow: ``--fastreid-queries N`` times
it on N random queries only and scales the time linearly to all queries (said so
in the output); the accuracy comparison is made on those same N queries.

    python benchmarks/bench_eval.py [--queries 3368 --gallery 19732 --seed 0 --fastreid-queries 3368]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cdd_plugin.datasets import default_market1501_root, parse_market1501  # noqa: E402
from cdd_plugin.evaluation import compute_distmat, evaluate_reid  # noqa: E402


def load_fastreid_rank():
    """FastReID's real rank.py (its package __init__ no longer imports on Python 3.10+)."""
    import fastreid

    path = Path(fastreid.__file__).parent / "evaluation" / "rank.py"
    spec = importlib.util.spec_from_file_location("fastreid_rank_reference", path)
    module = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec.loader.exec_module(module)
    return module


def market_labels(num_q: int, num_g: int, rng: np.random.Generator):
    """Real Market-1501 labels, or None when the data is absent."""
    root = default_market1501_root()
    if not (root / "query").is_dir():
        return None
    sp = parse_market1501(root)
    q = np.array([(s.pid, s.camid) for s in sp.query])
    g = np.array([(s.pid, s.camid) for s in sp.gallery])
    if num_q > len(q):
        raise SystemExit(f"--queries {num_q} exceeds the {len(q)} real Market-1501 queries; use --synthetic")
    q = q[rng.permutation(len(q))[:num_q]] if num_q < len(q) else q
    if num_g >= len(g):
        extra = np.stack([np.zeros(num_g - len(g), int), rng.integers(0, 6, num_g - len(g))], 1)
        g = np.concatenate([g, extra])
    else:
        g = g[rng.permutation(len(g))[:num_g]]
    note = (f"real Market-1501 labels from {root} ({len(sp.gallery)} evaluated gallery images"
            + (f" + {num_g - len(sp.gallery)} distractor labels standing in for the junk images)" if num_g > len(sp.gallery) else ")"))
    return q[:, 0], g[:, 0], q[:, 1], g[:, 1], note


def synthetic_labels(num_q: int, num_g: int, rng: np.random.Generator):
    """Market-like: 750 test ids, ~4.5 queries and ~17 gallery images per id, 6 cameras, ~18% distractors."""
    num_ids = 750
    qp = rng.integers(1, num_ids + 1, num_q)
    n_distractor = int(0.18 * num_g)
    gp = np.concatenate([rng.integers(1, num_ids + 1, num_g - n_distractor), np.zeros(n_distractor, int)])
    return qp, gp, rng.integers(0, 6, num_q), rng.integers(0, 6, num_g), "synthetic Market-like labels"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queries", type=int, default=3368)
    ap.add_argument("--gallery", type=int, default=19732)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fastreid-queries", type=int, default=None,
                    help="time FastReID on this many random queries and scale to all (default: all queries)")
    ap.add_argument("--max-rank", type=int, default=50)
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--synthetic", action="store_true", help="ignore the real Market-1501 labels")
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    labels = None if args.synthetic else market_labels(args.queries, args.gallery, rng)
    qp, gp, qc, gc, note = labels or synthetic_labels(args.queries, args.gallery, rng)

    # embeddings: identity prototype + noise (distractors get their own random prototype each)
    dim = 64
    ids = np.unique(np.concatenate([qp, gp]))
    proto = {int(p): rng.normal(size=dim) for p in ids}
    fq = np.stack([proto[int(p)] for p in qp]) + 1.3 * rng.normal(size=(len(qp), dim))
    fg = np.stack([proto[int(p)] if p > 0 else rng.normal(size=dim) for p in gp]) + 1.3 * rng.normal(size=(len(gp), dim))
    dist = compute_distmat(torch.from_numpy(fq).float(), torch.from_numpy(fg).float(), "cosine").numpy()

    print(f"distmat {dist.shape[0]} x {dist.shape[1]} float32, {note}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, numpy {np.__version__}")

    t0 = time.perf_counter()
    ours = evaluate_reid(dist, qp, gp, qc, gc, args.max_rank, chunk_size=args.chunk_size, progress=False)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    evaluate_reid(dist, qp, gp, qc, gc, args.max_rank, chunk_size=args.chunk_size, tie_break="stable", progress=False)
    t_stable = time.perf_counter() - t0

    rank = load_fastreid_rank()
    n_fr = args.queries if args.fastreid_queries is None else min(args.fastreid_queries, args.queries)
    sub = np.sort(rng.permutation(args.queries)[:n_fr]) if n_fr < args.queries else np.arange(args.queries)
    d_sub = np.ascontiguousarray(dist[sub])
    t0 = time.perf_counter()
    cmc, all_ap, all_inp = rank.evaluate_rank(d_sub, qp[sub], gp, qc[sub], gc, args.max_rank,
                                              use_metric_cuhk03=False, use_cython=False)
    t_fr_sub = time.perf_counter() - t0
    t_fr = t_fr_sub * args.queries / n_fr
    ours_sub = ours if n_fr == args.queries else evaluate_reid(
        d_sub, qp[sub], gp, qc[sub], gc, args.max_rank, chunk_size=args.chunk_size, progress=False)

    scaled = "" if n_fr == args.queries else f"  (measured {t_fr_sub:.2f} s on {n_fr} queries, scaled x{args.queries / n_fr:.2f})"
    print()
    print(f"{'':38s}{'time [s]':>10s}")
    print(f"{'FastReID evaluate_rank (python)':38s}{t_fr:10.2f}{scaled}")
    print(f"{'cdd_plugin evaluate_reid':38s}{t_ours:10.2f}")
    print(f"{'cdd_plugin evaluate_reid (stable)':38s}{t_stable:10.2f}")
    print(f"speed-up: x{t_fr / t_ours:.1f}")
    print()
    print(f"mAP  {ours['mAP'] * 100:.4f}%  mINP {ours['mINP'] * 100:.4f}%  Rank-1 {ours['cmc'][0] * 100:.4f}%  "
          f"({ours['num_valid_queries']} valid queries)")
    print(f"max |diff| vs FastReID on {n_fr} queries: "
          f"mAP {abs(ours_sub['mAP'] - np.mean(all_ap)):.2e}, mINP {abs(ours_sub['mINP'] - np.mean(all_inp)):.2e}, "
          f"CMC {np.abs(ours_sub['cmc'] - cmc).max():.2e}, per-query AP {np.abs(ours_sub['all_AP'] - np.asarray(all_ap)).max():.2e}")


if __name__ == "__main__":
    main()
