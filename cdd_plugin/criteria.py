"""Mask criteria: which compactor rows stop receiving the task gradient now.

Each criterion has one method, ``propose(state) -> [(score, unit, channel), ...]``: the
channels it would mask at this refresh, most expendable first (the score orders them).
``CDDState`` applies the proposals in order within the budget (``min_channels`` per site, the
FLOPs target) and keeps masks once set, as the authors do. Like torch-pruning's importance
classes, a new rule is a new class registered in ``CRITERIA``.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from .rggr import select_unimportant_many

Proposal = Tuple[float, str, int]


class Criterion:
    """The interface: ``propose(state)`` returns the channels to mask now, most expendable first."""

    name = "base"

    def propose(self, state) -> List[Proposal]:
        raise NotImplementedError


class RGGR(Criterion):
    """Retrieval-Guided Gradient Resetting (METHOD.md section 4): a channel is proposed when it is
    among the ``ratio`` least contributing channels for every (query, teacher neighbour) pair of
    the batch (one batched selection over all sites per refresh); among proposals the smaller row
    norm goes first. A residual group is scored from its output (the stage output) and ranked by
    its members' root-mean-square row norm."""

    name = "rggr"

    def propose(self, state) -> List[Proposal]:
        cfg = state.cfg
        items = {name: (s, t, state.queues[name].bank(), state.queues[name].bank_norms())
                 for name, (s, t) in state.pending().items()}
        masks = select_unimportant_many(items, cfg.k, cfg.ratio, cfg.metric)
        if not masks:
            return []
        dev = next(iter(masks.values())).device
        new = torch.cat([m & state.unit_mask(n).bool().to(dev) for n, m in masks.items()])
        out: List[Proposal] = []
        for name, fresh in zip(masks, new.cpu().split([m.numel() for m in masks.values()])):  # one copy to the host
            if fresh.any():
                norms = state.unit_scores(name).cpu()
                out.extend((float(norms[c]), name, c) for c in fresh.nonzero().flatten().tolist())
        return out


class Norm(Criterion):
    """ResRep's rule: the ``norm_step`` unmasked rows of smallest norm over all sites (a global ranking),
    a few at a time, until the FLOPs target is met."""

    name = "norm"

    def propose(self, state) -> List[Proposal]:
        cfg = state.cfg
        ranked = []
        for unit in state.units:
            norms = state.unit_scores(unit).cpu()
            ranked.extend((float(norms[c]), unit, c) for c in state.unit_mask(unit).nonzero().flatten().tolist())
        ranked.sort()
        active: Dict[str, int] = state.active_channels()
        chosen: List[Proposal] = []
        for p in ranked:
            if len(chosen) >= cfg.norm_step:
                break
            if active[p[1]] > cfg.min_channels:
                chosen.append(p)
                active[p[1]] -= 1
        return chosen


class NoMasks(Criterion):
    """The group lasso alone: nothing is ever masked."""

    name = "none"

    def propose(self, state) -> List[Proposal]:
        return []


CRITERIA = {c.name: c for c in (RGGR, Norm, NoMasks)}


def build_criterion(name: str) -> Criterion:
    return CRITERIA[name]()


__all__ = ["CRITERIA", "Criterion", "NoMasks", "Norm", "RGGR", "build_criterion"]
