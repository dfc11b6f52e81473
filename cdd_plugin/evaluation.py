"""Retrieval evaluation: re-ID mAP/mINP/CMC, Recall@K, distance matrices, feature extraction.

``evaluate_reid`` reproduces FastReID's pure-Python Market-1501 protocol
(``fastreid.evaluation.rank.evaluate_rank(..., use_metric_cuhk03=False,
use_cython=False)``) number for number, but vectorised with torch over chunks of
queries.  ``recall_at_k`` implements the Stanford Online Products / In-Shop
Recall@K protocol without ever materialising the full N x N similarity matrix.

All metrics are returned as *fractions* in [0, 1]; FastReID's ``ReidEvaluator``
reports the same quantities multiplied by 100.
"""

from __future__ import annotations

import math
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = ["evaluate_reid", "recall_at_k", "compute_distmat", "extract_features"]

ArrayLike = Any  # torch.Tensor | np.ndarray | sequence of numbers

_METRICS = ("cosine", "euclidean")


def _to_numpy(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()  # numpy has no bfloat16
    try:
        return np.asarray(x)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise TypeError(f"{name} must be a torch.Tensor or a numpy array, got {type(x).__name__}") from exc


def _show_progress(progress: bool, num_chunks: int) -> bool:
    """Show a bar only when asked, when there is more than one chunk and stderr is a terminal."""
    return bool(progress) and num_chunks > 1 and sys.stderr.isatty()


def _check_chunk_size(chunk_size: int) -> int:
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return int(chunk_size)


# --------------------------------------------------------------------------- re-ID


def _sorted_chunks(dist: np.ndarray, chunk_size: int, tie_break: str) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(first_row, argsort of rows [first_row, first_row + chunk_size))``.

    numpy's argsort releases the GIL, so with ``tie_break="fastreid"`` a few chunks are
    sorted ahead in threads (at most ``torch.get_num_threads() + 1`` chunks in memory).
    """
    starts = list(range(0, dist.shape[0], chunk_size))
    if tie_break == "stable":  # torch's sort is already multi-threaded
        for s in starts:
            block = torch.from_numpy(np.ascontiguousarray(dist[s:s + chunk_size]))
            yield s, torch.argsort(block, dim=1, stable=True)
        return

    def sort(s: int) -> tuple[int, torch.Tensor]:
        return s, torch.from_numpy(np.argsort(dist[s:s + chunk_size], axis=1))

    workers = min(max(1, torch.get_num_threads()), len(starts))
    if workers == 1:
        yield from map(sort, starts)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for s in starts:
            pending.append(pool.submit(sort, s))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def evaluate_reid(
    distmat: ArrayLike,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: ArrayLike,
    g_camids: ArrayLike,
    max_rank: int = 50,
    *,
    chunk_size: int = 256,
    tie_break: Literal["fastreid", "stable"] = "fastreid",
    progress: bool = True,
) -> dict[str, Any]:
    """Market-1501 / VeRi-776 / MSMT17 re-ID evaluation (mAP, mINP, CMC).

    For every query, gallery entries with the same pid *and* the same camid are
    removed; queries left without any same-pid gallery entry are skipped.

    Args:
        distmat: ``[Q, G]`` distances (smaller = closer), torch tensor or numpy array.
        q_pids, g_pids, q_camids, g_camids: 1-D identity / camera labels
            (integers or strings) of the queries and of the gallery.
        max_rank: length of the CMC curve; capped at ``G`` like FastReID does.
        chunk_size: number of queries sorted at once (memory is ``O(chunk_size * G)``).
        tie_break: ``"fastreid"`` orders equal distances exactly as
            ``np.argsort(distmat, axis=1)`` does, i.e. as FastReID does, so results are
            identical to ``evaluate_rank`` on this machine (numpy's default sort is not
            stable and its tie order may differ between CPUs).  ``"stable"`` breaks
            ties by gallery index (platform independent).
        progress: show a tqdm bar over chunks (only on a terminal, only with >1 chunk).

    Returns:
        ``{"mAP": float, "mINP": float, "cmc": np.ndarray[max_rank] (float64),
        "num_valid_queries": int, "all_AP": np.ndarray, "all_INP": np.ndarray}``.
        All values are fractions in [0, 1] (FastReID prints them x100);
        ``cmc[r - 1]`` is Rank-r.  ``all_AP`` / ``all_INP`` hold one value per valid
        query, in query order (FastReID's second and third return values).

    Raises:
        ValueError: on inconsistent shapes, NaN distances, ``max_rank < 1``, or when
            no query has a valid match in the gallery.
    """
    dist = _to_numpy(distmat, "distmat")
    if dist.ndim != 2:
        raise ValueError(f"distmat must be 2-D [num_query, num_gallery], got shape {tuple(dist.shape)}")
    num_q, num_g = dist.shape
    if num_q == 0 or num_g == 0:
        raise ValueError(f"distmat is empty (shape {tuple(dist.shape)}); need at least one query and one gallery item")
    if not np.issubdtype(dist.dtype, np.number) or np.issubdtype(dist.dtype, np.complexfloating):
        raise ValueError(f"distmat must hold real numbers, got dtype {dist.dtype}")
    if np.issubdtype(dist.dtype, np.floating) and np.isnan(dist).any():
        raise ValueError("distmat contains NaN; the features are probably NaN (check the model / inputs)")
    labels = {}
    for name, value, expected in (
        ("q_pids", q_pids, num_q),
        ("g_pids", g_pids, num_g),
        ("q_camids", q_camids, num_q),
        ("g_camids", g_camids, num_g),
    ):
        arr = _to_numpy(value, name).reshape(-1)
        if arr.shape[0] != expected:
            raise ValueError(
                f"{name} has {arr.shape[0]} entries but distmat has shape {tuple(dist.shape)} "
                f"(expected {expected}); queries are rows, gallery items are columns"
            )
        labels[name] = arr
    if int(max_rank) < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    if tie_break not in ("fastreid", "stable"):
        raise ValueError(f"tie_break must be 'fastreid' or 'stable', got {tie_break!r}")
    chunk_size = _check_chunk_size(chunk_size)
    max_rank = min(int(max_rank), num_g)  # FastReID: "number of gallery samples is quite small"

    # Labels may be strings: map query and gallery labels to a shared integer code.
    def _codes(q: np.ndarray, g: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        _, inv = np.unique(np.concatenate([q, g]), return_inverse=True)
        inv = torch.from_numpy(inv.reshape(-1).astype(np.int32))
        return inv[: q.shape[0]], inv[q.shape[0]:]

    qp, gp = _codes(labels["q_pids"], labels["g_pids"])
    qc, gc = _codes(labels["q_camids"], labels["g_camids"])

    all_ap: list[torch.Tensor] = []
    all_inp: list[torch.Tensor] = []
    cmc_hits = torch.zeros(max_rank, dtype=torch.float64)
    num_valid = 0
    ranks = torch.arange(1, max_rank + 1, dtype=torch.int64)
    num_chunks = math.ceil(num_q / chunk_size)
    chunks = _sorted_chunks(dist, chunk_size, tie_break)
    for start, order in tqdm(
        chunks, total=num_chunks, desc="evaluate_reid", unit="chunk", disable=not _show_progress(progress, num_chunks)
    ):
        stop = start + order.shape[0]
        # Dense work is limited to the sort, one gather and one comparison; everything
        # else only touches the (few) same-pid entries of each row.
        rows, cols = (torch.take(gp, order) == qp[start:stop, None]).nonzero(as_tuple=True)  # row-major order
        removed = gc[order[rows, cols]] == qc[start:stop][rows]  # same pid AND same camera
        good = ~removed
        counts = torch.bincount(rows, minlength=stop - start)
        first_entry = (torch.cumsum(counts, 0) - counts)[rows]  # index of each row's first entry

        def _within_row_cumsum(flags: torch.Tensor) -> torch.Tensor:
            total = torch.cumsum(flags.to(torch.int64), 0)
            exclusive = total - flags.to(torch.int64)
            return total - exclusive[first_entry]

        # 1-based rank in the filtered list = sorted position + 1 - removed entries before it
        pos = cols + 1 - (_within_row_cumsum(removed) - removed.to(torch.int64))
        hits = _within_row_cumsum(good)  # matches up to and including this one
        rows, pos, hits = rows[good], pos[good], hits[good]
        num_rows = stop - start
        num_rel = torch.bincount(rows, minlength=num_rows)
        valid = num_rel > 0
        if not bool(valid.any()):
            continue
        precision = hits.to(torch.float64) / pos.to(torch.float64)
        ap_sum = torch.zeros(num_rows, dtype=torch.float64).index_add_(0, rows, precision)
        last_pos = torch.zeros(num_rows, dtype=torch.int64).scatter_reduce_(0, rows, pos, "amax")
        first_pos = torch.full((num_rows,), num_g + 1, dtype=torch.int64).scatter_reduce_(0, rows, pos, "amin")
        rel = num_rel[valid].to(torch.float64)
        ap = ap_sum[valid] / rel
        inp = rel / last_pos[valid].to(torch.float64)
        cmc_hits += (first_pos[valid, None] <= ranks[None, :]).sum(dim=0).to(torch.float64)
        all_ap.append(ap)
        all_inp.append(inp)
        num_valid += int(valid.sum())

    if num_valid == 0:
        raise ValueError(
            "no query has a valid match: for every query, all gallery images of its identity "
            "(if any) come from the same camera and are excluded. Check that query and gallery "
            "pids/camids come from the same dataset split and are not swapped."
        )
    ap_all = torch.cat(all_ap).numpy()
    inp_all = torch.cat(all_inp).numpy()
    return {
        "mAP": float(ap_all.mean()),
        "mINP": float(inp_all.mean()),
        "cmc": (cmc_hits / num_valid).numpy(),
        "num_valid_queries": num_valid,
        "all_AP": ap_all,
        "all_INP": inp_all,
    }


# --------------------------------------------------------------------------- distances


def _as_float_features(x: ArrayLike, name: str) -> torch.Tensor:
    t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D [num_items, dim], got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty; need at least one feature vector")
    if not torch.is_floating_point(t):
        t = t.to(torch.float32)
    return t.cpu()


def _check_metric(metric: str) -> None:
    if metric not in _METRICS:
        raise ValueError(f"unknown metric {metric!r}; use one of {_METRICS}")


def compute_distmat(
    query_feats: ArrayLike,
    gallery_feats: ArrayLike,
    metric: Literal["cosine", "euclidean"] = "cosine",
) -> torch.Tensor:
    """Distance matrix ``[Q, G]`` (smaller = closer), as FastReID's ``build_dist`` computes it.

    ``"cosine"``: ``1 - <q/|q|, g/|g|>`` in [0, 2].  ``"euclidean"``: the *squared*
    Euclidean distance ``|q|^2 + |g|^2 - 2 q.g`` (same ranking as the Euclidean
    distance; tiny negative values from rounding are kept, as in FastReID).
    """
    _check_metric(metric)
    q = _as_float_features(query_feats, "query_feats")
    g = _as_float_features(gallery_feats, "gallery_feats")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"feature dims differ: query {q.shape[1]} vs gallery {g.shape[1]}")
    dtype = torch.promote_types(q.dtype, g.dtype)
    q, g = q.to(dtype), g.to(dtype)
    if metric == "cosine":
        return 1 - F.normalize(q, dim=1) @ F.normalize(g, dim=1).t()
    sq = q.pow(2).sum(1, keepdim=True) + g.pow(2).sum(1)[None, :]
    return torch.addmm(sq, q, g.t(), beta=1, alpha=-2)


# --------------------------------------------------------------------------- Recall@K


def recall_at_k(
    features: ArrayLike,
    labels: ArrayLike,
    ks: Iterable[int] = (1, 10, 100, 1000),
    *,
    query_features: ArrayLike | None = None,
    query_labels: ArrayLike | None = None,
    metric: Literal["cosine", "euclidean"] = "cosine",
    chunk_size: int = 1024,
    progress: bool = True,
) -> dict[int, float]:
    """Recall@K for image retrieval (Stanford Online Products / In-Shop protocols).

    Without ``query_features`` every item queries all *other* items (itself excluded,
    by index: an exact duplicate at another index still counts).  With
    ``query_features`` / ``query_labels`` the queries search ``features`` (the gallery).
    Recall@K is the fraction of queries with at least one same-label item among their
    K nearest neighbours.  Queries are processed ``chunk_size`` at a time with
    ``torch.topk``, so memory is ``O(chunk_size * N)`` (never ``N x N``).

    A K larger than the number of candidates (``N - 1``, or the gallery size) is
    clipped to it, so such a K reports the fraction of queries whose label occurs in
    the candidates at all.  Returns ``{k: recall}`` with the requested ks as keys and
    fractions in [0, 1].
    """
    _check_metric(metric)
    chunk_size = _check_chunk_size(chunk_size)
    gallery = _as_float_features(features, "features")
    g_labels = _to_numpy(labels, "labels").reshape(-1)
    if g_labels.shape[0] != gallery.shape[0]:
        raise ValueError(f"features has {gallery.shape[0]} rows but labels has {g_labels.shape[0]} entries")
    if (query_features is None) != (query_labels is None):
        raise ValueError("pass both query_features and query_labels (query/gallery form) or neither (SOP form)")
    self_query = query_features is None
    if self_query:
        queries, q_labels = gallery, g_labels
        if gallery.shape[0] < 2:
            raise ValueError("the SOP protocol needs at least 2 items (each item queries all the others)")
    else:
        queries = _as_float_features(query_features, "query_features")
        q_labels = _to_numpy(query_labels, "query_labels").reshape(-1)
        if q_labels.shape[0] != queries.shape[0]:
            raise ValueError(
                f"query_features has {queries.shape[0]} rows but query_labels has {q_labels.shape[0]} entries"
            )
        if queries.shape[1] != gallery.shape[1]:
            raise ValueError(f"feature dims differ: query {queries.shape[1]} vs gallery {gallery.shape[1]}")
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be a non-empty list of positive integers, got {ks}")

    num_candidates = gallery.shape[0] - (1 if self_query else 0)
    kmax = min(max(ks), num_candidates)
    _, codes = np.unique(np.concatenate([q_labels, g_labels]), return_inverse=True)
    codes = torch.from_numpy(codes.reshape(-1).astype(np.int64))
    q_codes, g_codes = codes[: q_labels.shape[0]], codes[q_labels.shape[0]:]

    dtype = torch.promote_types(queries.dtype, gallery.dtype)
    queries, gallery = queries.to(dtype), gallery.to(dtype)
    if metric == "cosine":
        queries, gallery = F.normalize(queries, dim=1), F.normalize(gallery, dim=1)
        g_sq = None
    else:
        g_sq = gallery.pow(2).sum(1)

    num_q = queries.shape[0]
    first_hit = torch.empty(num_q, dtype=torch.int64)  # 0-based rank of the first match, kmax if none
    num_chunks = math.ceil(num_q / chunk_size)
    for start in tqdm(
        range(0, num_q, chunk_size),
        total=num_chunks,
        desc="recall_at_k",
        unit="chunk",
        disable=not _show_progress(progress, num_chunks),
    ):
        stop = min(start + chunk_size, num_q)
        q = queries[start:stop]
        if metric == "cosine":
            score = q @ gallery.t()  # larger = closer
        else:
            score = -(q.pow(2).sum(1, keepdim=True) + g_sq[None, :] - 2 * (q @ gallery.t()))
        if self_query:
            rows = torch.arange(stop - start)
            score[rows, rows + start] = float("-inf")
        top = torch.topk(score, kmax, dim=1, largest=True, sorted=True).indices
        hit = g_codes[top] == q_codes[start:stop, None]
        any_hit = hit.any(dim=1)
        first = hit.to(torch.int8).argmax(dim=1)
        first_hit[start:stop] = torch.where(any_hit, first, torch.full_like(first, kmax))
    return {k: float((first_hit < min(k, kmax)).to(torch.float64).mean()) for k in ks}


# --------------------------------------------------------------------------- features


def _unpack_batch(batch: Any) -> tuple[torch.Tensor, Any, Any]:
    if isinstance(batch, Mapping):
        if "images" not in batch:
            raise KeyError(f"batch dict has no 'images' key (keys: {sorted(batch)})")
        pid_key = "pids" if "pids" in batch else "targets" if "targets" in batch else None
        if pid_key is None or "camids" not in batch:
            raise KeyError(f"batch dict needs 'pids' (or 'targets') and 'camids' keys, got {sorted(batch)}")
        return batch["images"], batch[pid_key], batch["camids"]
    if isinstance(batch, Sequence) and len(batch) >= 3:
        return batch[0], batch[1], batch[2]
    raise TypeError(
        "each batch must be (images, pids, camids) or a dict with 'images', 'pids'/'targets', 'camids'; "
        f"got {type(batch).__name__}"
    )


def _embedding(output: Any) -> torch.Tensor:
    if isinstance(output, (tuple, list)):
        output = output[-1]
    if isinstance(output, Mapping):
        raise TypeError("model returned a dict; wrap it so that it returns the embedding tensor")
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"model output must be a tensor or a tuple ending with one, got {type(output).__name__}")
    return output.reshape(output.shape[0], -1)


def extract_features(
    model: torch.nn.Module,
    loader: Iterable[Any],
    device: str | torch.device = "cpu",
    flip: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``model`` over ``loader`` in eval mode; return ``(feats [N, D] float32, pids [N], camids [N])`` on CPU.

    Batches are ``(images, pids, camids)`` tuples or dicts with ``images``,
    ``pids`` (or FastReID's ``targets``) and ``camids``.  A tuple model output
    ``(logits, embedding)`` uses its last element.  ``flip=True`` averages the
    embeddings of the images and of their horizontal mirrors (FastReID's
    ``TEST.FLIP``).  The model's previous train/eval mode is restored.
    """
    was_training = model.training
    feats: list[torch.Tensor] = []
    pids: list[torch.Tensor] = []
    camids: list[torch.Tensor] = []
    model.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                images, pid, camid = _unpack_batch(batch)
                images = images.to(device)
                emb = _embedding(model(images))
                if flip:
                    emb = (emb + _embedding(model(torch.flip(images, dims=[3])))) / 2
                feats.append(emb.float().cpu())
                pids.append(torch.as_tensor(pid).reshape(-1).cpu())
                camids.append(torch.as_tensor(camid).reshape(-1).cpu())
    finally:
        model.train(was_training)
    if not feats:
        raise ValueError("the loader yielded no batches; check that its dataset is not empty")
    return torch.cat(feats), torch.cat(pids), torch.cat(camids)
