"""Stanford Online Products and Market-1501 in MMPretrain's ``DATASETS``, and a P x K batch sampler.

List parsing is the core's (``cdd_plugin.datasets.parse_sop`` / ``parse_market1501``):
a wrong header, a malformed line or a listed image that does not exist is an error
that names the file and line. The datasets only turn the parsed samples into
MMPretrain data infos (``img_path``, ``gt_label``; for re-ID also ``camid`` and
``is_query``, which the test pipeline passes on with
``PackInputs(algorithm_keys=('camid', 'is_query'))``).
"""
from __future__ import annotations

import itertools
from typing import List, Optional

from mmengine.dist import get_dist_info
from mmpretrain.datasets import BaseDataset
from mmpretrain.registry import DATA_SAMPLERS, DATASETS

from cdd_plugin.datasets import PKSampler, parse_market1501, parse_sop


@DATASETS.register_module()
class StanfordOnlineProducts(BaseDataset):
    """Stanford Online Products (``<data_root>/Ebay_train.txt``, ``Ebay_test.txt``).

    Args:
        data_root: the folder holding the two list files and the class folders.
        split: ``'train'`` (labels relabelled to ``0..C-1``) or ``'test'`` (every test
            image queries all the others; evaluate with ``SOPRecall``).
        **kwargs: other arguments of MMPretrain's ``BaseDataset`` (``pipeline``,
            ``indices``, ``test_mode``, ...).
    """

    SPLITS = ("train", "test")

    def __init__(self, data_root: str, split: str = "train", **kwargs) -> None:
        if split not in self.SPLITS:
            raise ValueError(f"StanfordOnlineProducts split={split!r}; use one of {self.SPLITS}")
        self.split = split
        kwargs.setdefault("ann_file", "")
        super().__init__(data_root=data_root, **kwargs)

    def load_data_list(self) -> List[dict]:
        samples = getattr(parse_sop(self.data_root), self.split)
        return [dict(img_path=s.path, gt_label=int(s.pid)) for s in samples]


@DATASETS.register_module()
class Market1501(BaseDataset):
    """Market-1501 (``bounding_box_train``, ``query``, ``bounding_box_test``).

    Args:
        data_root: the dataset folder (or the folder containing
            ``Market-1501-v15.09.15``).
        split: ``'train'`` (pids relabelled to ``0..750``), ``'query'``, ``'gallery'``,
            or ``'test'`` = query followed by gallery, each image flagged ``is_query``
            (one dataloader for ``ReIDMetric``).
        **kwargs: other arguments of MMPretrain's ``BaseDataset``.
    """

    SPLITS = ("train", "query", "gallery", "test")

    def __init__(self, data_root: str, split: str = "train", **kwargs) -> None:
        if split not in self.SPLITS:
            raise ValueError(f"Market1501 split={split!r}; use one of {self.SPLITS}")
        self.split = split
        kwargs.setdefault("ann_file", "")
        super().__init__(data_root=data_root, **kwargs)

    def load_data_list(self) -> List[dict]:
        splits = parse_market1501(self.data_root)
        parts = {"train": [(splits.train, False)], "query": [(splits.query, True)],
                 "gallery": [(splits.gallery, False)],
                 "test": [(splits.query, True), (splits.gallery, False)]}[self.split]
        return [dict(img_path=s.path, gt_label=int(s.pid), camid=int(s.camid), is_query=is_query)
                for samples, is_query in parts for s in samples]


@DATA_SAMPLERS.register_module()
class PKBatchSampler:
    """Identity-balanced batches (``batch_size // instances`` identities x ``instances``
    images), the core's ``PKSampler`` in mmengine's ``batch_sampler`` slot::

        train_dataloader = dict(batch_size=64, sampler=dict(type='DefaultSampler', shuffle=True),
                                batch_sampler=dict(type='PKBatchSampler', instances=4), ...)

    Labels come from the dataset's ``gt_label``. Under torch.distributed each rank draws
    its own batches (seed + rank) and an epoch has ``len // world_size`` of them per rank,
    so an epoch still covers the data about once. The epoch set on the wrapped sampler
    (mmengine's ``DistSamplerSeedHook``) reshuffles. Without ``seed`` the wrapped sampler's
    (the run's seed) is used; ``CDDHook`` re-seeds with the checkpoint's seed on resume
    (``reseed``), so a resumed run draws the batches the interrupted one would have drawn.
    """

    def __init__(self, sampler, batch_size: int, instances: int = 4, seed: Optional[int] = None) -> None:
        if batch_size % instances:
            raise ValueError(f"PKBatchSampler: batch_size={batch_size} is not a multiple of instances={instances}")
        dataset = sampler.dataset
        pids = [int(dataset.get_data_info(i)["gt_label"]) for i in range(len(dataset))]
        self.rank, self.world_size = get_dist_info()
        self.explicit_seed = seed is not None
        base = getattr(sampler, "seed", None) if seed is None else seed
        self.sampler = sampler
        self.batch_size = batch_size
        self.pk = PKSampler(pids, p=batch_size // instances, k=instances, seed=int(base or 0) + self.rank)

    @property
    def seed(self) -> int:
        """The base seed (this rank draws with ``seed + rank``)."""
        return self.pk.seed - self.rank

    def reseed(self, seed: int) -> None:
        """Draw from now on with base seed ``seed`` (``seed + rank`` on this rank)."""
        self.pk.seed = int(seed) + self.rank

    def __len__(self) -> int:
        return max(1, len(self.pk) // self.world_size)

    def __iter__(self):
        self.pk.set_epoch(int(getattr(self.sampler, "epoch", 0)))
        return itertools.islice(iter(self.pk), len(self))


__all__ = ["Market1501", "PKBatchSampler", "StanfordOnlineProducts"]
