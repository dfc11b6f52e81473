"""Where FastReID finds its datasets, and small identity subsets for quick runs and tests.

Dataset root
    FastReID 1.4.0 reads datasets from one folder fixed at import time (env
    ``FASTREID_DATASETS``, default ``datasets``). ``DATASETS.ROOT`` (added by
    ``add_cdd_config``) sets it per config; empty means ``$FASTREID_DATASETS`` or
    ``datasets``. The folder holds each dataset in FastReID's layout:
    ``Market-1501-v15.09.15/``, ``veri/`` (VeRi-776), ``MSMT17_V1/`` or ``MSMT17_V2/``.

Subsets
    ``Market1501Subset``, ``VeRiSubset`` and ``MSMT17Subset`` are the FastReID datasets
    restricted to their first ``DATASETS.SUBSET_IDS`` identities (by identity number):
    the training split keeps the first N training identities, query and gallery keep
    the first N test identities. Use them in ``DATASETS.NAMES`` / ``DATASETS.TESTS``.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, List, Sequence, Tuple

from fastreid.data.datasets import DATASET_REGISTRY, MSMT17, Market1501, VeRi

SUBSET_SUFFIX = "Subset"


def dataset_root(cfg) -> str:
    """The folder FastReID should read datasets from, for this config."""
    root = str(cfg.DATASETS.get("ROOT", "") or "")
    return root or os.getenv("FASTREID_DATASETS", "datasets")


@contextlib.contextmanager
def using_root(root: str) -> Iterator[None]:
    """Point ``fastreid.data.build`` at ``root`` while loaders are being built."""
    from fastreid.data import build

    previous = build._root
    build._root = root
    try:
        yield
    finally:
        build._root = previous


def _identity_number(pid) -> int:
    # training pids are "<dataset>_<number>"; test pids are plain integers
    return int(str(pid).rsplit("_", 1)[-1])


def _first_identities(items: Sequence[Tuple], n: int, pids: Sequence = None) -> List[Tuple]:
    keep = set(pids) if pids is not None else set(sorted({p for _, p, _ in items}, key=_identity_number)[:n])
    return [it for it in items if it[1] in keep]


def _subset_of(base: type) -> type:
    def __init__(self, root: str = "datasets", subset_ids: int = 0, **kwargs):
        if int(subset_ids) < 1:
            raise ValueError(f"{type(self).__name__} needs DATASETS.SUBSET_IDS >= 1 (the number of identities to "
                             f"keep); set e.g. `DATASETS.SUBSET_IDS 8`, or use {base.__name__} for the full dataset")
        base.__init__(self, root=root, **kwargs)
        n = int(subset_ids)
        self._train = _first_identities(self.train, n)
        test_ids = sorted({p for _, p, _ in self.query}, key=_identity_number)[:n]
        self._query = _first_identities(self.query, n, test_ids)
        self._gallery = _first_identities(self.gallery, n, test_ids)
        self.data = {"train": self._train, "query": self._query, "gallery": self._gallery}[self.mode]

    doc = (f"{base.__name__} restricted to its first ``DATASETS.SUBSET_IDS`` identities "
           f"(training, query and gallery); for quick runs and tests.")
    return type(base.__name__ + SUBSET_SUFFIX, (base,), {"__init__": __init__, "__doc__": doc})


def register_subsets() -> None:
    """Register the subset datasets in FastReID's DATASET_REGISTRY (idempotent)."""
    for base in (Market1501, VeRi, MSMT17):
        name = base.__name__ + SUBSET_SUFFIX
        if name not in DATASET_REGISTRY._obj_map:  # fastreid.utils.registry.Registry has no __contains__
            DATASET_REGISTRY.register(_subset_of(base))


def loader_kwargs(cfg, names: Sequence[str]) -> dict:
    """Extra dataset arguments for FastReID's loader builders (the subset size), checked against the names."""
    n = int(cfg.DATASETS.get("SUBSET_IDS", 0) or 0)
    subsets = [d for d in names if d.endswith(SUBSET_SUFFIX)]
    if n > 0 and len(subsets) != len(names):
        plain = [d for d in names if not d.endswith(SUBSET_SUFFIX)]
        raise ValueError(f"DATASETS.SUBSET_IDS={n} only applies to the *Subset datasets, but {plain} are full "
                         f"datasets; use e.g. {[d + SUBSET_SUFFIX for d in plain]} or set DATASETS.SUBSET_IDS 0")
    return {"subset_ids": n} if subsets else {}


def missing_dataset_error(names: Sequence[str], root: str, exc: BaseException) -> FileNotFoundError:
    layout = {"Market1501": "Market-1501-v15.09.15/{bounding_box_train,query,bounding_box_test}",
              "VeRi": "veri/{image_train,image_query,image_test}",
              "MSMT17": "MSMT17_V1/{train,test,list_*.txt} (or MSMT17_V2)"}
    wanted = "; ".join(f"{d}: {os.path.join(root, layout.get(d.replace(SUBSET_SUFFIX, ''), d))}" for d in names)
    return FileNotFoundError(
        f"dataset {', '.join(names)} not found under DATASETS.ROOT={os.path.abspath(root)!r} (FastReID says: {exc}). "
        f"Expected {wanted}. Fix: point DATASETS.ROOT (or the environment variable FASTREID_DATASETS) at the folder "
        f"that contains the dataset, e.g. append `DATASETS.ROOT /path/to/datasets` to the command line.")


def is_missing_dataset(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, (RuntimeError, AssertionError, FileNotFoundError)) and "not found" in text
