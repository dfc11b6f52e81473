"""Merge: fold BatchNorms and DGCs into the convolutions, cut zero channels, save/load safely."""
from __future__ import annotations

import copy
import logging
import os
from typing import Any, Dict, List, Optional

import torch
import torch_pruning as tp
from torch import nn

from .dgc import DGC, strip_cdd_hooks
from .files import atomic_save
from .surgery import _get_module, _run, _set_module, build_graph, detach, find_dgcs

logger = logging.getLogger("cdd_plugin")

FORMAT = "cdd_plugin.merged"
FORMAT_VERSION = 1


class MergeError(RuntimeError):
    """Merge cannot proceed; the message says why and what to do."""


def _fold_bn(weight: torch.Tensor, bias: Optional[torch.Tensor], bn: nn.modules.batchnorm._BatchNorm):
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine and bn.weight is not None else torch.ones_like(std)
    beta = bn.bias if bn.affine and bn.bias is not None else torch.zeros_like(std)
    scale = gamma / std
    w = weight * scale.reshape([-1] + [1] * (weight.dim() - 1))
    b = (bias if bias is not None else torch.zeros_like(std)) - bn.running_mean
    return w, beta + b * scale


def _set_weight_bias(layer: nn.Module, w: torch.Tensor, b: Optional[torch.Tensor]) -> None:
    layer.weight = nn.Parameter(w.contiguous())
    if b is not None:
        layer.bias = nn.Parameter(b.contiguous())


def _zero_channels(dgc: DGC, threshold: float, min_keep: int) -> List[int]:
    norms = dgc.channel_norms()
    below = (norms < threshold).nonzero().flatten().tolist()
    keep_at_least = min(min_keep, dgc.channels)
    if dgc.channels - len(below) < keep_at_least:
        order = torch.argsort(norms, descending=True, stable=True).tolist()
        protect = set(order[:keep_at_least])
        below = [c for c in below if c not in protect]
    return below


@torch.no_grad()
def _fold_site(model: nn.Module, site: dict, dgc: DGC, zero: List[int]) -> None:
    dgc.zero_(zero)
    Q = dgc.matrix().to(torch.float64)
    kind = site["kind"]
    if kind in ("out", "diag"):
        target = _get_module(model, site["depthwise"] or site["producer"])
        w = target.weight.detach().to(torch.float64)
        b = None if target.bias is None else target.bias.detach().to(torch.float64)
        if site["norm"]:
            bn = _get_module(model, site["norm"])
            w, b = _fold_bn(w, b, _to64(bn))
        if kind == "diag":
            q = torch.diagonal(Q)
            w = w * q.reshape([-1] + [1] * (w.dim() - 1))
            b = None if b is None else b * q
        else:
            w = (Q @ w.reshape(w.shape[0], -1)).reshape(w.shape)
            b = None if b is None else Q @ b
        if b is None:
            b = torch.zeros(w.shape[0], dtype=torch.float64)
        dt = target.weight.dtype
        _set_weight_bias(target, w.to(dt), b.to(dt))
        detach(model, site["host"])
        if site["norm"]:
            _set_module(model, site["norm"], nn.Identity())
    else:  # input side: fold forward into the consumer
        consumer = _get_module(model, site["host"])
        w = consumer.weight.detach().to(torch.float64)
        if isinstance(consumer, nn.Linear):
            w = w @ Q
        else:
            w = torch.einsum("oc...,cd->od...", w, Q)
        consumer.weight = nn.Parameter(w.to(consumer.weight.dtype).contiguous())
        detach(model, site["host"])


class _BN64:
    def __init__(self, bn):
        self.running_var = bn.running_var.detach().double()
        self.running_mean = bn.running_mean.detach().double()
        self.eps = bn.eps
        self.affine = bn.affine
        self.weight = None if bn.weight is None else bn.weight.detach().double()
        self.bias = None if bn.bias is None else bn.bias.detach().double()


def _to64(bn):
    return _BN64(bn)


def _prune_fn(layer: nn.Module, kind: str):
    if kind == "in":
        return tp.prune_linear_in_channels if isinstance(layer, nn.Linear) else tp.prune_conv_in_channels
    if isinstance(layer, nn.Linear):
        return tp.prune_linear_out_channels
    return tp.prune_conv_out_channels


def merge(model: nn.Module, *, inplace: bool = False, threshold: Optional[float] = None,
          example_inputs: Any = None, customized_pruners: Optional[dict] = None,
          forward_fn=None) -> nn.Module:
    """Fold every DGC and its BatchNorm into the adjacent convolution, remove the channels
    whose group norm is below ``threshold`` (default: the one given to ``insert_dgc``)
    and return a plain, narrower network in eval mode. ``model`` is left untouched
    unless ``inplace=True``; a failing merge leaves no half-merged model behind.
    """
    if getattr(model, "_cdd_merged", False):
        raise MergeError("this model is already merged (merge was called on its result); merge the trained "
                         "model with DGCs, once")
    dgcs = find_dgcs(model)
    if not dgcs:
        raise MergeError(f"{type(model).__name__} has no DGCs: nothing to merge. Call cdd_plugin.insert_dgc(model, "
                         "example_inputs, cfg) before training, and merge that model afterwards")
    if example_inputs is None:
        example_inputs = getattr(model, "_cdd_example_inputs", None)
        if example_inputs is None:
            raise MergeError("no example inputs: pass merge(model, example_inputs=...) shaped like the input")
    if customized_pruners is None:
        customized_pruners = getattr(model, "_cdd_customized_pruners", None)
    if forward_fn is None:
        forward_fn = getattr(model, "_cdd_forward_fn", None)
    work = copy.deepcopy(model)
    dev_param = next(work.parameters())
    plan = []
    for name, dgc in dgcs.items():
        site = getattr(work.get_submodule(name), "site", None)
        if site is None:
            raise MergeError(f"DGC {name} carries no site description; it was not inserted by cdd_plugin.insert_dgc")
        thr = float(threshold if threshold is not None else getattr(dgc, "threshold", 1e-5))
        zero = _zero_channels(dgc, thr, int(getattr(dgc, "min_channels", 1)))
        plan.append((site, work.get_submodule(name), zero))
    work.eval()
    for site, dgc, zero in plan:
        _fold_site(work, site, dgc, zero)
    if any(zero for _, _, zero in plan):
        DG = build_graph(work, _to_device(example_inputs, dev_param.device), customized_pruners=customized_pruners,
                         forward_fn=forward_fn)
        for site, _, zero in plan:
            if not zero:
                continue
            if site["kind"] == "in":
                layer = _get_module(work, site["host"])
            else:
                layer = _get_module(work, site["depthwise"] or site["producer"])
            group = DG.get_pruning_group(layer, _prune_fn(layer, site["kind"]), sorted(zero))
            group.prune()
    strip_cdd_hooks(work)
    work.eval()
    for attr in ("_cdd_example_inputs", "_cdd_customized_pruners", "_cdd_forward_fn"):
        if hasattr(work, attr):
            delattr(work, attr)
    work._cdd_merged = True
    if inplace:
        # replace the caller's model contents only once everything above succeeded
        model.__dict__.update(work.__dict__)
        return model
    return work


def _to_device(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    return x


# -- safe files ------------------------------------------------------------------------------
_SIMPLE = (int, float, bool, str, type(None))


def _spec(m: nn.Module) -> Optional[dict]:
    """Constructor arguments of the layer types merge changes (enough to rebuild them)."""
    if isinstance(m, nn.Conv2d):
        return {"type": "Conv2d", "args": [m.in_channels, m.out_channels],
                "kwargs": {"kernel_size": list(m.kernel_size), "stride": list(m.stride),
                           "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
                           "dilation": list(m.dilation), "groups": m.groups, "bias": m.bias is not None,
                           "padding_mode": m.padding_mode}}
    if isinstance(m, nn.Linear):
        return {"type": "Linear", "args": [m.in_features, m.out_features], "kwargs": {"bias": m.bias is not None}}
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return {"type": type(m).__name__ if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) else "BatchNorm2d",
                "args": [m.num_features], "kwargs": {"eps": m.eps, "momentum": m.momentum, "affine": m.affine,
                                                     "track_running_stats": m.track_running_stats}}
    if isinstance(m, nn.modules.instancenorm._InstanceNorm):
        return {"type": "InstanceNorm2d", "args": [m.num_features],
                "kwargs": {"eps": m.eps, "momentum": m.momentum, "affine": m.affine,
                           "track_running_stats": m.track_running_stats}}
    if isinstance(m, nn.PReLU):
        return {"type": "PReLU", "args": [], "kwargs": {"num_parameters": m.num_parameters}}
    if isinstance(m, nn.Identity):
        return {"type": "Identity", "args": [], "kwargs": {}}
    return None


_BUILD = {"Conv2d": nn.Conv2d, "Linear": nn.Linear, "BatchNorm1d": nn.BatchNorm1d, "BatchNorm2d": nn.BatchNorm2d,
          "InstanceNorm2d": nn.InstanceNorm2d, "PReLU": nn.PReLU, "Identity": nn.Identity}


def channel_plan(merged: nn.Module) -> Dict[str, dict]:
    """Per module: layer spec (for the types merge changes) and simple integer attributes."""
    plan = {}
    for name, m in merged.named_modules():
        if not name:
            continue
        entry: Dict[str, Any] = {}
        spec = _spec(m)
        if spec is not None:
            entry["spec"] = spec
        attrs = {k: v for k, v in vars(m).items() if not k.startswith("_") and k != "training"
                 and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if attrs:
            entry["attrs"] = attrs
        if entry:
            plan[name] = entry
    return plan


def save_merged(merged: nn.Module, path: str, *, meta: Optional[dict] = None) -> None:
    """Write a merged model as data only (channel plan + tensors), atomically.

    The file loads with ``torch.load(path, weights_only=True)``; ``load_merged`` rebuilds
    the narrow network on top of a freshly built dense model of the same architecture.
    """
    if find_dgcs(merged):
        raise MergeError("save_merged expects the result of cdd_plugin.merge(model); this model still has DGCs")
    payload = {"format": FORMAT, "version": FORMAT_VERSION, "plan": channel_plan(merged),
               "state_dict": {k: v.detach().cpu() for k, v in merged.state_dict().items()},
               "meta": dict(meta or {})}
    atomic_save(payload, path)


def read_merged(path: str) -> dict:
    """Load a merged-model file safely (weights_only) and check that it is ours."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file; save it with cdd_plugin.save_merged(merged, path)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} is not a readable cdd_plugin merged model (truncated or not a safe torch file: "
                         f"{type(exc).__name__}: {str(exc)[:200]}). Re-export it with cdd_plugin.save_merged") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a cdd_plugin merged model (format tag missing); if it is an ordinary "
                         "checkpoint, load it with the framework that wrote it")
    if payload.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} has merged-model format version {payload.get('version')}, this cdd_plugin reads "
                         f"version {FORMAT_VERSION}; upgrade cdd_plugin")
    return payload


def load_merged(path, model: nn.Module) -> nn.Module:
    """Rebuild the narrow network on ``model`` (a fresh dense instance of the student
    architecture, without DGCs) from the file's channel plan, load its weights, return it.
    ``path`` may also be the dict ``read_merged`` returned."""
    if isinstance(path, dict):
        payload, path = path, "<merged payload>"
        if payload.get("format") != FORMAT:
            raise ValueError("the payload is not a cdd_plugin merged model; pass read_merged(path) or a path")
    else:
        payload = read_merged(path)
    plan: Dict[str, dict] = payload["plan"]
    names = dict(model.named_modules())
    missing = [n for n in plan if n not in names and n.rpartition(".")[0] not in plan]
    if missing:
        raise ValueError(f"{path} was saved from a different architecture: modules {missing[:3]} do not exist in "
                         f"{type(model).__name__}; build the same student architecture before loading")
    for name, entry in plan.items():
        spec = entry.get("spec")
        if spec is None:
            continue
        current = model.get_submodule(name) if name in dict(model.named_modules()) else None
        if current is not None and _spec(current) == spec:
            continue
        cls = _BUILD[spec["type"]]
        kwargs = dict(spec["kwargs"])
        for key in ("kernel_size", "stride", "dilation", "padding"):
            if isinstance(kwargs.get(key), list):
                kwargs[key] = tuple(kwargs[key])
        _set_module(model, name, cls(*spec["args"], **kwargs))
    for name, entry in plan.items():
        for k, v in entry.get("attrs", {}).items():
            mod = model.get_submodule(name)
            if hasattr(mod, k) and getattr(mod, k) != v and not isinstance(getattr(mod, k), nn.Module):
                setattr(mod, k, v)
    result = model.load_state_dict(payload["state_dict"], strict=True)
    model.eval()
    model._cdd_merged = True
    return model
