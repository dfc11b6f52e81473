"""RGGROptimizer: the RGGR gradient step as a wrapper around any torch optimizer."""
from __future__ import annotations

from typing import List

import torch
from torch import nn

from .dgc import DGC


class RGGROptimizer:
    """Wraps ``optimizer``; ``step()`` refreshes masks (by schedule), resets DGC gradients
    (METHOD.md section 4) and then steps the wrapped optimizer.

    It is an instance of the wrapped optimizer's class (``isinstance(opt, torch.optim.SGD)``
    stays true), shares its parameter groups and per-parameter state, so LR schedulers and
    ``torch.amp.GradScaler`` work with it unchanged. Its ``state_dict()`` also carries the
    CDD state under ``"cdd"``, so a framework that checkpoints the optimizer resumes CDD too.
    """

    def __new__(cls, optimizer: torch.optim.Optimizer, state):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"RGGROptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, _RGGRMixin):
            raise TypeError("this optimizer is already wrapped by RGGROptimizer; wrap the plain optimizer once")
        dgc_params = {id(d.weight) for d in state.compactors.values()}
        in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = dgc_params - in_opt
        if missing:
            raise ValueError(f"{len(missing)} DGC parameter(s) are not in the optimizer; build the optimizer from "
                             "model.parameters() AFTER cdd_plugin.insert_dgc(model, ...)")
        state.apply_weight_decay_policy(optimizer)
        sub = type(f"RGGR{type(optimizer).__name__}", (_RGGRMixin, type(optimizer)), {})
        obj = object.__new__(sub)
        obj.__dict__.update(optimizer.__dict__)
        obj.__dict__.pop("step", None)  # an LR scheduler's patch of the inner step would bypass RGGR
        obj.cdd = state
        obj.inner = optimizer
        return obj


class _RGGRMixin:
    cdd = None

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # a GradScaler calls this step only when it found no overflow (and after unscaling)
        self.cdd.step(self, lambda: super(_RGGRMixin, self).step())
        return loss

    def state_dict(self):
        sd = super().state_dict()
        sd["cdd"] = self.cdd.state_dict()
        return sd

    def load_state_dict(self, state_dict):
        """Check the CDD entry and the optimizer groups first, then load both (nothing half-loaded).
        A plain optimizer state without the CDD entry is refused: training would restart the CDD
        schedule from iteration 0 with fresh masks and queues while the weights continue."""
        state_dict = dict(state_dict)
        cdd = state_dict.pop("cdd", None)
        if cdd is None:
            raise ValueError("this optimizer state has no 'cdd' entry (it was saved by a plain optimizer, not by "
                             "RGGROptimizer), so masks, memory queues and the mask schedule would silently start "
                             "afresh. Fix: resume from a checkpoint written by the CDD run; to start CDD from these "
                             "weights on purpose, load the model weights only and keep the new optimizer")
        self.cdd.check_state_dict(cdd)
        groups, saved = self.param_groups, state_dict.get("param_groups", [])
        if len(groups) != len(saved) or any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved)):
            raise ValueError(f"the optimizer state has {len(saved)} parameter group(s) of sizes "
                             f"{[len(s['params']) for s in saved]}, this optimizer {len(groups)} of sizes "
                             f"{[len(g['params']) for g in groups]}; build the optimizer exactly as in the run that "
                             "saved it (same param_groups, same CDDConfig.decay_compactors)")
        super().load_state_dict(state_dict)
        self.cdd.load_state_dict(cdd)


def param_groups(model: nn.Module, lr: float, weight_decay: float = 5e-4, **extra) -> List[dict]:
    """Two parameter groups: the student's own weights, and the DGCs, which get the same weight
    decay when surgery ran with ``CDDConfig.decay_compactors=True`` (the authors' default) and
    none when it ran with False (the group lasso is then their only regulariser)."""
    dgcs = [m for m in model.modules() if isinstance(m, DGC)]
    dgc_ids = {id(m.weight) for m in dgcs}
    dgc = [p for p in model.parameters() if id(p) in dgc_ids and p.requires_grad]
    rest = [p for p in model.parameters() if id(p) not in dgc_ids and p.requires_grad]
    groups = [{"params": rest, "lr": lr, "weight_decay": weight_decay, **extra}]
    if dgc:
        decay = all(getattr(m, "decay", True) for m in dgcs)
        groups.append({"params": dgc, "lr": lr, "weight_decay": weight_decay if decay else 0.0, **extra})
    return groups
