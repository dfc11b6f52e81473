"""Graph surgery: find every channel set that can be compacted exactly, insert DGCs.

Placement is decided on torch-pruning dependency graphs (no per-architecture tables):
each out-channel group of a convolution / linear layer is one candidate channel set.
A set is compacted when one dense producer owns it (channels tied by a residual
addition have several producers and are skipped) and a DGC can be folded exactly:

* producer -> BatchNorm (or no norm) -> ...      : output-side DGC after the norm
* producer -> InstanceNorm / IBN-like -> consumer : input-side DGC before the consumer
* producer -> ... depthwise conv (-> BN) -> ...   : diagonal DGC after the depthwise norm

After placement a numeric probe zeroes one channel of every DGC and checks that the
channel arrives as exact zeros at every consumer; a site that fails is removed again
and reported, so surgery never keeps a compactor that merge could not fold exactly.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch_pruning as tp
from torch import nn

from .config import CDDConfig
from .dgc import DGC, apply_input_dgc, apply_output_dgc

_DGC_ATTR = "cdd_dgc"


class SurgeryError(RuntimeError):
    """Surgery cannot proceed; the message says why and what to change."""


@dataclass
class DGCSite:
    """One compacted channel set."""

    name: str                      # qualified name of the DGC module (``<host>.cdd_dgc``)
    kind: str                      # "out" | "in" | "diag"
    channels: int
    host: str                      # module the DGC is hooked on
    producer: str                  # conv/linear whose output channels are cut
    norm: Optional[str] = None     # BatchNorm folded into the producer (out) / depthwise (diag)
    depthwise: Optional[str] = None
    consumers: List[str] = field(default_factory=list)
    tap: Tuple[str, str] = ("", "output")   # where the matching teacher feature is read
    consumer_shares: Dict[str, int] = field(default_factory=dict)  # input features of each consumer from this set

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "channels": self.channels, "host": self.host,
                "producer": self.producer, "norm": self.norm, "depthwise": self.depthwise,
                "consumers": list(self.consumers), "tap": list(self.tap),
                "consumer_shares": dict(self.consumer_shares)}


@dataclass
class Skipped:
    layers: List[str]
    reason: str


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _is_grouped(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and not _is_depthwise(m)


def _is_dense(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)


def _foldable_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None


def _get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(_get_module(model, parent_name), child, new)


def find_dgcs(model: nn.Module) -> Dict[str, DGC]:
    return {n: m for n, m in model.named_modules() if isinstance(m, DGC)}


def _run(model: nn.Module, example_inputs: Any, forward_fn: Optional[Callable] = None):
    if forward_fn is not None:
        return forward_fn(model, example_inputs)
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def _describe_inputs(example_inputs: Any) -> str:
    if isinstance(example_inputs, torch.Tensor):
        return f"a tensor of shape {tuple(example_inputs.shape)}"
    if isinstance(example_inputs, (tuple, list)):
        return "(" + ", ".join(_describe_inputs(x) for x in example_inputs) + ")"
    return type(example_inputs).__name__


def check_inputs(model: nn.Module, example_inputs: Any, forward_fn: Optional[Callable] = None) -> None:
    """Run one eval forward; turn a shape error into a message that names the fix."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _run(model, example_inputs, forward_fn)
    except Exception as exc:  # the model's own error, re-raised with the fix
        raise SurgeryError(
            f"example_inputs ({_describe_inputs(example_inputs)}) do not fit the model: {type(exc).__name__}: {exc}. "
            "Fix: pass a small batch shaped like your training input, e.g. torch.randn(2, 3, 256, 128) for a "
            "person re-ID backbone (batch >= 2 avoids BatchNorm1d errors in heads)."
        ) from exc
    finally:
        model.train(was_training)


class _Planner:
    """Classifies torch-pruning groups into DGC sites or stated skips."""

    def __init__(self, model: nn.Module, DG: tp.DependencyGraph):
        self.model = model
        self.DG = DG
        self.name_of = {m: n for n, m in model.named_modules()}
        self.customized = tuple(t for t in DG.CUSTOMIZED_PRUNERS.keys() if isinstance(t, type))

    def _node_outputs(self, m: nn.Module) -> List[Any]:
        node = self.DG.module2node.get(m)
        return [] if node is None else [o.module for o in node.outputs]

    def classify(self, group) -> Tuple[Optional[DGCSite], Optional[Skipped]]:
        DG = self.DG
        producers, depthwise, consumers, norms, others = [], [], [], [], []
        shares: Dict[str, int] = {}
        self.last_shares = shares
        reaches_output = False
        for dep, _idxs in group:
            mod = dep.target.module
            fn = dep.handler
            if isinstance(mod, tp.ops._OutputOp) or (DG.is_out_channel_pruning_fn(fn) and not dep.target.outputs):
                reaches_output = True
                continue
            if isinstance(mod, (tp.ops._ElementWiseOp, tp.ops._ConcatOp, tp.ops._SplitOp, tp.ops._ReshapeOp,
                                tp.ops._SliceOp, tp.ops._UnbindOp, tp.ops._ExpandOp)):
                continue
            if isinstance(mod, nn.Parameter):
                others.append(("an unwrapped parameter", mod))
                continue
            is_out = DG.is_out_channel_pruning_fn(fn)
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                if _is_depthwise(mod):
                    depthwise.append(mod)
                elif is_out:
                    producers.append(mod)
                else:
                    consumers.append(mod)
                    shares[self.name_of.get(mod, "?")] = len(_idxs)
            elif isinstance(mod, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
                                  nn.GroupNorm, nn.LayerNorm)) or (self.customized and isinstance(mod, self.customized)):
                norms.append(mod)
            elif isinstance(mod, nn.PReLU):
                continue
            else:
                others.append((type(mod).__name__, mod))
        names = lambda ms: [self.name_of.get(m, type(m).__name__) for m in ms]  # noqa: E731
        root_mod = group[0].dep.target.module if len(group) else None
        root = names(producers or depthwise or consumers) or [self.name_of.get(root_mod, type(root_mod).__name__)]

        def skip(reason: str, layers=None) -> Tuple[None, Skipped]:
            return None, Skipped(layers or root, reason)

        if reaches_output:
            return skip("its channels are part of the model output (pruning them would change the output size)")
        if others:
            kind, _ = others[0]
            return skip(f"the channel group contains {kind}, which surgery cannot fold exactly")
        if len(producers) != 1:
            if len(producers) == 0:
                return skip("no dense producer owns these channels")
            return skip(f"channels are coupled across {len(producers)} producers ({', '.join(names(producers)[:4])}"
                        f"{', ...' if len(producers) > 4 else ''}) by a residual addition or concatenation; "
                        "the paper does not compact coupled channels", names(producers))
        producer = producers[0]
        pname = self.name_of[producer]
        channels = producer.out_channels if isinstance(producer, nn.Conv2d) else producer.out_features
        if channels < 2:
            return skip("the layer has a single output channel")
        grouped = [m for m in consumers + [producer] if _is_grouped(m)]
        if grouped:
            return skip(f"grouped convolution {names(grouped)[0]} (groups={grouped[0].groups}) cannot lose "
                        "arbitrary channels without breaking its group structure", [pname])
        bad_norm = [m for m in norms if isinstance(m, (nn.GroupNorm, nn.LayerNorm))]
        if bad_norm:
            return skip(f"{type(bad_norm[0]).__name__} {names(bad_norm)[0]} normalises across channels; removing "
                        "channels would change the function", [pname])
        consumer_names = names(consumers)
        if depthwise:
            if len(depthwise) > 1:
                return skip("a chain of several depthwise convolutions is not supported", [pname])
            dw = depthwise[0]
            if dw.out_channels != channels:
                return skip(f"the depthwise convolution {names([dw])[0]} carries {dw.out_channels} channels, of which "
                            f"these {channels} are a part (concatenation); a diagonal compactor needs them alone",
                            [pname])
            outs = self._node_outputs(dw)
            norm = outs[0] if len(outs) == 1 and isinstance(outs[0], nn.Module) and _foldable_bn(outs[0]) else None
            host = norm if norm is not None else dw
            hname = self.name_of[host]
            return DGCSite(name=f"{hname}.{_DGC_ATTR}", kind="diag", channels=channels, host=hname, producer=pname,
                           norm=self.name_of[norm] if norm is not None else None, depthwise=self.name_of[dw],
                           consumers=consumer_names, tap=(hname, "output")), None
        outs = self._node_outputs(producer)
        first = outs[0] if len(outs) == 1 else None
        if isinstance(first, nn.Module) and _foldable_bn(first):
            hname = self.name_of[first]
            return DGCSite(name=f"{hname}.{_DGC_ATTR}", kind="out", channels=channels, host=hname, producer=pname,
                           norm=hname, consumers=consumer_names, tap=(hname, "output")), None
        if norms:
            # a norm that cannot be folded backward (InstanceNorm, IBN, a BatchNorm after the activation):
            # compact on the single dense consumer's input instead and fold forward
            if len(consumers) != 1 or not _is_dense(consumers[0]):
                return skip(f"the producer's {type(norms[0]).__name__} cannot be folded into it, and an input-side "
                            f"compactor needs exactly one dense consumer (found {len(consumers)})", [pname])
            width = getattr(consumers[0], "in_channels", getattr(consumers[0], "in_features", None))
            if width != channels:
                return skip(f"the consumer {consumer_names[0]} sees {width} input channels, of which these "
                            f"{channels} are a part (concatenation); an input-side compactor needs them alone",
                            [pname])
            cname = consumer_names[0]
            return DGCSite(name=f"{cname}.{_DGC_ATTR}", kind="in", channels=channels, host=cname, producer=pname,
                           consumers=consumer_names, tap=(cname, "input")), None
        return DGCSite(name=f"{pname}.{_DGC_ATTR}", kind="out", channels=channels, host=pname, producer=pname,
                       consumers=consumer_names, tap=(pname, "output")), None


def build_graph(model: nn.Module, example_inputs: Any, *, customized_pruners=None, forward_fn=None,
                output_transform=None, ignored_layers=None) -> tp.DependencyGraph:
    was_training = model.training
    frozen = [p for p in model.parameters() if not p.requires_grad]
    model.eval()
    try:
        for p in frozen:  # torch-pruning traces through autograd: a frozen model has no graph
            p.requires_grad_(True)
        with torch.enable_grad():
            DG = tp.DependencyGraph().build_dependency(
                model, example_inputs, forward_fn=forward_fn, output_transform=output_transform,
                customized_pruners=customized_pruners, ignored_layers=ignored_layers, verbose=False)
    except Exception as exc:
        raise SurgeryError(
            f"torch-pruning could not trace {type(model).__name__}'s channel dependencies "
            f"({type(exc).__name__}: {exc}). Operations that reshuffle channels (e.g. ShuffleNet's channel "
            "shuffle) are not supported; pass the modules around them in ignored_layers, or register a "
            "customized pruner for a custom layer (customized_pruners=...)") from exc
    finally:
        for p in frozen:
            p.requires_grad_(False)
        model.train(was_training)
    return DG


def attach(model: nn.Module, site: DGCSite, dgc: DGC) -> None:
    host = _get_module(model, site.host)
    setattr(host, _DGC_ATTR, dgc)
    if site.kind == "in":
        host.register_forward_pre_hook(apply_input_dgc)
    else:
        host.register_forward_hook(apply_output_dgc)


def detach(model: nn.Module, site_host: str) -> None:
    host = _get_module(model, site_host)
    for hooks in (host._forward_hooks, host._forward_pre_hooks):
        for key in [k for k, fn in hooks.items() if fn in (apply_output_dgc, apply_input_dgc)]:
            del hooks[key]
    if hasattr(host, _DGC_ATTR):
        delattr(host, _DGC_ATTR)


def _perturbed_copy(model: nn.Module) -> nn.Module:
    """A float64 copy whose norms and biases are moved away from their values, relative to
    their own scale, so an operation that maps 0 to a non-zero value (a BatchNorm shift, a
    bias) shows up in the probe even on a freshly initialised model (where a BatchNorm
    still maps 0 to 0), without pushing a trained network's activations to overflow."""
    probe = copy.deepcopy(model).double()
    g = torch.Generator().manual_seed(1234)

    def noise(t):
        return torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device)

    with torch.no_grad():
        for m in probe.modules():
            if isinstance(m, DGC):
                continue
            is_norm = isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
                                     nn.GroupNorm, nn.LayerNorm))
            for pname, p in m.named_parameters(recurse=False):
                if pname == "bias":
                    p.add_(noise(p) * p.abs().mean().clamp_min(0.1))
                elif pname == "weight" and is_norm:
                    p.mul_(1.0 + 0.5 * torch.rand(p.shape, generator=g, dtype=torch.float64).to(p.device))
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                std = m.running_var.clamp_min(1e-6).sqrt()
                m.running_mean.add_(noise(m.running_mean) * std)
                m.running_var.mul_(0.5 + torch.rand(m.running_var.shape, generator=g, dtype=torch.float64)
                                   .to(m.running_var.device))
    return probe


def _probe(model: nn.Module, sites: List[DGCSite], DG: tp.DependencyGraph, example_inputs, forward_fn) -> Dict[str, str]:
    """Zero channel 0 of every out/diag DGC (on a perturbed copy) and check that it reaches
    each consumer as exact zeros."""
    failures: Dict[str, str] = {}
    name_of = {m: n for n, m in model.named_modules()}
    checks: List[Tuple[DGCSite, str, List[int], bool]] = []
    for site in sites:
        if site.kind == "in":
            continue
        root = _get_module(model, site.depthwise or site.producer)
        fn = tp.prune_depthwise_conv_out_channels if site.depthwise else (
            tp.prune_conv_out_channels if isinstance(root, nn.Conv2d) else tp.prune_linear_out_channels)
        group = DG.get_pruning_group(root, fn, [0])
        for dep, idxs in group:
            mod = dep.target.module
            if isinstance(mod, (nn.Conv2d, nn.Linear)) and DG.is_in_channel_pruning_fn(dep.handler) and not _is_depthwise(mod):
                checks.append((site, name_of[mod], list(idxs), isinstance(mod, nn.Conv2d)))
    if not checks:
        return failures
    probe = _perturbed_copy(model)
    seen: Dict[str, List[torch.Tensor]] = {}
    for cname in {c[1] for c in checks}:
        def grab(module, inputs, _name=cname):
            seen.setdefault(_name, []).append(inputs[0].detach())
        _get_module(probe, cname).register_forward_pre_hook(grab)
    probe.eval()
    for s in sites:
        if s.kind != "in":
            _get_module(probe, s.name).zero_([0])
    with torch.no_grad():
        _run(probe, _to_double(example_inputs), forward_fn)
    for site, cname, idxs, is_conv in checks:
        for x in seen.get(cname, []):
            part = x[:, idxs] if is_conv else x[..., idxs]
            if not torch.isfinite(part).all():
                raise SurgeryError(f"the exactness probe overflowed at {cname} (activations too large even in "
                                   "float64), so surgery cannot tell which compactors merge exactly. Fix: run "
                                   "insert_dgc on a freshly initialised copy of the architecture and load the "
                                   "trained weights afterwards")
            if part.abs().max().item() != 0.0:
                failures[site.name] = (f"a zeroed channel reaches {cname} as non-zero values (an operation in "
                                       "between maps 0 to a non-zero value, e.g. a BatchNorm, a bias or a sigmoid); "
                                       "merge could not remove it exactly")
                break
    return failures


def insert_dgc(model: nn.Module, example_inputs: Any, cfg: Optional[CDDConfig] = None, *,
               customized_pruners: Optional[dict] = None, ignored_layers: Optional[Sequence[nn.Module]] = None,
               forward_fn: Optional[Callable] = None, output_transform: Optional[Callable] = None):
    """Insert identity-initialised DGCs into ``model`` (in place) and return its CDD state.

    ``example_inputs`` is a small batch shaped like the training input. ``ignored_layers``
    are never compacted. ``customized_pruners`` maps module types torch-pruning cannot
    trace (e.g. IBN) to torch-pruning pruners, as in ``tp.DependencyGraph``.
    """
    from .flops import FlopsModel
    from .state import CDDState

    cfg = (cfg or CDDConfig()).validate()
    if not isinstance(model, nn.Module):
        raise SurgeryError(f"insert_dgc needs an nn.Module, got {type(model).__name__}")
    if find_dgcs(model):
        raise SurgeryError("the model already has DGCs (insert_dgc was called on it before); call it once per model, "
                           "or build a fresh model")
    if getattr(model, "_cdd_merged", False):
        raise SurgeryError("the model is a merged CDD model; insert DGCs into the dense student instead")
    check_inputs(model, example_inputs, forward_fn)
    DG = build_graph(model, example_inputs, customized_pruners=customized_pruners, forward_fn=forward_fn,
                     output_transform=output_transform, ignored_layers=list(ignored_layers or []))
    planner = _Planner(model, DG)
    sites: List[DGCSite] = []
    skipped: List[Skipped] = []
    ignored = set(ignored_layers or [])
    seen_hosts = set()
    for group in DG.get_all_groups(root_module_types=(nn.Conv2d, nn.Linear)):
        site, skip = planner.classify(group)
        if site is not None:
            site.consumer_shares = dict(planner.last_shares)
        if site is not None and _get_module(model, site.producer) in ignored:
            skip, site = Skipped([site.producer], "listed in ignored_layers"), None
        if site is not None and site.host in seen_hosts:
            skip, site = Skipped([site.producer], f"{site.host} already hosts a compactor"), None
        if site is not None:
            sites.append(site)
            seen_hosts.add(site.host)
        elif skip is not None:
            skipped.append(skip)
    if not sites:
        reasons = "; ".join(f"{', '.join(s.layers[:2])}: {s.reason}" for s in skipped[:6]) or "no conv/linear layer"
        raise SurgeryError(f"no prunable layer found in {type(model).__name__}: {reasons}. Fix: CDD needs "
                           "convolutions whose output channels are owned by one layer (e.g. the inner convs of "
                           "ResNet blocks); check ignored_layers and that example_inputs reach the backbone.")
    param = next(model.parameters())
    for site in sites:
        attach(model, site, DGC(site.channels, site.kind).to(device=param.device, dtype=param.dtype))
    failures = _probe(model, sites, DG, example_inputs, forward_fn)
    if failures:
        for site in [s for s in sites if s.name in failures]:
            detach(model, site.host)
            skipped.append(Skipped([site.producer], failures[site.name]))
        sites = [s for s in sites if s.name not in failures]
        if not sites:
            raise SurgeryError("no channel set can be compacted exactly: " + "; ".join(failures.values()))
    for site in sites:
        dgc = _get_module(model, site.name)
        dgc.site = site.to_dict()
        dgc.threshold = float(cfg.threshold)
        dgc.min_channels = int(cfg.min_channels)
    model._cdd_example_inputs = _detach_inputs(example_inputs)
    model._cdd_customized_pruners = customized_pruners
    model._cdd_forward_fn = forward_fn
    flops_model = FlopsModel.build(model, example_inputs, sites, forward_fn=forward_fn)
    return CDDState(model, sites, skipped, cfg, flops_model)


def _to_double(x):
    if isinstance(x, torch.Tensor):
        return x.double() if x.is_floating_point() else x
    if isinstance(x, (tuple, list)):
        return type(x)(_to_double(v) for v in x)
    if isinstance(x, dict):
        return {k: _to_double(v) for k, v in x.items()}
    return x


def _detach_inputs(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (tuple, list)):
        return type(x)(_detach_inputs(v) for v in x)
    if isinstance(x, dict):
        return {k: _detach_inputs(v) for k, v in x.items()}
    return copy.deepcopy(x)
