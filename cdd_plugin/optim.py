"""RGGROptimizer: the RGGR gradient step as a wrapper around any torch optimizer."""
from __future__ import annotations

from typing import Iterable, List

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
        bad = [n for n, d in self.cdd.compactors.items() if d.weight.grad is not None
               and not torch.isfinite(d.weight.grad).all()]
        if bad:
            raise FloatingPointError(
                f"non-finite gradients at iteration {self.cdd.iteration} (first at {bad[0]}); the step was not taken, "
                "so weights and masks are unchanged. Fix: lower the learning rate, check the inputs for NaNs, or "
                "train with torch.amp.GradScaler, which skips such steps")
        self.cdd.on_step()
        self.cdd.reset_gradients(check_finite=False)  # checked just above
        super().step()
        self.cdd.after_step(self)
        return loss

    def state_dict(self):
        sd = super().state_dict()
        sd["cdd"] = self.cdd.state_dict()
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        cdd = state_dict.pop("cdd", None)
        if cdd is not None:
            self.cdd.load_state_dict(cdd)
        super().load_state_dict(state_dict)


def param_groups(model: nn.Module, lr: float, weight_decay: float = 5e-4, **extra) -> List[dict]:
    """Parameter groups with DGCs exempt from weight decay (the group lasso is their regulariser)."""
    dgc_ids = {id(m.weight) for m in model.modules() if isinstance(m, DGC)}
    dgc = [p for p in model.parameters() if id(p) in dgc_ids and p.requires_grad]
    rest = [p for p in model.parameters() if id(p) not in dgc_ids and p.requires_grad]
    groups = [{"params": rest, "lr": lr, "weight_decay": weight_decay, **extra}]
    if dgc:
        groups.append({"params": dgc, "lr": lr, "weight_decay": 0.0, **extra})
    return groups
