"""IBN blocks (``fastreid.layers.IBN``) for DGC surgery and merge.

An IBN normalises its first ``half`` channels with InstanceNorm and the rest with
BatchNorm, then concatenates them. torch-pruning traces through the split and the
concatenation and maps channel indices wrongly there (e.g. pruning 4 channels of the conv
before an IBN reaches it as 2), so without help surgery skips every convolution that
feeds an IBN. ``IBNPruner`` tells torch-pruning how to remove channels from an IBN
(both parts, and ``half``); with it the core planner treats the IBN as a norm that cannot
be folded and places an input-side DGC on the consumer (METHOD/DESIGN: "Input side").

A customized pruner alone is not enough with torch-pruning 1.6.1: it still walks the
autograd graph INSIDE the IBN (split, clone, instance/batch norm, cat), so the convolution
before it appears to feed a split whose index mapping is wrong. Inside ``opaque_ibn()``
(used only by the adapter's analysis forward, i.e. graph tracing for surgery and merge),
a ``PrunableIBN`` with gradients enabled returns ``x + (IBN(x) - x).detach()``: the same
values, but a single autograd edge from input to output, so torch-pruning sees one
per-channel layer handled by ``IBNPruner``. Training, evaluation and ``torch.no_grad``
passes are untouched.

``PrunableIBN`` is ``IBN`` with the same parameters and the same function, except that it
still works when merge has removed every channel of one part (``IBN.forward`` would call
``torch.split(x, 0)``) and that it honours ``opaque_ibn()``. ``make_prunable`` converts a
model's IBN modules in place; the FastReID adapter does it for the student (and the dense
model a merged file is loaded into), never for the teacher.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Dict, Iterator, Sequence

import torch
import torch_pruning as tp
from torch import nn

from fastreid.layers import IBN


_TRACE = threading.local()


@contextlib.contextmanager
def opaque_ibn() -> Iterator[None]:
    """Within this block, autograd sees each ``PrunableIBN`` as one per-channel op (for torch-pruning)."""
    previous = getattr(_TRACE, "on", False)
    _TRACE.on = True
    try:
        yield
    finally:
        _TRACE.on = previous


class PrunableIBN(IBN):
    """``fastreid.layers.IBN`` that tolerates an empty part and can hide its internals from tracing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.half <= 0:
            out = self.BN(x)
        elif self.half >= x.shape[1]:
            out = self.IN(x)
        else:
            out = super().forward(x)
        if getattr(_TRACE, "on", False) and torch.is_grad_enabled():
            out = x + (out - x).detach()  # same values; one autograd edge input -> output
        return out


def make_prunable(model: nn.Module) -> int:
    """Turn every ``IBN`` of ``model`` into a ``PrunableIBN`` in place; returns how many."""
    n = 0
    for m in model.modules():
        if type(m) is IBN:
            m.__class__ = PrunableIBN
            n += 1
    return n


def _prune_norm(norm: nn.Module, idxs: Sequence[int]) -> None:
    """Remove channels ``idxs`` from an InstanceNorm / BatchNorm (affine parameters and running stats)."""
    keep = sorted(set(range(norm.num_features)) - set(idxs))
    norm.num_features = len(keep)
    if getattr(norm, "track_running_stats", False) and norm.running_mean is not None:
        norm.running_mean = norm.running_mean.data[keep]
        norm.running_var = norm.running_var.data[keep]
    if norm.affine:
        norm.weight = nn.Parameter(norm.weight.data[keep].clone(), requires_grad=norm.weight.requires_grad)
        norm.bias = nn.Parameter(norm.bias.data[keep].clone(), requires_grad=norm.bias.requires_grad)


class IBNPruner(tp.pruner.function.BasePruningFunc):
    """torch-pruning pruner for IBN: channel ``i < half`` lives in ``IN``, the rest in ``BN``."""

    TARGET_MODULES = (IBN,)

    def prune_out_channels(self, layer: IBN, idxs: Sequence[int]) -> IBN:
        idxs = sorted({int(i) for i in idxs})
        half = int(layer.half)
        in_idxs = [i for i in idxs if i < half]
        bn_idxs = [i - half for i in idxs if i >= half]
        if in_idxs:
            _prune_norm(layer.IN, in_idxs)
        if bn_idxs:
            _prune_norm(layer.BN, bn_idxs)
        layer.half = half - len(in_idxs)
        if (layer.half == 0 or layer.BN.num_features == 0) and type(layer) is IBN:
            layer.__class__ = PrunableIBN  # IBN.forward cannot split off an empty part
        return layer

    prune_in_channels = prune_out_channels  # per-channel op: input and output channels are the same set

    def get_out_channels(self, layer: IBN) -> int:
        return int(layer.half) + int(layer.BN.num_features)

    get_in_channels = get_out_channels


def customized_pruners() -> Dict[type, IBNPruner]:
    """The ``customized_pruners`` argument for ``cdd_plugin.insert_dgc`` on FastReID models."""
    pruner = IBNPruner()
    return {IBN: pruner, PrunableIBN: pruner}
