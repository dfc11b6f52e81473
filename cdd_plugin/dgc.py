"""The Distillation Guided Compactor (DGC): a learnable channel selector.

A DGC is an identity-initialised channel mixer placed on one prunable channel set:

* ``kind="out"``: after the (foldable) norm of a producer convolution; ``y = Q x``; its
  group lasso runs over the rows of ``Q`` and it folds backward into the producer.
* ``kind="in"``: before a dense consumer when the producer's norm cannot be folded
  (InstanceNorm, IBN); ``y = Q x``; lasso over columns; folds forward into the consumer.
* ``kind="diag"``: a per-channel scale, for depthwise chains where a channel-mixing matrix
  could not be folded; its "group" is a single weight.

Channel sets that pass through a grouped convolution (ResNeXt, RegNet) carry ``groups``: merge
keeps the same number of channels in every group, so the cut conv is still a valid grouped
conv, and a compactor behind a grouped PRODUCER is block-diagonal (``blocks``), so folding it
into that conv does not mix its groups.

The module is attached with hooks (see ``surgery``) so the user's module names and
checkpoint keys stay as they were: a DGC lives at ``<host>.cdd_dgc``.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("out", "in", "diag")
#: the attribute of the host module that holds its compactor (``<host>.cdd_dgc``)
DGC_ATTR = "cdd_dgc"
_EPS = 1e-12


def kept_count(kept: int, channels: int, min_channels: int = 1, round_to: int = 1) -> int:
    """Channels a site keeps after merge: at least ``min_channels``, rounded up to a multiple of
    ``round_to`` (widths hardware likes), never more than it has. Rounding up keeps rows that
    would have been cut; merge keeps the largest of them, so the merged network still computes
    what the trained one computes."""
    n = max(int(kept), min(int(min_channels), channels))
    if round_to > 1:
        n = -(-n // round_to) * round_to
    return min(n, channels)


def kept_per_group(alive: torch.Tensor, groups: int, min_channels: int = 1, round_to: int = 1) -> int:
    """Channels EACH group of a grouped site keeps after merge: the most any group needs (merge pads
    the others with rows that are already zero, which keeps the cut exact), with the site's total
    at least ``min_channels`` and a multiple of ``round_to``."""
    per = alive.reshape(groups, -1)
    size = per.shape[1]
    m = max(int(per.sum(dim=1).max().item()), -(-min(int(min_channels), alive.numel()) // groups))
    if round_to > 1:
        step = round_to // math.gcd(round_to, groups)
        m = -(-m // step) * step
    return min(m, size)


def site_kept(alive: torch.Tensor, groups: int = 1, min_channels: int = 1, round_to: int = 1) -> int:
    """Channels merge keeps at a site, given which of them are alive (a bool vector)."""
    if groups > 1:
        return groups * kept_per_group(alive, groups, min_channels, round_to)
    return kept_count(int(alive.sum().item()), alive.numel(), min_channels, round_to)


class DGC(nn.Module):
    """Identity-initialised compactor over ``channels`` channels (see module docstring)."""

    def __init__(self, channels: int, kind: str = "out", blocks: int = 1, channels_last: bool = False) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"DGC kind {kind!r} is unknown; use one of {KINDS}")
        if channels < 1:
            raise ValueError(f"a DGC needs at least one channel, got {channels}")
        if blocks < 1 or channels % blocks or (blocks > 1 and kind != "out"):
            raise ValueError(f"a block-diagonal DGC needs kind 'out' and channels ({channels}) divisible by its "
                             f"blocks ({blocks})")
        self.kind = kind
        self.channels = int(channels)
        self.blocks = int(blocks)
        self.groups = 1  # surgery sets it for a set through grouped convs: merge cuts it balanced per group
        # channels on the last dim (the output of a Linear layer: transformer MLPs, ConvNeXt blocks) instead of dim 1
        self.channels_last = bool(channels_last)
        if blocks > 1:  # entries outside the diagonal blocks get no gradient and stay exactly zero
            size = channels // blocks
            self.register_buffer("block_mask", torch.block_diag(*[torch.ones(size, size)] * blocks), persistent=False)
        if kind == "diag":
            self.weight = nn.Parameter(torch.ones(channels))
        else:
            self.weight = nn.Parameter(torch.eye(channels))
        # 1 = the task gradient still reaches the channel; 0 = only the lasso pulls it.
        self.register_buffer("mask", torch.ones(channels))
        self.capture = False
        self.last_pooled: Optional[torch.Tensor] = None

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, kind={self.kind}" + (f", blocks={self.blocks}" if self.blocks > 1 else "")
                + (", channels_last" if self.channels_last else ""))

    def reset_identity(self) -> None:
        """Restore the identity (frameworks whose ``init_weights`` re-initialise every parameter)."""
        with torch.no_grad():
            if self.kind == "diag":
                self.weight.fill_(1.0)
            else:
                self.weight.copy_(torch.eye(self.channels, dtype=self.weight.dtype, device=self.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.blocks > 1:
            w = w * self.block_mask.to(w.dtype)
        if x.dtype != w.dtype:
            w = w.to(x.dtype)
        if self.kind == "diag":
            shape = [1] * (x.dim() - 1) + [self.channels] if self.channels_last else \
                [1, self.channels] + [1] * (x.dim() - 2)
            y = x * w.view(shape)
        elif x.dim() == 2 or self.channels_last:
            y = F.linear(x, w)
        else:
            y = F.conv2d(x, w[:, :, None, None]) if x.dim() == 4 else torch.einsum("oc,nc...->no...", w, x)
        if self.capture:  # a module called several times in one forward (shared blocks): the mean over calls
            self.last_pooled, self._pooled_calls = _mean_over_calls(
                self.last_pooled, getattr(self, "_pooled_calls", 0), _pool(y.detach(), self.channels_last).float())
        return y

    # -- the channel groups of the lasso -------------------------------------------------
    def channel_norms(self) -> torch.Tensor:
        """One group norm per prunable channel (rows for "out", columns for "in", |w| for "diag")."""
        w = self.matrix() if self.blocks > 1 else self.weight.detach()
        if self.kind == "diag":
            return w.abs()
        return w.norm(dim=1) if self.kind == "out" else w.norm(dim=0)

    def lasso_gradient(self, lasso: float) -> torch.Tensor:
        """d/dQ of ``lasso * sum_groups ||Q_group||_2`` (zero for groups that are exactly zero)."""
        w = self.weight.detach()
        if self.kind == "diag":
            return lasso * torch.sign(w)
        if self.kind == "out":
            return lasso * w / w.norm(dim=1, keepdim=True).clamp_min(_EPS)
        return lasso * w / w.norm(dim=0, keepdim=True).clamp_min(_EPS)

    def lasso_value(self, lasso: float) -> torch.Tensor:
        return lasso * self.channel_norms().sum()

    @torch.no_grad()
    def reset_grad_(self, lasso: float, masked_lasso: Optional[float] = None,
                    norms: Optional[torch.Tensor] = None) -> None:
        """In place: grad = mask * grad + d(lasso * sum ||group||)/dQ (METHOD.md section 4).

        ``masked_lasso`` (default: ``lasso``, the authors' form) is the lasso strength of the masked
        groups alone, so a short schedule can drive masked rows to zero in time without a larger
        pull on the rows that still learn. ``norms`` (one per channel) replaces the groups' own norms:
        a residual group's lasso runs over the stacked rows of all its members."""
        w = self.weight
        g = w.grad
        if g is None:
            g = w.grad = torch.zeros_like(w)
        m = self.mask.to(g.dtype)
        lam = m * lasso + (1.0 - m) * (lasso if masked_lasso is None else masked_lasso)  # per group
        if self.kind == "diag":
            g.mul_(m).add_(torch.sign(w) * lam)
        elif self.kind == "out":
            n = w.norm(dim=1) if norms is None else norms.to(w.dtype)
            g.mul_(m[:, None]).add_(w / n.clamp_min(_EPS)[:, None] * lam[:, None])
        else:
            g.mul_(m[None, :]).add_(w / w.norm(dim=0, keepdim=True).clamp_min(_EPS) * lam[None, :])

    def mask_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """Multiply a gradient of ``weight`` by the channel mask along the channel axis."""
        m = self.mask.to(grad.dtype)
        if self.kind == "diag":
            return grad * m
        return grad * (m[:, None] if self.kind == "out" else m[None, :])

    @torch.no_grad()
    def zero_(self, channels: Iterable[int]) -> "DGC":
        """Set the given channels' groups exactly to zero."""
        idx = torch.as_tensor(list(channels), dtype=torch.long, device=self.weight.device)
        if idx.numel() == 0:
            return self
        if self.kind == "diag":
            self.weight[idx] = 0.0
        elif self.kind == "out":
            self.weight[idx, :] = 0.0
        else:
            self.weight[:, idx] = 0.0
        return self

    def matrix(self) -> torch.Tensor:
        """The compactor as a dense C x C matrix (diagonal and block-diagonal kinds included)."""
        w = self.weight.detach()
        if self.blocks > 1:
            return w * self.block_mask.to(w.dtype)
        return torch.diag(w) if self.kind == "diag" else w


def apply_output_dgc(module: nn.Module, inputs, output):
    """Forward hook: route a host module's output through its DGC (looked up at call time,
    so copies of the model use their own DGC)."""
    return module.cdd_dgc(output)


def apply_input_dgc(module: nn.Module, inputs):
    """Forward pre-hook: route a consumer's first input through its DGC."""
    return (module.cdd_dgc(inputs[0]),) + tuple(inputs[1:])


def _pool(x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """[batch, channels]: the mean over every position (pixels; tokens when the channels are last,
    the class token included: every token goes through the compacted layer)."""
    if x.dim() <= 2:
        return x
    return x.flatten(1, -2).mean(1) if channels_last else x.flatten(2).mean(-1)


def tap_output(module: nn.Module, inputs, output):
    """Forward hook of the distiller: while it collects, keep the pooled output on the module
    itself (so copies of a model tap into their own modules, and nothing is kept otherwise)."""
    if module.__dict__.get("_cdd_tap_on"):
        _keep_tap(module, _pool(output, isinstance(module, nn.Linear)))


def _mean_over_calls(prev: Optional[torch.Tensor], calls: int, pooled: torch.Tensor):
    """(running mean, calls) after one more call's pooled feature; a new shape starts over."""
    if prev is None or prev.shape != pooled.shape:
        return pooled, 1
    return prev + (pooled - prev) / (calls + 1), calls + 1


def _keep_tap(module: nn.Module, pooled: torch.Tensor) -> None:
    """The pooled feature of this forward; a module called several times (shared blocks) keeps the
    mean over its calls, as its compactor does."""
    module._cdd_tap, module._cdd_tap_calls = _mean_over_calls(
        module.__dict__.get("_cdd_tap"), module.__dict__.get("_cdd_tap_calls", 0), pooled)


def tap_input(module: nn.Module, inputs):
    """Forward pre-hook of the distiller (runs after a DGC pre-hook: sees the compacted input)."""
    if module.__dict__.get("_cdd_tap_on"):
        _keep_tap(module, _pool(inputs[0], isinstance(module, nn.Linear)))


CDD_HOOKS = (apply_output_dgc, apply_input_dgc, tap_output, tap_input)


def strip_cdd_hooks(model: nn.Module) -> None:
    """Remove every cdd_plugin hook (DGC routing and feature taps) from a model's modules."""
    for m in model.modules():
        for hooks in (m._forward_hooks, m._forward_pre_hooks):
            for key in [k for k, fn in hooks.items() if fn in CDD_HOOKS]:
                del hooks[key]
        for attr in ("_cdd_tap", "_cdd_tap_on", "_cdd_tap_calls"):
            m.__dict__.pop(attr, None)
