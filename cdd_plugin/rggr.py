"""Retrieval-Guided Gradient Resetting: channel selection, memory queues, optimizer wrapper.

``select_unimportant`` is METHOD.md section 4 in vectorised form. The neighbours of an
image are found with its TEACHER feature among the queued teacher features of the layer
(the teacher defines who the neighbours are; the queue already holds this batch, so an
image's own teacher feature is usually its first neighbour). The contribution of channel
c to a (query, neighbour) match is |t_n[c] * s_q[c]|; a channel is unimportant when it is
among the ``ratio`` smallest contributions for EVERY pair of the batch.
``select_unimportant_loop`` is the per-sample, set-intersection form the authors wrote.
One tie-break holds for both: among equally close queued features the lower queue index is
the nearer neighbour, and among equal contributions the lower channel index is the smaller
(stable sorts); so they return identical masks, ties included (tests and
``benchmarks/bench_rggr.py`` check it).
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .config import QUEUE_DTYPES

logger = logging.getLogger("cdd_plugin")


def _check(s: torch.Tensor, t: torch.Tensor, bank: torch.Tensor, k: int, ratio: float, metric: str) -> None:
    if s.dim() != 2 or t.shape != s.shape:
        raise ValueError(f"student and teacher features must both be [B, C]; got {tuple(s.shape)} and {tuple(t.shape)}. "
                         "Fix: pool each layer's output over space before passing it (mean over H, W).")
    if bank.dim() != 2 or bank.shape[1] != s.shape[1]:
        raise ValueError(f"the memory bank must be [N, C={s.shape[1]}], got {tuple(bank.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not (0.0 < ratio <= 1.0):
        raise ValueError(f"ratio must lie in (0, 1], got {ratio}")
    if metric not in ("cosine", "l2"):
        raise ValueError(f"metric must be 'cosine' or 'l2', got {metric!r}")


def similarities(t: torch.Tensor, bank: torch.Tensor, metric: str,
                 bank_norms: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, N] closeness of each query's teacher feature to each queued one (higher = closer):
    cosine similarity, or minus the L2 distance. ``out`` (optional, [B, N] float32) receives them."""
    if metric == "cosine":
        # dividing the similarities by cached row norms avoids writing a normalised copy of
        # the whole bank (hundreds of MB for a ResNet-50 with the paper's queues) per refresh
        norms = (bank.norm(dim=1) if bank_norms is None else bank_norms).clamp_min(1e-12)
        if out is None:
            return (F.normalize(t, dim=1) @ bank.t()) / norms
        return torch.mm(F.normalize(t, dim=1), bank.t(), out=out).div_(norms)
    if out is None:
        return -torch.cdist(t, bank)
    return torch.neg(torch.cdist(t, bank), out=out)


def neighbours(sim: torch.Tensor, k: int) -> torch.Tensor:
    """[B, K] indices of the ``k`` closest queued features, in ascending index order. Tie-break:
    among equally close features the one queued at the lower index is the nearer (what a stable
    descending sort would pick). A top-(k+1) instead of a full sort of every row (N = 24,000 queued
    features: 3-10x faster on a CPU): the (k+1)-th value tells whether the k-th ties, and only then
    are the tied values searched for over ``sim``; the set is the sort's exactly."""
    N = sim.shape[1]
    k = min(k, N)
    top, top_idx = sim.topk(min(k + 1, N), dim=1)                 # one more: it tells whether the k-th ties
    if bool(torch.isnan(top).any()):                              # NaN similarities: the sort decides
        return torch.sort(torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :k], dim=1).values
    out = torch.sort(top_idx[:, :k], dim=1).values                # top-k's set: right where the k-th value
    if k == N:                                                    # does not tie with the next one
        return out
    tied = (top[:, k] >= top[:, k - 1]).nonzero().flatten()       # rows where it does
    if tied.numel() == 0:
        return out
    sub, kth = sim[tied], top[tied, k - 1:k]                      # [R, N], [R, 1] the k-th largest value
    ties = sub == kth
    need = k - (top[tied, :k] > kth).sum(dim=1, keepdim=True)     # ties at the k-th value still to take,
    chosen = (sub > kth) | (ties & (ties.cumsum(dim=1) <= need))  # the lowest-index ones first
    out[tied] = chosen.nonzero()[:, 1].view(tied.numel(), k)
    return out


def num_candidates(channels: int, ratio: float) -> int:
    return max(1, int(ratio * channels))


@torch.no_grad()
def select_unimportant(s: torch.Tensor, t: torch.Tensor, bank: torch.Tensor, k: int, ratio: float,
                       metric: str = "cosine", bank_norms: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean [C]: True where a channel is among the ``ratio`` least contributing for every pair.

    ``bank_norms`` (optional) are the bank's row norms, cached by ``MemoryQueue``. One site of
    ``select_unimportant_many``, which holds the computation."""
    return select_unimportant_many({"site": (s, t, bank, bank_norms)}, k, ratio, metric)["site"]


@torch.no_grad()
def select_unimportant_many(items: Dict[str, Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]],
                            k: int, ratio: float, metric: str = "cosine") -> Dict[str, torch.Tensor]:
    """``select_unimportant`` for every site of a refresh at once: ``{name: (s, t, bank, bank_norms)}``
    -> ``{name: mask}``, each mask the one that site alone would get (a site's rows never meet another's).
    Per pair (query q, teacher neighbour n): contributions |bank[n] * s[q]|, the first ``ratio`` of a
    stable ascending sort are candidates, and a channel is unimportant when it is a candidate for all.

    The similarity products stay one per site (stacking the banks of one width would copy them:
    ~150 MB per refresh for the six 256-wide queues of a ResNet-50, more than the products cost);
    everything after them is batched: one neighbour search over the similarity rows of all sites
    whose banks hold the same number of rows, one candidate sort per channel width. Every batched
    operation works row by row, so the masks are those of the per-site calls exactly (tested). On a
    GPU this turns ~6 kernel launches and 2 host synchronisations per site into a few per refresh."""
    if not items:
        return {}
    for s, t, bank, _ in items.values():
        _check(s, t, bank, k, ratio, metric)
    names = list(items)
    idx: Dict[str, torch.Tensor] = {}
    for rows in _groups(names, lambda n: (items[n][2].shape[0], items[n][2].device)):
        sizes = [items[n][0].shape[0] for n in rows]
        bank0 = items[rows[0]][2]
        sim = torch.empty(sum(sizes), bank0.shape[0], dtype=torch.float32, device=bank0.device)
        for n, part in zip(rows, sim.split(sizes)):               # each site's rows written in place
            similarities(items[n][1].float(), items[n][2].float(), metric, items[n][3], out=part)
        idx.update(zip(rows, neighbours(sim, k).split(sizes)))
    contrib = {n: (items[n][2][idx[n]].float() * items[n][0].float()[:, None, :]).abs() for n in names}  # [B, K, C]
    out: Dict[str, torch.Tensor] = {}
    for rows in _groups(names, lambda n: (tuple(contrib[n].shape), contrib[n].device)):
        c = torch.stack([contrib[n] for n in rows])                # [S, B, K, C]
        keep = num_candidates(c.shape[-1], ratio)
        order = torch.argsort(c, dim=-1, stable=True)[..., :keep]
        cand = torch.zeros_like(c, dtype=torch.bool).scatter_(-1, order, True)
        out.update(zip(rows, cand.flatten(1, 2).all(dim=1).unbind(0)))
    return {n: out[n] for n in names}


def _groups(names: List[str], key) -> List[List[str]]:
    """``names`` split by ``key``, in first-seen order."""
    groups: Dict[object, List[str]] = {}
    for n in names:
        groups.setdefault(key(n), []).append(n)
    return list(groups.values())


@torch.no_grad()
def select_unimportant_loop(s: torch.Tensor, t: torch.Tensor, bank: torch.Tensor, k: int, ratio: float,
                            metric: str = "cosine") -> torch.Tensor:
    """Reference per-sample form with Python set intersections, the authors' (slow; for tests and
    benchmarks). The neighbour search is the shared one (same similarities, same tie-break), so
    both forms see the same pairs; candidates are the first ``n`` of a stable ascending sort of
    the contributions (ties: the lower channel index first), as in the vectorised form."""
    _check(s, t, bank, k, ratio, metric)
    s, t, bank = s.float(), t.float(), bank.float()
    C = s.shape[1]
    n = num_candidates(C, ratio)
    nbr = neighbours(similarities(t, bank, metric), k)
    common: Optional[set] = None
    for q in range(s.shape[0]):
        for j in nbr[q].tolist():
            contrib = (bank[j] * s[q]).abs()
            cand = set(torch.argsort(contrib, stable=True)[:n].tolist())
            common = cand if common is None else common & cand
    mask = torch.zeros(C, dtype=torch.bool)
    if common:
        mask[sorted(common)] = True
    return mask


_DTYPES = {name: getattr(torch, name) for name in QUEUE_DTYPES}   # the names CDDConfig.queue_dtype accepts
_FP16_MAX = 65504.0


class MemoryQueue:
    """First-in-first-out store of pooled teacher features of one layer.

    ``dtype`` ("float32", "bfloat16", "float16") is the storage type; row norms are kept in
    float32, computed from the stored (rounded) rows, so a queue rebuilt from its
    ``state_dict`` is identical to the one that wrote it."""

    def __init__(self, size: int, channels: int, dtype: str = "float32"):
        if dtype not in _DTYPES:
            raise ValueError(f"queue dtype {dtype!r} is unknown; use one of {', '.join(_DTYPES)}")
        self.size = int(size)
        self.channels = int(channels)
        self.dtype = dtype
        self.data: Optional[torch.Tensor] = None
        self.norms: Optional[torch.Tensor] = None   # float32 row norms of the stored rows
        self.ptr = 0
        self.count = 0

    def _alloc(self, device) -> None:
        self.data = torch.zeros(self.size, self.channels, dtype=_DTYPES[self.dtype], device=device)
        self.norms = torch.zeros(self.size, device=device)

    def check(self, feats: torch.Tensor) -> None:
        """Raise ValueError if ``push(feats)`` would fail; changes nothing."""
        if feats.dim() != 2 or feats.shape[1] != self.channels:
            raise ValueError(f"memory queue of {self.channels} channels got features of shape {tuple(feats.shape)}")
        if self.dtype == "float16" and feats.numel() and float(feats.detach().abs().max()) > _FP16_MAX:
            raise ValueError(f"a teacher feature of {float(feats.detach().abs().max()):.3g} exceeds float16's range "
                             f"({_FP16_MAX:.0f}); store the queues with queue_dtype='bfloat16' or 'float32'")

    def push(self, feats: torch.Tensor) -> None:
        self.check(feats)
        feats = feats.detach().float()
        if self.data is None:
            self._alloc(feats.device)
        if feats.shape[0] >= self.size:
            feats = feats[-self.size:]
        stored = feats.to(self.data.dtype)
        n = stored.shape[0]
        end = self.ptr + n
        fn = stored.float().norm(dim=1)
        if end <= self.size:
            self.data[self.ptr:end] = stored
            self.norms[self.ptr:end] = fn
        else:
            first = self.size - self.ptr
            self.data[self.ptr:] = stored[:first]
            self.data[: n - first] = stored[first:]
            self.norms[self.ptr:] = fn[:first]
            self.norms[: n - first] = fn[first:]
        self.ptr = end % self.size
        self.count = min(self.size, self.count + n)

    def bank(self) -> torch.Tensor:
        """The queued rows in their storage type ([count, C]); selection computes in float32."""
        if self.data is None:
            return torch.zeros(0, self.channels)
        return self.data[: self.count] if self.count < self.size else self.data

    def bank_norms(self) -> torch.Tensor:
        if self.norms is None:
            return torch.zeros(0)
        return self.norms[: self.count] if self.count < self.size else self.norms

    def nbytes(self) -> int:
        """Bytes the queue holds (rows and norms) once allocated."""
        return 0 if self.data is None else self.data.numel() * self.data.element_size() + self.norms.numel() * 4

    def state_dict(self, with_data: bool = True) -> dict:
        """Rows (in the storage type), write position and fill. ``with_data=False`` records an
        empty queue of the same size: a resumed run refills it."""
        if not with_data:
            return {"data": None, "ptr": 0, "count": 0, "size": self.size, "omitted": True}
        return {"data": None if self.data is None else self.data[: self.count].cpu().clone()
                if self.count < self.size else self.data.cpu().clone(),
                "ptr": self.ptr, "count": self.count, "size": self.size}

    def load_state_dict(self, sd: dict, device=None) -> None:
        if int(sd["size"]) != self.size:
            raise ValueError(f"checkpoint queue size {sd['size']} differs from the configured {self.size}; "
                             "resume with the same queue_size")
        self.ptr, self.count = int(sd["ptr"]), int(sd["count"])
        self.data = self.norms = None
        if sd["data"] is not None:
            self._alloc(device)
            self.data[: sd["data"].shape[0]] = sd["data"].to(self.data.device, self.data.dtype)
            self.norms = self.data.float().norm(dim=1)
