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
from typing import Optional

import torch
import torch.nn.functional as F

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
                 bank_norms: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, N] closeness of each query's teacher feature to each queued one (higher = closer):
    cosine similarity, or minus the L2 distance."""
    if metric == "cosine":
        # dividing the similarities by cached row norms avoids writing a normalised copy of
        # the whole bank (hundreds of MB for a ResNet-50 with the paper's queues) per refresh
        norms = bank.norm(dim=1) if bank_norms is None else bank_norms
        return (F.normalize(t, dim=1) @ bank.t()) / norms.clamp_min(1e-12)
    return -torch.cdist(t, bank)


def neighbours(sim: torch.Tensor, k: int) -> torch.Tensor:
    """[B, K] indices of the ``k`` closest queued features. Tie-break: among equally close
    features the one queued at the lower index comes first (a stable sort)."""
    k = min(k, sim.shape[1])
    return torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :k]


def num_candidates(channels: int, ratio: float) -> int:
    return max(1, int(ratio * channels))


@torch.no_grad()
def select_unimportant(s: torch.Tensor, t: torch.Tensor, bank: torch.Tensor, k: int, ratio: float,
                       metric: str = "cosine", bank_norms: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean [C]: True where a channel is among the ``ratio`` least contributing for every pair.

    ``bank_norms`` (optional) are the bank's row norms, cached by ``MemoryQueue``."""
    _check(s, t, bank, k, ratio, metric)
    s, t, bank = s.float(), t.float(), bank.float()
    idx = neighbours(similarities(t, bank, metric, bank_norms), k)  # [B, K]
    contrib = (bank[idx] * s[:, None, :]).abs()                # [B, K, C]
    n = num_candidates(s.shape[1], ratio)
    order = torch.argsort(contrib, dim=-1, stable=True)[..., :n]
    cand = torch.zeros_like(contrib, dtype=torch.bool).scatter_(-1, order, True)
    return cand.flatten(0, 1).all(dim=0)


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


class MemoryQueue:
    """First-in-first-out store of pooled teacher features of one layer."""

    def __init__(self, size: int, channels: int):
        self.size = int(size)
        self.channels = int(channels)
        self.data: Optional[torch.Tensor] = None
        self.norms: Optional[torch.Tensor] = None   # row norms, kept in step with data
        self.ptr = 0
        self.count = 0

    def push(self, feats: torch.Tensor) -> None:
        feats = feats.detach().float()
        if feats.dim() != 2 or feats.shape[1] != self.channels:
            raise ValueError(f"memory queue of {self.channels} channels got features of shape {tuple(feats.shape)}")
        if self.data is None:
            self.data = torch.zeros(self.size, self.channels, device=feats.device)
            self.norms = torch.zeros(self.size, device=feats.device)
        if feats.shape[0] >= self.size:
            feats = feats[-self.size:]
        n = feats.shape[0]
        end = self.ptr + n
        fn = feats.norm(dim=1)
        if end <= self.size:
            self.data[self.ptr:end] = feats
            self.norms[self.ptr:end] = fn
        else:
            first = self.size - self.ptr
            self.data[self.ptr:] = feats[:first]
            self.data[: n - first] = feats[first:]
            self.norms[self.ptr:] = fn[:first]
            self.norms[: n - first] = fn[first:]
        self.ptr = end % self.size
        self.count = min(self.size, self.count + n)

    def bank(self) -> torch.Tensor:
        if self.data is None:
            return torch.zeros(0, self.channels)
        return self.data[: self.count] if self.count < self.size else self.data

    def bank_norms(self) -> torch.Tensor:
        if self.norms is None:
            return torch.zeros(0)
        return self.norms[: self.count] if self.count < self.size else self.norms

    def state_dict(self) -> dict:
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
            self.data = torch.zeros(self.size, self.channels, device=device)
            self.data[: sd["data"].shape[0]] = sd["data"].to(self.data.device)
            self.norms = self.data.norm(dim=1)
