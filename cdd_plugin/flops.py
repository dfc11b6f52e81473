"""Exact FLOPs of the model that ``merge`` would produce, as a function of kept channels.

Profiling counts FLOPs with torch-pruning's counter. Merging a ResNet-50 to count its
FLOPs takes seconds, too slow to log every few iterations, so at surgery time we trace
one forward pass and record, for every counted call, how its count scales with the
kept channels of the sites around it. The merged count is then a quadratic polynomial

    F(n) = c0 + sum_s a_s n_s + sum_{s,t} B_st n_s n_t

in the kept channels n_s of each unit (a site, or the tied members of a residual group; a
conv between two units is bilinear, anything per-channel is linear). Folding is accounted for: a BatchNorm folded into its conv
disappears, the conv gains a bias.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch_pruning.utils import op_counter

from .dgc import DGC
from .graph import get_module, is_depthwise, run


def _call_flops(module: nn.Module, inputs, output) -> int:
    """torch-pruning's count for one call of a module (0 for types it does not count)."""
    if not op_counter.is_supported_instance(module):
        return 0
    hook = op_counter.CUSTOM_MODULES_MAPPING.get(type(module)) or op_counter.MODULES_MAPPING[type(module)]
    had = hasattr(module, "__flops__")
    old = getattr(module, "__flops__", 0)
    module.__flops__ = 0
    try:
        hook(module, inputs, output)
        return int(module.__flops__)
    finally:
        if had:
            module.__flops__ = old
        else:
            del module.__flops__


class FlopsModel:
    """Quadratic model of merged FLOPs in the kept channels of each site (see module docstring)."""

    def __init__(self, names: List[str], channels: Sequence[int], c0: float, a: np.ndarray, B: np.ndarray):
        self.names = list(names)
        self.channels = np.asarray(channels, dtype=np.float64)
        self.c0 = float(c0)
        self.a = a
        self.B = B

    def __call__(self, kept: Sequence[float]) -> int:
        n = np.asarray(kept, dtype=np.float64)
        return int(round(self.c0 + self.a @ n + n @ self.B @ n))

    def dense(self) -> int:
        """FLOPs of the merged model with every channel kept."""
        return self(self.channels)

    @classmethod
    def build(cls, model: nn.Module, example_inputs: Any, sites, *, forward_fn: Optional[Callable] = None) -> "FlopsModel":

        # one variable per unit: a site, or all the tied members of a residual group (one kept count)
        units: List[str] = []
        for s in sites:
            if (s.tie or s.name) not in units:
                units.append(s.tie or s.name)
        unit_of = {s.name: units.index(s.tie or s.name) for s in sites}
        S = len(units)
        C = [0] * S
        out_site: Dict[int, int] = {}
        in_sites: Dict[int, List[tuple]] = {}   # consumer -> [(unit, input features from that unit)]
        folded_norms = set()
        gains_bias: Dict[int, int] = {}
        registered = set()
        for s in sites:
            i = unit_of[s.name]
            C[i] = s.channels
            prod = get_module(model, s.producer)
            out_site[id(prod)] = i
            if s.depthwise:
                out_site[id(get_module(model, s.depthwise))] = i
            for cname in s.consumers if i not in registered else []:  # a group's consumers once
                share = s.consumer_shares.get(cname, s.channels)
                in_sites.setdefault(id(get_module(model, cname)), []).append((i, share))
            registered.add(i)
            if s.norm:
                out_site[id(get_module(model, s.norm))] = i
            if s.kind in ("out", "diag"):
                target = get_module(model, s.depthwise or s.producer)
                if s.norm:
                    folded_norms.add(id(get_module(model, s.norm)))
                if target.bias is None:
                    gains_bias[id(target)] = i
        dgc_site = {id(get_module(model, s.name)): unit_of[s.name] for s in sites}
        last_axis = {unit_of[s.name] for s in sites if s.channels_last}

        c0 = 0.0
        a = np.zeros(S)
        Bm = np.zeros((S, S))
        batch = _batch_size(example_inputs)  # torch-pruning reports FLOPs per image
        # channel composition of traced tensors along their channel axis (1, or -1 after a Linear layer):
        # [(site or None, channels), ...]
        segments: Dict[int, List[tuple]] = {}
        axes: Dict[int, int] = {}
        keep: List[torch.Tensor] = []

        def mark(t, segs, axis=1):
            if isinstance(t, torch.Tensor) and segs is not None:
                segments[id(t)] = segs
                axes[id(t)] = axis
                keep.append(t)

        def whole(t, i, axis=1):
            return None if i is None or not isinstance(t, torch.Tensor) or t.dim() < 2 else [(i, t.shape[axis])]

        def hook(module, inputs, output):
            nonlocal c0
            if id(module) in dgc_site:
                i = dgc_site[id(module)]
                axis = -1 if i in last_axis else 1
                mark(output, whole(output, i, axis), axis)
                return
            x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
            fl = _call_flops(module, inputs, output)
            supported = op_counter.is_supported_instance(module)
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                o = out_site.get(id(module))
                if isinstance(module, nn.Conv2d):
                    per_ch = int(output.shape[0] * np.prod(output.shape[2:]))
                    out_ch, in_total = module.out_channels, module.in_channels
                else:
                    # torch-pruning counts a linear bias once per call, whatever the batch, then
                    # divides the total by the batch; scale it so the model gives batch-1 counts
                    per_ch = batch
                    out_ch, in_total = module.out_features, module.in_features
                counted = (out_ch if isinstance(module, nn.Linear) else per_ch * out_ch)
                counted = counted if (module.bias is not None and supported) else 0
                mac = fl - counted
                bias = counted * (batch if isinstance(module, nn.Linear) else 1)
                if is_depthwise(module) and o is not None:
                    a[o] += (mac + bias) / C[o]
                else:
                    ins = in_sites.get(id(module), [])
                    base = in_total - sum(w for _, w in ins)
                    if o is not None:
                        a[o] += mac * base / (in_total * C[o]) + bias / C[o]
                        for i, w in ins:
                            Bm[i, o] += mac * w / (in_total * C[i] * C[o])
                    else:
                        c0 += mac * base / in_total + bias
                        for i, w in ins:
                            a[i] += mac * w / (in_total * C[i])
                if id(module) in gains_bias and supported:
                    a[gains_bias[id(module)]] += per_ch
                axis = -1 if isinstance(module, nn.Linear) else 1
                mark(output, whole(output, o, axis), axis)
                return
            if id(module) in folded_norms:
                mark(output, whole(output, out_site[id(module)]))
                return
            own = out_site.get(id(module))
            axis = axes.get(id(x), 1) if x is not None else 1
            segs = whole(output, own) if own is not None else (segments.get(id(x)) if x is not None else None)
            total = sum(n for _, n in segs) if segs else 0
            if segs and total:
                for i, n in segs:
                    if i is None:
                        c0 += fl * n / total
                    else:
                        a[i] += fl * n / (total * C[i])
            else:
                c0 += fl
            if segs and isinstance(output, torch.Tensor) and output.dim() > 1 and output.shape[axis] == total:
                mark(output, segs, axis)

        class _CatTracker(TorchFunctionMode):
            """Carries channel composition through torch.cat along dim 1, and through functions whose
            result has the shape of a traced argument in an elementwise function (``out = out + identity``,
            ``F.relu``)."""

            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                if func in _ELEMENTWISE and isinstance(out, torch.Tensor) and out.dim() > 1 and id(out) not in segments:
                    for t in args:
                        if isinstance(t, torch.Tensor) and id(t) in segments and t.shape == out.shape:
                            mark(out, segments[id(t)], axes[id(t)])
                            break
                if func in (torch.cat, torch.concat):
                    tensors = args[0] if args else kwargs.get("tensors")
                    dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
                    if isinstance(out, torch.Tensor) and out.dim() > 1 and dim in (1, 1 - out.dim()):
                        segs = []
                        for t in tensors:
                            segs.extend(segments.get(id(t), [(None, t.shape[1])]))
                        if any(i is not None for i, _ in segs):
                            mark(out, segs)
                return out

        handles = []
        for m in model.modules():
            if isinstance(m, DGC) or len(list(m.children())) == 0 or op_counter.is_supported_instance(m):
                handles.append(m.register_forward_hook(hook))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), _CatTracker():
                run(model, example_inputs, forward_fn)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        return cls(units, C, c0 / batch, a / batch, Bm / batch)


_T = torch.Tensor
#: functions through which a tensor keeps the channel composition of its (same-shaped) argument
_ELEMENTWISE = {torch.add, torch.sub, torch.mul, torch.relu, torch.relu_, torch.nn.functional.relu, torch.clone,
                _T.add, _T.add_, _T.__add__, _T.__iadd__, _T.__radd__, _T.sub, _T.__sub__, _T.mul, _T.__mul__,
                _T.relu, _T.relu_, _T.clone, _T.contiguous}


def _batch_size(x) -> int:
    if isinstance(x, torch.Tensor):
        return int(x.shape[0]) if x.dim() > 0 else 1
    if isinstance(x, (tuple, list)) and x:
        return _batch_size(x[0])
    if isinstance(x, dict) and x:
        return _batch_size(next(iter(x.values())))
    return 1
