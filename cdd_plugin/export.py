"""The merged-model file: data only (a channel plan and tensors), written atomically, loaded with
``torch.load(weights_only=True)`` and rebuilt on a fresh dense model of the architecture."""
from __future__ import annotations

import copy
import os
from typing import Any, Dict, Optional

import torch
from torch import nn

from .files import atomic_save
from .graph import find_dgcs, set_module
from .merge import MergeError

FORMAT = "cdd_plugin.merged"
FORMAT_VERSION = 1

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
    if not getattr(merged, "_cdd_merged", False):
        raise MergeError("save_merged expects the result of cdd_plugin.merge(model) (a merged network); this model "
                         "was not merged")
    payload = {"format": FORMAT, "version": FORMAT_VERSION, "plan": channel_plan(merged),
               "state_dict": {k: v.detach().cpu() for k, v in merged.state_dict().items()},
               "meta": plain_meta(meta or {})}
    atomic_save(payload, path)


def plain_meta(meta: Any, where: str = "meta") -> Any:
    """``meta`` in the types a weights-only load accepts: numpy / torch scalars become numbers, paths
    strings, tuples lists; anything else is refused here, before any file is touched."""
    if isinstance(meta, dict):
        out = {}
        for k, v in meta.items():
            if not isinstance(k, str):
                raise MergeError(f"save_merged: {where} key {k!r} is not a string; use string keys")
            out[k] = plain_meta(v, f"{where}[{k!r}]")
        return out
    if isinstance(meta, (list, tuple)):
        return [plain_meta(v, f"{where}[{i}]") for i, v in enumerate(meta)]
    if isinstance(meta, os.PathLike):
        return os.fspath(meta)
    if hasattr(meta, "item") and callable(meta.item) and getattr(meta, "ndim", None) == 0:
        meta = meta.item()
    if isinstance(meta, _SIMPLE):
        return meta
    raise MergeError(f"save_merged: {where} is a {type(meta).__name__}, which a safe (weights-only) file cannot "
                     "hold; store numbers, strings, booleans, lists and dicts of them")


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


#: the constructor arguments each rebuilt layer type may take from a file (nothing else is passed on)
_ALLOWED_KWARGS = {
    "Conv2d": {"kernel_size", "stride", "padding", "dilation", "groups", "bias", "padding_mode"},
    "Linear": {"bias"}, "BatchNorm1d": {"eps", "momentum", "affine", "track_running_stats"},
    "BatchNorm2d": {"eps", "momentum", "affine", "track_running_stats"},
    "InstanceNorm2d": {"eps", "momentum", "affine", "track_running_stats"}, "PReLU": {"num_parameters"},
    "Identity": set(),
}


def _checked_spec(name: str, spec: Any, path: str) -> tuple:
    if not isinstance(spec, dict) or spec.get("type") not in _BUILD:
        raise ValueError(f"{path}: the plan of {name} names no layer type merge produces ({spec!r:.80}); the file "
                         "is damaged or was not written by cdd_plugin.save_merged")
    kwargs = dict(spec.get("kwargs") or {})
    extra = sorted(set(kwargs) - _ALLOWED_KWARGS[spec["type"]])
    if extra:
        raise ValueError(f"{path}: the plan of {name} ({spec['type']}) carries the arguments {extra}, which a merged "
                         "layer never has; the file was edited or damaged, re-export it with save_merged")
    args = list(spec.get("args") or [])
    if not all(isinstance(a, int) and not isinstance(a, bool) and a >= 0 for a in args):
        raise ValueError(f"{path}: the plan of {name} has invalid sizes {args}; the file is damaged")
    for key in ("kernel_size", "stride", "dilation", "padding"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    return _BUILD[spec["type"]], args, kwargs


def load_merged(path, model: nn.Module) -> nn.Module:
    """Rebuild the narrow network on ``model`` (a fresh dense instance of the student
    architecture, without DGCs) from the file's channel plan, load its weights, return it.
    ``path`` may also be the dict ``read_merged`` returned. The network is rebuilt on a copy and
    ``model`` takes it over only when every layer and tensor fits: a file that does not fit
    leaves ``model`` as it was."""
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
    work = copy.deepcopy(model)
    for name, entry in plan.items():
        spec = entry.get("spec")
        if spec is None:
            continue
        current = work.get_submodule(name) if name in dict(work.named_modules()) else None
        if current is not None and _spec(current) == spec:
            continue
        cls, args, kwargs = _checked_spec(name, spec, str(path))
        try:
            set_module(work, name, cls(*args, **kwargs))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{path}: cannot rebuild {name} from its plan ({exc}); the file is damaged") from None
    for name, entry in plan.items():
        for k, v in entry.get("attrs", {}).items():
            mod = work.get_submodule(name)
            if hasattr(mod, k) and getattr(mod, k) != v and not isinstance(getattr(mod, k), nn.Module) \
                    and isinstance(v, (int, float)) and not isinstance(v, bool):
                setattr(mod, k, v)
    try:
        work.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        first = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln or "Missing" in ln
                      or "Unexpected" in ln), str(exc).splitlines()[0])
        raise ValueError(f"{path} does not fit {type(model).__name__} ({first[:300]}); build the same student "
                         "architecture (and number of classes) it was saved from") from None
    work.eval()
    work._cdd_merged = True
    model.__dict__.update(work.__dict__)  # take the rebuilt network over only now
    return model
