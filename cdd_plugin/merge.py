"""Merge: fold BatchNorms and DGCs into the convolutions, cut the zero channels, and check that
the merged network computes what the trained one computes (the merged-file format is in
``export``)."""
from __future__ import annotations

import copy
import logging
from typing import Any, List, Optional

import torch
import torch_pruning as tp
from torch import nn

from .dgc import DGC, kept_count, kept_per_group, strip_cdd_hooks
from .graph import (SurgeryError, build_graph, check_inputs, find_dgcs, flat_tensors, get_module, run, set_module,
                    to_double)
from .surgery import detach

logger = logging.getLogger("cdd_plugin")



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


def _zero_channels(dgc: DGC, threshold: float, min_keep: int, round_to: int = 1,
                   norms: Optional[torch.Tensor] = None) -> List[int]:
    """The rows merge cuts: those below ``threshold``, less the largest of them needed to keep
    ``kept_count`` rows (at least ``min_keep``, a multiple of ``round_to``); for a grouped site,
    the same count in every group (``kept_per_group``). ``norms`` replaces the compactor's own
    (a residual group's members are cut by the norms of their stacked rows, all alike)."""
    norms = dgc.channel_norms() if norms is None else norms
    groups = int(dgc.groups)
    if groups > 1:
        size = dgc.channels // groups
        m = kept_per_group((norms >= threshold).cpu(), groups, min_keep, round_to)
        cut: List[int] = []
        for j in range(groups):
            order = sorted(range(j * size, (j + 1) * size), key=lambda c: (-float(norms[c]), c))
            cut.extend(order[m:])  # the group's m largest rows stay, the rest (all below threshold) go
        return sorted(cut)
    below = (norms < threshold).nonzero().flatten().tolist()
    keep = kept_count(dgc.channels - len(below), dgc.channels, min_keep, round_to)
    extra = keep - (dgc.channels - len(below))
    if extra > 0:
        by_norm = sorted(below, key=lambda c: (-float(norms[c]), c))
        protect = set(by_norm[:extra])
        below = [c for c in below if c not in protect]
    return below


@torch.no_grad()
def _fold_site(model: nn.Module, site: dict, dgc: DGC, zero: List[int]) -> None:
    dgc.zero_(zero)
    Q = dgc.matrix().to(torch.float64)
    kind = site["kind"]
    if kind in ("out", "diag"):
        target = get_module(model, site["depthwise"] or site["producer"])
        w = target.weight.detach().to(torch.float64)
        b = None if target.bias is None else target.bias.detach().to(torch.float64)
        if site["norm"]:
            bn = get_module(model, site["norm"])
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
            set_module(model, site["norm"], nn.Identity())
    else:  # input side: fold forward into the consumer
        consumer = get_module(model, site["host"])
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
          forward_fn=None, verify: bool = True) -> nn.Module:
    """Fold every DGC and its BatchNorm into the adjacent convolution, remove the channels
    whose group norm is below ``threshold`` (default: the one given to ``insert_dgc``)
    and return a plain, narrower network in eval mode. ``model`` is left untouched
    unless ``inplace=True``; a failing merge leaves no half-merged model behind.

    Exactness is checked, not assumed (``verify``): the merged network and the trained one
    with the removed channels set to zero are run in float64 on the example inputs; if they
    differ, merge refuses and names the site whose cut changed the function. Compactors with
    NaN or infinite weights are refused before anything is built.
    """
    if getattr(model, "_cdd_merged", False):
        raise MergeError("this model is already merged (merge was called on its result); merge the trained "
                         "model with DGCs, once")
    dgcs = find_dgcs(model)
    if not dgcs:
        raise MergeError(f"{type(model).__name__} has no DGCs: nothing to merge. Call cdd_plugin.insert_dgc(model, "
                         "example_inputs, cfg) before training, and merge that model afterwards")
    bad = [n for n, d in dgcs.items() if not bool(torch.isfinite(d.weight).all())]
    if bad:
        raise MergeError(f"the compactor {bad[0]} holds NaN or infinite weights ({len(bad)} compactor(s) in all), so no "
                         "merged network could compute what the trained one computes. Fix: resume from the last "
                         "checkpoint whose compactors are finite (a non-finite step was taken: lower the learning "
                         "rate, or train with a loss scaler that skips such steps)")
    if example_inputs is None:
        example_inputs = getattr(model, "_cdd_example_inputs", None)
        if example_inputs is None:
            raise MergeError("no example inputs: pass merge(model, example_inputs=...) shaped like the input")
    if customized_pruners is None:
        customized_pruners = getattr(model, "_cdd_customized_pruners", None)
    if forward_fn is None:
        forward_fn = getattr(model, "_cdd_forward_fn", None)
    dtype = next(model.parameters()).dtype
    plan = []
    for name, dgc in dgcs.items():
        if getattr(dgc, "site", None) is None:
            raise MergeError(f"DGC {name} carries no site description; it was not inserted by cdd_plugin.insert_dgc")
    stacked = _tied_norms(dgcs)
    for name, dgc in dgcs.items():
        site = dgc.site
        thr = float(threshold if threshold is not None else getattr(dgc, "threshold", 1e-5))
        plan.append((name, site, _zero_channels(dgc, thr, int(getattr(dgc, "min_channels", 1)),
                                                int(getattr(dgc, "round_to", 1)), stacked.get(site.get("tie")))))
    _check_merge_inputs(model, example_inputs, forward_fn)
    try:
        work = _build_merged(model, plan, example_inputs, customized_pruners, forward_fn)
    except MergeError:
        raise
    except Exception as exc:
        culprit = _find_culprit(model, plan, example_inputs, customized_pruners, forward_fn) if verify else None
        raise MergeError(f"merging failed{f' at {culprit}' if culprit else ''} ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:300]}); the trained model is unchanged. Fix: train with that "
                         "layer in insert_dgc(..., ignored_layers=[...]), or report the architecture") from exc
    if verify:
        diff = _difference(model, work, plan, example_inputs, forward_fn)
        if diff > _TOLERANCE:
            culprit = _find_culprit(model, plan, example_inputs, customized_pruners, forward_fn)
            raise MergeError(f"the merged network would not compute what the trained one computes (relative "
                             f"difference {diff:.1e} in float64{f', caused by the channels cut at {culprit}' if culprit else ''}"
                             "), so merge refuses to return it; the trained model is unchanged. Fix: insert_dgc "
                             "with that layer in ignored_layers (its channels do not reach the next layers one to "
                             "one), or report the architecture")
    work.to(dtype)
    if inplace:
        # replace the caller's model contents only once everything above succeeded
        model.__dict__.update(work.__dict__)
        return model
    return work


def _tied_norms(dgcs) -> dict:
    """Residual group -> the norms of its members' stacked rows (one cut for every member). A group
    whose members do not all carry the same width is refused: one mask cannot cover them."""
    members: dict = {}
    for d in dgcs.values():
        tie = d.site.get("tie")
        if tie:
            members.setdefault(tie, []).append(d)
    out = {}
    for tie, ds in members.items():
        if len({d.channels for d in ds}) > 1:
            raise MergeError(f"the residual group {tie} has compactors of different widths "
                             f"({sorted({d.channels for d in ds})}); its members must share one mask. The model was "
                             "changed after insert_dgc; merge the model as insert_dgc and training left it")
        out[tie] = torch.stack([d.channel_norms() for d in ds]).pow(2).sum(0).sqrt()
    return out


#: largest relative output difference (float64) between a merged network and the trained one
_TOLERANCE = 1e-4


def _check_merge_inputs(model: nn.Module, example_inputs: Any, forward_fn) -> None:
    try:
        check_inputs(_as_float(copy.deepcopy(model)), _as_float(example_inputs), forward_fn)
    except SurgeryError as exc:
        raise MergeError(str(exc).replace("example_inputs", "merge's example_inputs", 1)) from None


def _as_float(x):
    """Floating tensors (and modules) in float32 unless they are float64: torch-pruning traces and the
    folding run in full precision; the merged network is cast back to the model's dtype."""
    if isinstance(x, nn.Module):
        p = next(x.parameters(), None)
        return x.float() if p is not None and p.dtype not in (torch.float32, torch.float64) else x
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() and x.dtype not in (torch.float32, torch.float64) else x
    if isinstance(x, (tuple, list)):
        return type(x)(_as_float(v) for v in x)
    if isinstance(x, dict):
        return {k: _as_float(v) for k, v in x.items()}
    return x


def _build_merged(model: nn.Module, plan, example_inputs, customized_pruners, forward_fn) -> nn.Module:
    work = _as_float(copy.deepcopy(model))
    dev_param = next(work.parameters())
    work.eval()
    folded = [(site, work.get_submodule(name), zero) for name, site, zero in plan]
    for site, dgc, zero in folded:
        _fold_site(work, site, dgc, zero)
    if any(zero for _, _, zero in folded):
        DG = build_graph(work, _to_device(_as_float(example_inputs), dev_param.device),
                         customized_pruners=customized_pruners, forward_fn=forward_fn)
        pruned_ties = set()
        for site, _, zero in folded:
            if not zero or (site.get("tie") and site["tie"] in pruned_ties):
                continue  # a residual group's channels go from every member at once, through its first
            if site.get("tie"):
                pruned_ties.add(site["tie"])
            if site["kind"] == "in":
                layer = get_module(work, site["host"])
            else:
                layer = get_module(work, site["depthwise"] or site["producer"])
            fn = _prune_fn(layer, site["kind"])
            if site.get("groups", 1) > 1:
                zero = _align_groups(DG, layer, fn, site, zero)
            group = DG.get_pruning_group(layer, fn, sorted(zero))
            group.prune()
            if site.get("embedding") and hasattr(work, "cdd_cut_embedding"):
                # a head outside the traced forward (e.g. a classifier read only in training) loses the same inputs
                work.cdd_cut_embedding(sorted(zero))
    strip_cdd_hooks(work)
    work.eval()
    for attr in ("_cdd_example_inputs", "_cdd_customized_pruners", "_cdd_forward_fn"):
        if hasattr(work, attr):
            delattr(work, attr)
    work._cdd_merged = True
    return work


@torch.no_grad()
def _align_groups(DG: tp.DependencyGraph, layer: nn.Module, fn, site: dict, zero: List[int]) -> List[int]:
    """Reorder a grouped site's channels within each group so that the cut rows sit at the same
    offsets in every group (torch-pruning cuts a grouped conv's inputs by offset within the group);
    the function is unchanged: every layer that reads or writes the set is permuted alike. Returns
    the cut rows' new positions."""
    groups, channels = int(site["groups"]), int(site["channels"])
    size = channels // groups
    cut = set(zero)
    perm: List[int] = []
    for j in range(groups):
        members = range(j * size, (j + 1) * size)
        perm.extend([c for c in members if c not in cut] + [c for c in members if c in cut])
    p = torch.as_tensor(perm, dtype=torch.long)
    for item in DG.get_pruning_group(layer, fn, list(range(channels))):
        mod, handler = item.dep.target.module, item.dep.handler
        if not isinstance(mod, nn.Module) or not any(True for _ in mod.parameters(recurse=False)):
            continue  # activations, additions and other parameter-free operations
        if isinstance(mod, (nn.Conv2d, nn.Linear)) and DG.is_out_channel_pruning_fn(handler):
            idx = p.to(mod.weight.device)
            mod.weight = nn.Parameter(mod.weight.detach()[idx].contiguous())
            if mod.bias is not None:
                mod.bias = nn.Parameter(mod.bias.detach()[idx].contiguous())
        elif isinstance(mod, (nn.Conv2d, nn.Linear)) and DG.is_in_channel_pruning_fn(handler):
            w = mod.weight.detach()
            g = getattr(mod, "groups", 1)
            if g == 1:
                w = w[:, p.to(w.device)]
            else:  # row block j reads input group j: permute its columns by group j's own order
                rows, local = w.shape[0] // g, p.view(g, -1) - torch.arange(g)[:, None] * size
                w = torch.cat([w[j * rows:(j + 1) * rows][:, local[j].to(w.device)] for j in range(g)])
            mod.weight = nn.Parameter(w.contiguous())
        else:
            raise MergeError(f"the grouped channel set of {site['name']} also reaches {type(mod).__name__}, which "
                             "merge cannot reorder; train with that layer in insert_dgc(..., ignored_layers=[...])")
    return [j * size + k for j in range(groups) for k in range(size - len(cut) // groups, size)]


@torch.no_grad()
def _difference(model: nn.Module, merged: nn.Module, plan, example_inputs, forward_fn) -> float:
    """Largest relative output difference (float64) between ``merged`` and ``model`` with the
    channels the plan removes set to zero (the function merge promises); inf when the merged
    network cannot run or its outputs have other shapes."""
    ref = copy.deepcopy(model).double()
    ref.eval()  # some frameworks' train() returns None: no chaining
    for name, _, zero in plan:
        ref.get_submodule(name).zero_(zero)
    x = to_double(example_inputs)
    dev = next(ref.parameters()).device
    want = flat_tensors(run(ref, _to_device(x, dev), forward_fn))
    try:
        net = copy.deepcopy(merged).double()
        net.eval()
        got = flat_tensors(run(net, _to_device(x, dev), forward_fn))
    except Exception:
        return float("inf")
    if len(got) != len(want):
        return float("inf")
    cut_embedding = any(site.get("embedding") and zero for _, site, zero in plan)
    worst = 0.0
    for a, b in zip(got, want):
        if a.shape != b.shape:
            # an embedding cut (cut_embedding): the merged output must be the trained one without channels
            # that are exactly zero there, in the same order
            kept = _kept_columns(b, a) if cut_embedding and a.is_floating_point() else None
            if kept is None:
                return float("inf")
            b = b[:, kept]
        if not a.is_floating_point():
            continue
        scale = float(b.abs().max()) if b.numel() else 0.0
        err = float((a - b).abs().max()) if b.numel() else 0.0
        worst = max(worst, err / max(scale, 1e-12) if scale > 0 else err)
    return worst


def _kept_columns(want: torch.Tensor, got: torch.Tensor) -> Optional[List[int]]:
    """The dim-1 columns of ``want`` that ``got`` keeps, in order, where every other column of ``want``
    is exactly zero and the kept ones match within the tolerance; None when there is no such
    alignment. A column of ``want`` that is exactly zero pairs only with an exactly zero column of
    ``got`` (zero columns are interchangeable) and is dropped otherwise; any other column must
    match the next column of ``got``."""
    if want.dim() < 2 or got.dim() != want.dim() or want.shape[0] != got.shape[0] or \
            want.shape[2:] != got.shape[2:] or got.shape[1] >= want.shape[1]:
        return None
    scale = max(float(want.abs().max()), 1e-12)
    zero_w = (want == 0).flatten(2).all(-1).all(0) if want.dim() > 2 else (want == 0).all(0)
    zero_g = (got == 0).flatten(2).all(-1).all(0) if got.dim() > 2 else (got == 0).all(0)
    kept: List[int] = []
    j = 0
    for i in range(want.shape[1]):
        if bool(zero_w[i]):
            if j < got.shape[1] and bool(zero_g[j]):
                kept.append(i)
                j += 1
        elif j < got.shape[1] and float((want[:, i] - got[:, j]).abs().max()) <= _TOLERANCE * scale:
            kept.append(i)
            j += 1
        else:
            return None
    return kept if j == got.shape[1] else None


def _find_culprit(model: nn.Module, plan, example_inputs, customized_pruners, forward_fn) -> Optional[str]:
    """The first site whose cut alone breaks the merge (None if no single site does); the members
    of a residual group are cut together."""
    tested = set()
    for i, (name, site, zero) in enumerate(plan):
        tie = site.get("tie")
        if not zero or tie in tested:
            continue
        if tie:
            tested.add(tie)
        alone = [(n, s, z if (j == i or (tie and s.get("tie") == tie)) else []) for j, (n, s, z) in enumerate(plan)]
        try:
            work = _build_merged(model, alone, example_inputs, customized_pruners, forward_fn)
        except Exception:
            return name
        if _difference(model, work, alone, example_inputs, forward_fn) > _TOLERANCE:
            return name
    return None


def _to_device(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    return x


