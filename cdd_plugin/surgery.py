"""Graph surgery: attach a compactor at every site placement finds, prove on a probe that each
can be folded exactly, and hand back the CDD state. A transaction: a failure leaves the model
as it was.

After placement, a numeric probe zeroes chosen channels of every compactor on a perturbed
float64 copy and checks that they arrive as exact zeros at every consumer; a site that fails
is removed again and reported, so surgery never keeps a compactor that merge could not fold
exactly (and merge checks the merged network against the trained one besides).
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch_pruning as tp
from torch import nn

from .config import CDDConfig
from .dgc import DGC, DGC_ATTR, apply_input_dgc, apply_output_dgc
from .graph import (SurgeryError, build_graph, check_inputs, detach_inputs, find_dgcs, flat_tensors, get_module,
                    is_depthwise, run, run_with_hooks, to_double)
from .placement import DGCSite, Planner, ResidualGroup, Skipped, paper_sites

__all__ = ["DGCSite", "Skipped", "SurgeryError", "attach", "detach", "find_dgcs", "insert_dgc"]


def attach(model: nn.Module, site: DGCSite, dgc: DGC) -> None:
    host = get_module(model, site.host)
    setattr(host, DGC_ATTR, dgc)
    if site.kind == "in":
        host.register_forward_pre_hook(apply_input_dgc)
    else:
        host.register_forward_hook(apply_output_dgc)


def detach(model: nn.Module, site_host: str) -> None:
    host = get_module(model, site_host)
    for hooks in (host._forward_hooks, host._forward_pre_hooks):
        for key in [k for k, fn in hooks.items() if fn in (apply_output_dgc, apply_input_dgc)]:
            del hooks[key]
    if hasattr(host, DGC_ATTR):
        delattr(host, DGC_ATTR)


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
    """Check on a perturbed float64 copy that every out/diag compactor's channels reach their
    consumers one to one: with chosen channels zeroed, those channels must arrive as exact zeros
    at every consumer. The channels are chosen where the unzeroed copy carries non-zero values
    (a channel that is zero anyway proves nothing), the first and the last such channel of every
    site, so slicing and concatenation patterns that shift channels show. A forward pass that
    fails with the compactors in place (a layout a 1x1 compactor cannot follow) is traced to its
    sites, one at a time; they are reported and removed, never left in the model."""
    failures: Dict[str, str] = {}
    name_of = {m: n for n, m in model.named_modules()}
    probe = _perturbed_copy(model)
    probe.eval()
    x = to_double(example_inputs)
    try:
        with torch.no_grad():
            run(probe, x, forward_fn)
    except Exception as exc:
        return _isolate_forward_failures(model, sites, x, forward_fn, exc)
    checks: List[Tuple[DGCSite, str, Dict[int, List[int]], bool]] = []  # noqa: E501
    out_checks: List[Tuple[DGCSite, tuple, Dict[int, List[int]]]] = []  # embedding groups: output columns
    for site in sites:
        if site.kind == "in":
            continue
        root = get_module(model, site.depthwise or site.producer)
        fn = tp.prune_depthwise_conv_out_channels if site.depthwise else (
            tp.prune_conv_out_channels if isinstance(root, nn.Conv2d) else tp.prune_linear_out_channels)
        group = DG.get_pruning_group(root, fn, list(range(site.channels)))
        for item in group:
            dep, idxs = item.dep, item.idxs
            mod = dep.target.module
            if isinstance(mod, (nn.Conv2d, nn.Linear)) and DG.is_in_channel_pruning_fn(dep.handler) and not is_depthwise(mod):
                roots = getattr(item, "root_idxs", None) or list(range(len(idxs)))
                mapping: Dict[int, List[int]] = {}  # channel of the site -> the consumer inputs it is cut from
                for r, i in zip(roots, idxs):
                    mapping.setdefault(int(r), []).append(int(i))
                checks.append((site, name_of[mod], mapping, isinstance(mod, nn.Conv2d)))
            shape = (tuple(mod.shape[1:]) if isinstance(mod, tp.ops._OutputOp) and mod.shape is not None
                     else DG.cdd_output_nodes.get(dep.target) if hasattr(DG, "cdd_output_nodes") else None)
            if site.embedding and shape is not None and not (
                    isinstance(mod, (nn.Conv2d, nn.Linear)) and DG.is_in_channel_pruning_fn(dep.handler)):
                roots = getattr(item, "root_idxs", None) or list(range(len(idxs)))
                mapping = {}
                for r, i in zip(roots, idxs):
                    mapping.setdefault(int(r), []).append(int(i))
                out_checks.append((site, shape, mapping))
    if not checks and not out_checks:
        return failures
    consumers = {c[1] for c in checks}
    base = {k: v[0] for k, v in _consumer_inputs(probe, consumers, x, forward_fn).items()}

    def channel(t: torch.Tensor, i: int, is_conv: bool) -> torch.Tensor:
        return t[:, i] if is_conv else t[..., i]

    chosen: Dict[str, List[int]] = {}
    for site in sites:
        if site.kind == "in":
            continue
        mine = [c for c in checks if c[0] is site]
        covered = {ch for _, _, m, _ in mine for ch in m}
        wide = [cn for _, cn, m, conv in mine
                if any(i >= base[cn].shape[1 if conv else -1] for v in m.values() for i in v)]
        if wide:
            failures[site.name] = (f"its {site.channels} channels do not map one to one onto the inputs of {wide[0]} "
                                   "(e.g. attention's fused query/key/value projection), so merge could not remove "
                                   "them exactly")
            continue
        if mine and len(covered) < site.channels:
            failures[site.name] = (f"{site.channels - len(covered)} of its {site.channels} channels reach no consumer "
                                   "layer one to one (e.g. they feed attention's query-key product), so merge could "
                                   "not remove them exactly")
            continue
        live = [ch for ch in range(site.channels)
                if all(ch in m and all(channel(base[cn], i, conv).abs().max() > 0 for i in m[ch])
                       for _, cn, m, conv in mine)]
        if mine and not live:
            failures[site.name] = ("no channel of this set reaches its consumers as a non-zero value on the example "
                                   "inputs, so surgery cannot verify that a removed channel would stay removed")
            continue
        chosen[site.name] = sorted({live[0], live[-1]}) if live else ([0, site.channels - 1] if site.embedding else [])
    # sites whose channels reach a consumer one to one are checked together in one run; a site
    # whose channels fan out to several consumer inputs (a concatenation of a tensor with a function
    # of itself, e.g. GhostNet) is checked alone: zeroing another site's channels could zero the
    # other copy through a ReLU and hide the difference
    shared = [s.name for s in sites if s.name in chosen
              and all(len(v) == 1 for c in checks if c[0] is s for v in c[2].values())]
    alone: Dict[str, List[str]] = {}  # the members of a residual group are zeroed together
    for s in sites:
        if s.name in chosen and s.name not in shared:
            alone.setdefault(s.tie or s.name, []).append(s.name)
    for batch in ([shared] if shared else []) + list(alone.values()):
        work = copy.deepcopy(probe)
        for n in batch:
            get_module(work, n).zero_(chosen[n])
        outputs: List[torch.Tensor] = []
        seen = _consumer_inputs(work, consumers, x, forward_fn, outputs)
        for site, shape, mapping in out_checks:  # a cut embedding: the zeroed channels are zero in the output
            if site.name not in batch or site.name in failures:
                continue
            cols = [i for c in chosen[site.name] for i in mapping.get(c, [])]
            for t in outputs:
                if tuple(t.shape[1:]) == shape and cols and t[:, cols].abs().max().item() != 0.0:
                    failures[site.name] = ("a zeroed channel reaches the model output as a non-zero value (an "
                                           "operation after the stream, e.g. a bias or a sigmoid, maps 0 to a "
                                           "non-zero value), so the embedding cannot lose it exactly")
        for site, cname, mapping, is_conv in checks:
            if site.name not in batch or site.name in failures:
                continue
            for t in seen.get(cname, []):
                part = torch.stack([channel(t, i, is_conv) for c in chosen[site.name] for i in mapping.get(c, [])])
                if not torch.isfinite(part).all():
                    raise SurgeryError(f"the exactness probe overflowed at {cname} (activations too large even in "
                                       "float64), so surgery cannot tell which compactors merge exactly. Fix: run "
                                       "insert_dgc on a freshly initialised copy of the architecture and load the "
                                       "trained weights afterwards")
                if part.abs().max().item() != 0.0:
                    failures[site.name] = (f"a zeroed channel reaches {cname} as non-zero values (an operation in "
                                           "between maps 0 to a non-zero value, e.g. a BatchNorm, a bias or a "
                                           "sigmoid, or the channel also reaches it another way, e.g. concatenated "
                                           "with a function of itself); merge could not remove it exactly")
                    break
    return failures


def _tap_groups(model: nn.Module, groups: List[ResidualGroup], example_inputs, forward_fn) -> None:
    """Each residual group's tap (its output, where RGGR scores it and the teacher is read): the input
    of the consumer that reads the stream last in a forward pass (the next stage's first block, or
    the classifier after pooling), i.e. the group's final value. A group that is the model output
    (``cut_embedding``) is read at the output of the block around its last member (the last block of
    the stage), or, if that block's output is not the stream, at the last member's own output."""
    order: List[str] = []
    outputs: Dict[str, int] = {}  # block -> channels of its output
    names = {c for g in groups for c in g.consumers}
    hosts = {m.host: m for g in groups if g.output for m in g.members}
    blocks = {h.rpartition(".")[0] for h in hosts if "." in h}

    def seen(name):
        return lambda m, i: order.append(name)

    def block_out(name):
        def hook(m, i, out):
            if isinstance(out, torch.Tensor) and out.dim() >= 2:
                outputs[name] = int(out.shape[1])
        return hook

    hooks = [get_module(model, n).register_forward_pre_hook(seen(n)) for n in names | set(hosts)]
    hooks += [get_module(model, b).register_forward_hook(block_out(b)) for b in blocks]
    run_with_hooks(model, example_inputs, forward_fn, hooks)
    last = {n: i for i, n in enumerate(order)}
    for g in groups:
        called = [c for c in g.consumers if c in last]
        if g.output:
            final = max((m.host for m in g.members if m.host in last), key=last.get, default=g.members[-1].host)
            block = final.rpartition(".")[0]
            tap = (block, "output") if outputs.get(block) == g.channels else (final, "output")
        elif called:
            tap = (max(called, key=last.get), "input")
        else:
            raise SurgeryError(f"no consumer of the residual group {g.name} runs in the forward pass on the example "
                               "inputs; pass example inputs that reach the whole backbone")
        for m in g.members:
            m.tap = tap
            m.consumer_shares = dict(g.consumer_shares)


def _consumer_inputs(model: nn.Module, names, x, forward_fn, outputs: Optional[list] = None
                     ) -> Dict[str, List[torch.Tensor]]:
    """The first input of every named module, for each of its calls in one forward pass (and, with
    ``outputs``, the model's output tensors appended to it)."""
    seen: Dict[str, List[torch.Tensor]] = {}
    hooks = [get_module(model, n).register_forward_pre_hook(
        lambda module, inputs, _name=n: seen.setdefault(_name, []).append(inputs[0].detach())) for n in names]
    try:
        with torch.no_grad():
            out = run(model, x, forward_fn)
    finally:
        for h in hooks:
            h.remove()
    if outputs is not None:
        outputs.extend(t for t in flat_tensors(out) if t.dim() >= 2)
    return seen


def _isolate_forward_failures(model: nn.Module, sites: List[DGCSite], x, forward_fn, exc: Exception) -> Dict[str, str]:
    """The model's forward fails with every compactor attached: attach them one at a time (on a copy)
    and report those with which it fails."""
    failures: Dict[str, str] = {}
    bare = copy.deepcopy(model)
    for s in sites:
        detach(bare, s.host)
    why = f"the model's forward fails with a compactor here ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
    for site in sites:
        trial = copy.deepcopy(bare)
        attach(trial, site, DGC(site.channels, site.kind, site.blocks, site.channels_last))
        trial = trial.double()
        trial.eval()
        try:
            with torch.no_grad():
                run(trial, x, forward_fn)
        except Exception:
            failures[site.name] = why + "; e.g. channels-last layers, where a compactor over dim 1 does not apply"
    if not failures:
        raise SurgeryError(f"the model's forward fails once compactors are attached ({type(exc).__name__}: {exc}), "
                           "and no single compactor explains it; the model is unchanged. Report the architecture") from exc
    return failures


def _resolve_ignored(model: nn.Module, ignored_layers) -> set:
    """``ignored_layers`` as a set of modules: a module, a qualified name, or an iterable of them."""
    if ignored_layers is None:
        return set()
    items = [ignored_layers] if isinstance(ignored_layers, (nn.Module, str)) else ignored_layers
    try:
        items = list(items)
    except TypeError:
        raise SurgeryError(f"ignored_layers={ignored_layers!r} is not a module, a module name or a list of them; "
                           "pass e.g. ignored_layers=[model.fc] or ignored_layers=['fc']") from None
    names = dict(model.named_modules())
    mine = {id(m) for m in names.values()}
    out = set()
    for item in items:
        if isinstance(item, str):
            if item not in names:
                close = [n for n in names if n and (item in n or n.endswith(item))][:4]
                raise SurgeryError(f"ignored_layers names {item!r}, which is not a module of {type(model).__name__}"
                                   + (f" (did you mean {', '.join(close)}?)" if close else "")
                                   + "; use the qualified names of model.named_modules()")
            out.add(names[item])
        elif isinstance(item, nn.Module):
            if id(item) not in mine:
                raise SurgeryError(f"ignored_layers holds a {type(item).__name__} that is not part of the model "
                                   "(from another instance?); pass the model's own modules or their names")
            out.add(item)
        else:
            raise SurgeryError(f"ignored_layers holds {item!r}; pass modules of the model or their qualified names")
    return out


def _check_call(model: nn.Module, example_inputs: Any, cfg: Any, forward_fn) -> None:
    """What insert_dgc needs before it touches anything, each with the fix."""
    if not isinstance(model, nn.Module):
        raise SurgeryError(f"insert_dgc needs an nn.Module, got {type(model).__name__}")
    if cfg is not None and not isinstance(cfg, CDDConfig):
        raise SurgeryError(f"cfg must be a cdd_plugin.CDDConfig, got a {type(cfg).__name__}; for a mapping use "
                           "CDDConfig.from_dict(settings)")
    if isinstance(example_inputs, dict) and forward_fn is None:
        raise SurgeryError("example_inputs is a dict: pass a tensor, or a tuple of the forward's positional inputs "
                           "(e.g. (images,)); for keyword inputs also pass forward_fn=lambda m, x: m(**x)")
    params = list(model.parameters())
    if not params:
        raise SurgeryError(f"{type(model).__name__} has no parameters: there is nothing to compact")
    if any(p.is_meta for p in params):
        raise SurgeryError("the model's parameters are on the meta device (not materialised); build it on a real "
                           "device (e.g. model.to_empty(device='cpu') and load its weights) before insert_dgc")
    for t in flat_tensors(example_inputs):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise SurgeryError("example_inputs hold NaN or infinite values; pass a finite batch shaped like the "
                               "training input, e.g. torch.randn(2, 3, 256, 128)")
        if t.is_floating_point() and t.numel() and float(t.abs().max()) > 1e4:
            raise SurgeryError(f"example_inputs reach {float(t.abs().max()):.3g}; surgery probes the network with "
                               "them, so pass a batch at the scale of the training input (e.g. torch.randn(2, 3, H, "
                               "W), or pixel values in [0, 255] for models that normalise inside)")


def insert_dgc(model: nn.Module, example_inputs: Any, cfg: Optional[CDDConfig] = None, *,
               customized_pruners: Optional[dict] = None, ignored_layers: Any = None,
               forward_fn: Optional[Callable] = None, output_transform: Optional[Callable] = None):
    """Insert identity-initialised DGCs into ``model`` (in place) and return its CDD state.

    ``example_inputs`` is a small batch shaped like the training input. ``ignored_layers``
    (modules of the model, or their qualified names) are never compacted.
    ``customized_pruners`` maps module types torch-pruning cannot trace (e.g. IBN) to
    torch-pruning pruners, as in ``tp.DependencyGraph``.

    Surgery is a transaction: if it fails, the model is left exactly as it was (no
    compactor, no hook, no attribute), so a corrected call can follow.
    """
    _check_call(model, example_inputs, cfg, forward_fn)
    cfg = (cfg or CDDConfig()).validate()
    if find_dgcs(model):
        raise SurgeryError("the model already has DGCs (insert_dgc was called on it before); call it once per model, "
                           "or build a fresh model")
    if getattr(model, "_cdd_merged", False):
        raise SurgeryError("the model is a merged CDD model; insert DGCs into the dense student instead")
    ignored = _resolve_ignored(model, ignored_layers)
    check_inputs(model, example_inputs, forward_fn)
    was_training = model.training
    attached: List[str] = []
    try:
        return _insert(model, example_inputs, cfg, customized_pruners, ignored, forward_fn, output_transform,
                       attached)
    except BaseException as exc:
        for host in attached:
            detach(model, host)
        for attr in ("_cdd_example_inputs", "_cdd_customized_pruners", "_cdd_forward_fn"):
            model.__dict__.pop(attr, None)
        model.train(was_training)
        if isinstance(exc, (SurgeryError, KeyboardInterrupt)):
            raise
        raise SurgeryError(f"surgery failed on {type(model).__name__} ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:300] if str(exc) else ''}); the model is unchanged. Fix: put "
                           "the layers around it in ignored_layers, or report the architecture") from exc


def _insert(model, example_inputs, cfg, customized_pruners, ignored, forward_fn, output_transform, attached):
    from .flops import FlopsModel  # noqa: F811  (state -> flops -> graph: no cycle back to surgery)
    from .state import CDDState

    DG = build_graph(model, example_inputs, customized_pruners=customized_pruners, forward_fn=forward_fn,
                     output_transform=output_transform)
    planner = Planner(model, DG, residual=cfg.residual, cut_embedding=cfg.cut_embedding)
    sites: List[DGCSite] = []
    skipped: List[Skipped] = []
    groups: List[ResidualGroup] = []
    seen_hosts = set()
    for group in DG.get_all_groups(root_module_types=(nn.Conv2d, nn.Linear)):
        site, skip = planner.classify(group)
        if isinstance(site, ResidualGroup):
            members = site.members
            if any(get_module(model, m.producer) in ignored or get_module(model, m.host) in ignored for m in members):
                skipped.append(Skipped([m.producer for m in members], "residual group: a member is listed in "
                                       "ignored_layers (the members of a group are compacted together or not at all)"))
            elif any(m.host in seen_hosts for m in members):
                skipped.append(Skipped([m.producer for m in members], "residual group: a member's host already hosts "
                                       "a compactor"))
            else:
                groups.append(site)
                seen_hosts.update(m.host for m in members)
            continue
        if site is not None:
            site.consumer_shares = dict(planner.last_shares)
        if site is not None and (get_module(model, site.producer) in ignored or get_module(model, site.host) in ignored):
            skip, site = Skipped([site.producer], "listed in ignored_layers"), None
        if site is not None and site.host in seen_hosts:
            skip, site = Skipped([site.producer], f"{site.host} already hosts a compactor"), None
        if site is not None:
            sites.append(site)
            seen_hosts.add(site.host)
        elif skip is not None:
            skipped.append(skip)
    if sites and cfg.sites == "paper":
        candidates = len(sites)
        sites, dropped = paper_sites(sites, planner.coupled)
        skipped.extend(dropped)
        if not sites and not groups:
            raise SurgeryError(
                f"sites='paper' (the authors' placement) puts one compactor per residual block, on the channel set "
                f"that feeds the block's last convolution, and {type(model).__name__} has no such block (surgery "
                f"found {candidates} other compactable channel set(s)). Fix: CDDConfig(sites='all') compacts every "
                "channel set that can be folded exactly")
    if groups:
        _tap_groups(model, groups, example_inputs, forward_fn)
        sites = sites + [m for g in groups for m in g.members]
    if not sites:
        reasons = "; ".join(f"{', '.join(s.layers[:2])}: {s.reason}" for s in skipped[:6]) or "no conv/linear layer"
        raise SurgeryError(f"no prunable layer found in {type(model).__name__}: {reasons}. Fix: CDD needs "
                           "convolutions whose output channels are owned by one layer (e.g. the inner convs of "
                           "ResNet blocks); check ignored_layers and that example_inputs reach the backbone.")
    param = next(model.parameters())
    for site in sites:
        attach(model, site, DGC(site.channels, site.kind, site.blocks, site.channels_last).to(device=param.device,
                                                                                             dtype=param.dtype))
        attached.append(site.host)
    failures = _probe(model, sites, DG, example_inputs, forward_fn)
    for site in sites:  # the members of a residual group stay or go together
        if site.tie and site.name in failures:
            for other in sites:
                if other.tie == site.tie and other.name not in failures:
                    failures[other.name] = f"{failures[site.name]} (at {site.producer}, a member of its residual group)"
    if failures:
        skipped_sites = [s for s in sites if s.name in failures]
        for site in skipped_sites:
            detach(model, site.host)
            attached.remove(site.host)
            skipped.append(Skipped([site.producer], failures[site.name]))
        sites = [s for s in sites if s.name not in failures]
        if not sites:
            named = [f"{s.producer}: {failures[s.name]}" for s in skipped_sites]
            raise SurgeryError("no channel set can be compacted exactly: " + "; ".join(named[:4])
                               + (f"; and {len(named) - 4} more" if len(named) > 4 else "")
                               + ". Fix: CDD needs convolutions or MLP layers whose channels reach the next layer one "
                               "to one (the layers above do not); if this architecture should work, report it")
    for site in sites:
        dgc = get_module(model, site.name)
        dgc.site = site.to_dict()
        dgc.threshold = float(cfg.threshold)
        dgc.min_channels = int(cfg.min_channels)
        dgc.round_to = int(cfg.round_to)
        dgc.groups = int(site.groups)
        dgc.decay = bool(cfg.decay_compactors)
        dgc.tie = site.tie
    model._cdd_example_inputs = detach_inputs(example_inputs)
    model._cdd_customized_pruners = customized_pruners
    model._cdd_forward_fn = forward_fn
    flops_model = FlopsModel.build(model, example_inputs, sites, forward_fn=forward_fn)
    return CDDState(model, sites, skipped, cfg, flops_model)


