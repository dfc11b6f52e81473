"""The graph vocabulary every other module speaks: running a model on its example inputs,
tracing torch-pruning's dependency graph, looking modules up by name, and the layer
predicates placement and merge rely on. It depends on nothing else in the package but the
compactor module itself."""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List, Optional

import torch
import torch_pruning as tp
from torch import nn

from .dgc import DGC


class SurgeryError(RuntimeError):
    """Surgery cannot proceed; the message says why and what to change."""


def is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def is_grouped(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and not is_depthwise(m)


def is_dense(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)


def foldable_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(get_module(model, parent_name), child, new)


def find_dgcs(model: nn.Module) -> Dict[str, DGC]:
    return {n: m for n, m in model.named_modules() if isinstance(m, DGC)}


def run(model: nn.Module, example_inputs: Any, forward_fn: Optional[Callable] = None):
    if forward_fn is not None:
        return forward_fn(model, example_inputs)
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def run_with_hooks(model: nn.Module, example_inputs: Any, forward_fn: Optional[Callable] = None, handles=()):
    """One forward in eval mode without gradients, with the given hook ``handles`` in place; the hooks
    are removed and the training mode restored afterwards, whatever happens. Returns the output."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return run(model, example_inputs, forward_fn)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def describe_inputs(example_inputs: Any) -> str:
    if isinstance(example_inputs, torch.Tensor):
        return f"a tensor of shape {tuple(example_inputs.shape)}"
    if isinstance(example_inputs, (tuple, list)):
        return "(" + ", ".join(describe_inputs(x) for x in example_inputs) + ")"
    return type(example_inputs).__name__


def check_inputs(model: nn.Module, example_inputs: Any, forward_fn: Optional[Callable] = None) -> None:
    """Run one eval forward; turn a shape error into a message that names the fix."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            run(model, example_inputs, forward_fn)
    except Exception as exc:  # the model's own error, re-raised with the fix
        raise SurgeryError(
            f"example_inputs ({describe_inputs(example_inputs)}) do not fit the model: {type(exc).__name__}: {exc}. "
            "Fix: pass a small batch shaped like your training input, e.g. torch.randn(2, 3, 256, 128) for a "
            "person re-ID backbone (batch >= 2 avoids BatchNorm1d errors in heads)."
        ) from exc
    finally:
        model.train(was_training)


def build_graph(model: nn.Module, example_inputs: Any, *, customized_pruners=None, forward_fn=None,
                output_transform=None) -> tp.DependencyGraph:
    was_training = model.training
    frozen = [p for p in model.parameters() if not p.requires_grad]
    model.eval()
    seen: List[Any] = []

    def keep_outputs(out):  # the traced outputs, to find those torch-pruning does not mark (below)
        out = output_transform(out) if output_transform is not None else out
        seen.append(out)
        return out

    try:
        for p in frozen:  # torch-pruning traces through autograd: a frozen model has no graph
            p.requires_grad_(True)
        with torch.enable_grad():
            DG = tp.DependencyGraph().build_dependency(
                model, example_inputs, forward_fn=forward_fn, output_transform=keep_outputs,
                customized_pruners=customized_pruners, verbose=False)
    except Exception as exc:
        raise SurgeryError(
            f"torch-pruning could not trace {type(model).__name__}'s channel dependencies "
            f"({type(exc).__name__}: {exc}). Operations that reshuffle channels (e.g. ShuffleNet's channel "
            "shuffle) are not supported; for a custom layer register a customized pruner "
            "(customized_pruners=...)") from exc
    finally:
        for p in frozen:
            p.requires_grad_(False)
        model.train(was_training)
    # an output that is also an intermediate (``return fc(emb), emb``) gets no output node from torch-pruning
    # (the tensor's node exists already when the output is traced): record such nodes and their output shape
    outs = {t.grad_fn: tuple(t.shape[1:]) for t in (flat_tensors(seen[0]) if seen else []) if t.grad_fn is not None}
    DG.cdd_output_nodes = {node: outs[node.grad_fn] for node in DG.module2node.values()
                           if node.grad_fn in outs and not isinstance(node.module, tp.ops._OutputOp)}
    return DG


def to_double(x):
    if isinstance(x, torch.Tensor):
        return x.double() if x.is_floating_point() else x
    if isinstance(x, (tuple, list)):
        return type(x)(to_double(v) for v in x)
    if isinstance(x, dict):
        return {k: to_double(v) for k, v in x.items()}
    return x


def detach_inputs(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (tuple, list)):
        return type(x)(detach_inputs(v) for v in x)
    if isinstance(x, dict):
        return {k: detach_inputs(v) for k, v in x.items()}
    return copy.deepcopy(x)


def flat_tensors(x) -> List[torch.Tensor]:
    """Every tensor of a (nested) input."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in flat_tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in flat_tensors(v)]
    return []
