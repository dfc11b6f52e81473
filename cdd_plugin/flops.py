"""Exact FLOPs of the model that ``merge`` would produce, as a function of kept channels.

Profiling counts FLOPs with torch-pruning's counter. Merging a ResNet-50 to count its
FLOPs takes seconds, too slow to log every few iterations, so at surgery time we trace
one forward pass and record, for every counted call, how its count scales with the
kept channels of the sites around it. The merged count is then a quadratic polynomial

    F(n) = c0 + sum_s a_s n_s + sum_{s,t} B_st n_s n_t

in the kept channels n_s of each site (a conv between two sites is bilinear, anything
per-channel is linear). Folding is accounted for: a BatchNorm folded into its conv
disappears, the conv gains a bias.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.utils import op_counter

from .dgc import DGC


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
        from .surgery import _get_module, _is_depthwise, _run

        index = {s.name: i for i, s in enumerate(sites)}
        S = len(sites)
        C = [s.channels for s in sites]
        out_site: Dict[int, int] = {}
        in_site: Dict[int, int] = {}
        folded_norms = set()
        gains_bias: Dict[int, int] = {}
        for i, s in enumerate(sites):
            prod = _get_module(model, s.producer)
            out_site[id(prod)] = i
            if s.kind == "in":
                in_site[id(_get_module(model, s.host))] = i
            if s.depthwise:
                out_site[id(_get_module(model, s.depthwise))] = i
            for cname in s.consumers:
                in_site.setdefault(id(_get_module(model, cname)), i)
            if s.norm:
                out_site[id(_get_module(model, s.norm))] = i
            if s.kind in ("out", "diag"):
                target = _get_module(model, s.depthwise or s.producer)
                if s.norm:
                    folded_norms.add(id(_get_module(model, s.norm)))
                if target.bias is None:
                    gains_bias[id(target)] = i
        dgc_site = {id(_get_module(model, s.name)): index[s.name] for s in sites}

        c0 = 0.0
        a = np.zeros(S)
        Bm = np.zeros((S, S))
        tensor_site: Dict[int, int] = {}
        keep: List[torch.Tensor] = []

        def mark(t, i):
            if isinstance(t, torch.Tensor) and i is not None:
                tensor_site[id(t)] = i
                keep.append(t)

        def hook(module, inputs, output):
            nonlocal c0
            if id(module) in dgc_site:
                mark(output, dgc_site[id(module)])
                return
            x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
            fl = _call_flops(module, inputs, output)
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                o = out_site.get(id(module))
                i = in_site.get(id(module))
                if isinstance(module, nn.Conv2d):
                    per_ch = int(output.shape[0] * np.prod(output.shape[2:]))
                else:
                    per_ch = 1  # torch-pruning counts a linear bias once per call, whatever the batch
                out_ch = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
                bias = per_ch * out_ch if (module.bias is not None and op_counter.is_supported_instance(module)) else 0
                if not op_counter.is_supported_instance(module):
                    per_ch = 0
                mac = fl - bias
                if _is_depthwise(module) and o is not None:
                    a[o] += (mac + bias) / C[o]
                else:
                    if o is not None and i is not None:
                        Bm[i, o] += mac / (C[i] * C[o])
                    elif o is not None:
                        a[o] += mac / C[o]
                    elif i is not None:
                        a[i] += mac / C[i]
                    else:
                        c0 += mac
                    if o is not None:
                        a[o] += bias / C[o]
                    else:
                        c0 += bias
                if id(module) in gains_bias:
                    a[gains_bias[id(module)]] += per_ch
                mark(output, o)
                return
            if id(module) in folded_norms:
                mark(output, out_site[id(module)])
                return
            s = out_site.get(id(module), tensor_site.get(id(x)) if x is not None else None)
            if s is not None:
                a[s] += fl / C[s]
            else:
                c0 += fl
            if isinstance(output, torch.Tensor) and x is not None and output.dim() > 1 and x.dim() > 1 \
                    and output.shape[1] == x.shape[1]:
                mark(output, s)

        handles = []
        for m in model.modules():
            if isinstance(m, DGC) or len(list(m.children())) == 0 or op_counter.is_supported_instance(m):
                handles.append(m.register_forward_hook(hook))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                _run(model, example_inputs, forward_fn)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        batch = _batch_size(example_inputs)  # torch-pruning reports FLOPs per image
        return cls([s.name for s in sites], C, c0 / batch, a / batch, Bm / batch)


def _batch_size(x) -> int:
    if isinstance(x, torch.Tensor):
        return int(x.shape[0]) if x.dim() > 0 else 1
    if isinstance(x, (tuple, list)) and x:
        return _batch_size(x[0])
    if isinstance(x, dict) and x:
        return _batch_size(next(iter(x.values())))
    return 1
