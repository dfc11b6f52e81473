"""The RGGR gradient step as mmengine optimizer wrappers.

``CDDOptimWrapper`` (and ``CDDAmpOptimWrapper`` for mixed precision) run the core's one
step protocol, ``CDDState.step`` (mask refresh by schedule, the RGGR gradient edit of
METHOD.md section 4, the inner step, the proximal snap; one policy for non-finite
gradients), only on real steps when gradients are accumulated. Their ``state_dict`` carries the CDD
state under ``"cdd"``, so mmengine's resume restores masks, queues and schedule.

The wrappers are bound to the model's CDD state by ``CDDOptimWrapperConstructor``::

    optim_wrapper = dict(type='CDDOptimWrapper', constructor='CDDOptimWrapperConstructor',
                         optimizer=dict(type='SGD', lr=0.01, momentum=0.9))
"""
from __future__ import annotations

from typing import Optional

from mmengine.optim import AmpOptimWrapper, DefaultOptimWrapperConstructor, OptimWrapper
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS, OPTIM_WRAPPERS
from torch import nn

CDD_KEY = "cdd"


class _CDDStep:
    """The CDD part shared by both wrappers."""

    cdd = None
    _pending_cdd: Optional[dict] = None

    def bind(self, state) -> None:
        """Attach the ``CDDState`` whose DGC gradients this wrapper edits."""
        dgc = {id(d.weight) for d in state.compactors.values()}
        in_opt = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        if dgc - in_opt:
            raise ValueError(f"{len(dgc - in_opt)} DGC parameter(s) are not in the optimizer; build the optimizer "
                             "from the CDD model's parameters (do not freeze or filter the '*.cdd_dgc.weight' "
                             "parameters in paramwise_cfg)")
        self.cdd = state
        state.apply_weight_decay_policy(self.optimizer)
        if self._pending_cdd is not None:
            state.load_state_dict(self._pending_cdd)
            self._pending_cdd = None

    def _bound(self):
        if self.cdd is None:
            raise RuntimeError(
                f"{type(self).__name__} is not bound to a CDD state. Fix: set "
                "optim_wrapper.constructor='CDDOptimWrapperConstructor' in the config (it binds the wrapper to "
                "the CDDRetriever's state), or call wrapper.bind(model.cdd_state)")
        return self.cdd

    def _add_cdd(self, sd: dict) -> dict:
        if self.cdd is not None:
            sd[CDD_KEY] = self.cdd.state_dict()
        return sd

    def _pop_cdd(self, state_dict: dict) -> dict:
        """The CDD entry is required (one policy with the core's RGGROptimizer): a checkpoint without it
        was not written by a CDD run, and resuming from it would restart masks, queues and schedule."""
        state_dict = dict(state_dict)
        cdd = state_dict.pop(CDD_KEY, None)
        if cdd is None:
            raise ValueError("the optimizer state of this checkpoint has no CDD state ('cdd'): it was not written by a "
                             "CDD run, and resuming from it would restart masks, memory queues and the mask schedule "
                             "while the weights continue. Fix: resume from a checkpoint of the CDD run, or start the "
                             "student from those weights with load_from (no resume)")
        if self.cdd is not None:
            self.cdd.check_state_dict(cdd)
        self._checked_cdd = cdd
        return state_dict

    def _apply_cdd(self) -> None:
        cdd, self._checked_cdd = getattr(self, "_checked_cdd", None), None
        if cdd is None:
            return
        if self.cdd is not None:
            self.cdd.load_state_dict(cdd)
        else:
            self._pending_cdd = cdd


@OPTIM_WRAPPERS.register_module()
class CDDOptimWrapper(_CDDStep, OptimWrapper):
    """``OptimWrapper`` with the RGGR gradient step (after clipping, before ``optimizer.step``)."""

    def step(self, **kwargs) -> None:
        if self.clip_grad_kwargs:
            self._clip_grad()
        self._bound().step(self.optimizer, lambda: self.optimizer.step(**kwargs))

    def state_dict(self) -> dict:
        return self._add_cdd(super().state_dict())

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(self._pop_cdd(state_dict))  # checks first, loads the optimizer, then CDD
        self._apply_cdd()


@OPTIM_WRAPPERS.register_module()
class CDDAmpOptimWrapper(_CDDStep, AmpOptimWrapper):
    """``AmpOptimWrapper`` with the RGGR gradient step.

    Gradients are unscaled (``loss_scaler.unscale_``) before the DGC gradients are
    edited, so the group-lasso term is added at its true size; the loss scaler then
    steps (skipping steps whose gradients overflowed) and updates its scale.
    """

    def step(self, **kwargs) -> None:
        state = self._bound()
        self.loss_scaler.unscale_(self.optimizer)
        if self.clip_grad_kwargs:
            self._clip_grad()
        found = self.loss_scaler._per_optimizer_states[id(self.optimizer)].get("found_inf_per_device", {})
        overflow = any(float(v.item()) > 0 for v in found.values())
        state.step(self.optimizer, lambda: self.loss_scaler.step(self.optimizer, **kwargs), overflow=overflow)
        self.loss_scaler.update(self._scale_update_param)

    def state_dict(self) -> dict:
        return self._add_cdd(super().state_dict())

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(self._pop_cdd(state_dict))  # checks first, loads the optimizer, then CDD
        self._apply_cdd()


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class CDDOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """mmengine's default constructor (``paramwise_cfg`` included), then binds the
    CDD wrapper to the model's ``cdd_state``. With ``paramwise_cfg`` the frozen teacher's
    parameters are left out of the parameter groups."""

    _frozen: Optional[nn.Module] = None

    def add_params(self, params, module: nn.Module, prefix: str = "", **kwargs) -> None:
        if module is self._frozen:
            return  # the frozen teacher: nothing to optimise (and no warning per parameter)
        super().add_params(params, module, prefix=prefix, **kwargs)

    def __call__(self, model: nn.Module) -> OptimWrapper:
        inner = model.module if hasattr(model, "module") else model
        self._frozen = getattr(inner, "teacher", None)
        try:
            wrapper = super().__call__(model)
        finally:
            self._frozen = None
        state = getattr(inner, "cdd_state", None)
        if not isinstance(wrapper, _CDDStep):
            raise TypeError(
                f"CDDOptimWrapperConstructor built a {type(wrapper).__name__}; set optim_wrapper.type="
                "'CDDOptimWrapper' (or 'CDDAmpOptimWrapper' for mixed precision; note that mim's --amp flag only "
                "accepts OptimWrapper/AmpOptimWrapper, use --cfg-options optim_wrapper.type=CDDAmpOptimWrapper)")
        if state is None:
            raise TypeError(f"the model {type(inner).__name__} has no CDD state (cdd_state); "
                            "CDDOptimWrapperConstructor is for model type='CDDRetriever'")
        wrapper.bind(state)
        return wrapper


def is_cdd_wrapper(wrapper) -> bool:
    return isinstance(wrapper, _CDDStep)


__all__ = ["CDDAmpOptimWrapper", "CDDOptimWrapper", "CDDOptimWrapperConstructor", "is_cdd_wrapper"]
