"""Retrieval metrics in MMPretrain's ``METRICS``; the maths is ``cdd_plugin.evaluation``'s.

Both metrics collect each image's embedding (set by ``EmbeddingRetriever`` /
``CDDRetriever`` predictions) with its labels, and hand them to the core:

* ``SOPRecall``: Stanford Online Products Recall@K, every image querying all the
  others with its own image excluded (MMPretrain's ``RetrievalRecall`` does not exclude
  it). With ``is_query`` flags on the samples it runs the query/gallery form (In-Shop).
* ``ReIDMetric``: Market-1501 style mAP / mINP / CMC, gallery images with the query's
  identity *and* camera removed (``cdd_plugin.evaluation.evaluate_reid``).

Values are reported in percent, as MMPretrain's and FastReID's metrics are.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from mmengine.evaluator import BaseMetric
from mmpretrain.registry import METRICS

from cdd_plugin.evaluation import compute_distmat, evaluate_reid, recall_at_k

from .model import EMBEDDING_FIELD


def _get(sample: dict, key: str, metric: str, fix: str):
    if key not in sample:
        raise KeyError(f"{metric}: the prediction has no '{key}' field. Fix: {fix}")
    return sample[key]


_NEED_EMBEDDING = ("use model type='CDDRetriever' or 'EmbeddingRetriever' (their predictions carry each image's "
                   "embedding)")
_NEED_REID_KEYS = ("use a re-ID dataset (e.g. type='Market1501', split='test') and end its test pipeline with "
                   "dict(type='PackInputs', algorithm_keys=('camid', 'is_query'))")


def _label(sample: dict) -> int:
    label = _get(sample, "gt_label", "metric", "the test dataset must provide gt_label")
    return int(label.reshape(-1)[0]) if isinstance(label, torch.Tensor) else int(label)


def _flag(value) -> int:
    return int(value.reshape(-1)[0]) if isinstance(value, torch.Tensor) else int(value)


@METRICS.register_module()
class SOPRecall(BaseMetric):
    """Recall@K with self-exclusion (Stanford Online Products protocol).

    Args:
        topk: the K values (default 1, 10, 100, 1000; a K above the number of
            candidates counts all of them).
        metric: ``'cosine'`` or ``'euclidean'``.
        collect_device, prefix: as for any mmengine metric.
    """

    default_prefix: Optional[str] = "retrieval"

    def __init__(self, topk: Union[int, Sequence[int]] = (1, 10, 100, 1000), metric: str = "cosine",
                 collect_device: str = "cpu", prefix: Optional[str] = None) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix)
        self.topk = (int(topk),) if isinstance(topk, int) else tuple(int(k) for k in topk)
        if not self.topk or min(self.topk) < 1:
            raise ValueError(f"SOPRecall topk={topk!r}: give positive integers, e.g. (1, 10, 100, 1000)")
        if metric not in ("cosine", "euclidean"):
            raise ValueError(f"SOPRecall metric={metric!r}: use 'cosine' or 'euclidean'")
        self.metric = metric

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        for s in data_samples:
            emb = _get(s, EMBEDDING_FIELD, "SOPRecall", _NEED_EMBEDDING)
            item = {"embedding": emb.detach().float().cpu(), "label": _label(s)}
            if "is_query" in s:
                item["is_query"] = _flag(s["is_query"])
            self.results.append(item)

    def compute_metrics(self, results: List[dict]) -> dict:
        feats = torch.stack([r["embedding"] for r in results])
        labels = torch.tensor([r["label"] for r in results])
        if all("is_query" in r for r in results):
            q = torch.tensor([bool(r["is_query"]) for r in results])
            rec = recall_at_k(feats[~q], labels[~q], self.topk, query_features=feats[q], query_labels=labels[q],
                              metric=self.metric, progress=False)
        else:
            rec = recall_at_k(feats, labels, self.topk, metric=self.metric, progress=False)
        return {f"Recall@{k}": 100.0 * v for k, v in rec.items()}


@METRICS.register_module()
class ReIDMetric(BaseMetric):
    """Camera-aware re-ID evaluation: ``mAP``, ``mINP`` and CMC ``rank1``/``rank5``/``rank10``, in percent.

    Needs ``embedding``, ``gt_label`` (identity), ``camid`` and ``is_query`` on every
    prediction (``Market1501(split='test')`` with
    ``PackInputs(algorithm_keys=('camid', 'is_query'))``).

    Args:
        ranks: the CMC ranks reported (default 1, 5, 10).
        metric: ``'cosine'`` or ``'euclidean'`` distance.
        max_rank: length of the CMC curve computed.
    """

    default_prefix: Optional[str] = "reid"

    def __init__(self, ranks: Sequence[int] = (1, 5, 10), metric: str = "cosine", max_rank: int = 50,
                 collect_device: str = "cpu", prefix: Optional[str] = None) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix)
        if metric not in ("cosine", "euclidean"):
            raise ValueError(f"ReIDMetric metric={metric!r}: use 'cosine' or 'euclidean'")
        self.ranks = tuple(int(r) for r in ranks)
        if not self.ranks or min(self.ranks) < 1 or max(self.ranks) > int(max_rank):
            raise ValueError(f"ReIDMetric ranks={ranks!r} must lie in 1..max_rank={max_rank}")
        self.metric = metric
        self.max_rank = int(max_rank)

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        for s in data_samples:
            emb = _get(s, EMBEDDING_FIELD, "ReIDMetric", _NEED_EMBEDDING)
            camid = _get(s, "camid", "ReIDMetric", _NEED_REID_KEYS)
            is_query = _get(s, "is_query", "ReIDMetric", _NEED_REID_KEYS)
            self.results.append({"embedding": emb.detach().float().cpu(), "pid": _label(s),
                                 "camid": _flag(camid), "is_query": bool(_flag(is_query))})

    def compute_metrics(self, results: List[dict]) -> dict:
        feats = torch.stack([r["embedding"] for r in results])
        pids = torch.tensor([r["pid"] for r in results])
        cams = torch.tensor([r["camid"] for r in results])
        q = torch.tensor([r["is_query"] for r in results])
        if not q.any() or q.all():
            raise ValueError("ReIDMetric needs both query and gallery images (is_query True and False); evaluate "
                             "the re-ID dataset's split='test' (query followed by gallery)")
        dist = compute_distmat(feats[q], feats[~q], metric=self.metric)
        res = evaluate_reid(dist, pids[q], pids[~q], cams[q], cams[~q], max_rank=self.max_rank, progress=False)
        out = {"mAP": 100.0 * res["mAP"], "mINP": 100.0 * res["mINP"]}
        cmc = res["cmc"]
        for r in self.ranks:
            out[f"rank{r}"] = 100.0 * float(cmc[min(r, len(cmc)) - 1])
        return out


__all__ = ["ReIDMetric", "SOPRecall"]
