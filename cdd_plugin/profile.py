"""Counting and timing: params, FLOPs (torch-pruning's counter), CPU latency, channel tables."""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional

import torch
import torch_pruning as tp
from torch import nn

from torch_pruning.utils import op_counter

from .dgc import DGC
from .graph import run as _run


def _dgc_macs_per_image(module: DGC, x: torch.Tensor) -> int:
    """A DGC as the 1x1 convolution (or per-channel scale) it is, per image of input ``x``."""
    per_position = module.channels if module.kind == "diag" else module.channels * module.channels
    return int(per_position * (int(torch.tensor(x.shape[2:]).prod()) if x.dim() > 2 else 1))


def _dgc_flops(module: DGC, inputs, output) -> None:
    module.__flops__ += inputs[0].shape[0] * _dgc_macs_per_image(module, inputs[0])


def profile(model: nn.Module, example_inputs: Any, *, latency: bool = False, warmup: int = 3, runs: int = 10,
            threads: Optional[int] = None, forward_fn=None, count_dgc: bool = True) -> Dict[str, float]:
    """Params and FLOPs (MACs, torch-pruning's counter) at ``example_inputs``; with
    ``latency=True`` also the median CPU forward time in milliseconds.

    ``count_dgc=True`` counts the compactors of an unmerged student as the 1x1 convolutions
    (or per-channel scales) they are, i.e. what a training forward costs; ``count_dgc=False``
    gives the figures of the student's own architecture (its parameters and FLOPs without
    the compactors, which ``merge`` folds away)."""
    was_training = model.training
    model.eval()
    try:
        # count a DGC as the 1x1 convolution (or per-channel scale) it is, so an unmerged
        # student's figures are honest; torch-pruning resets this mapping after each count
        op_counter.CUSTOM_MODULES_MAPPING = {DGC: _dgc_flops}
        counted = model if forward_fn is None else _CallThrough(model, forward_fn)
        flops, params = tp.utils.count_ops_and_params(counted, example_inputs)
        # torch-pruning stops at the first module it can count, so a DGC hosted by a counted
        # module (a BatchNorm or conv it is attached to) is never reached: add those here
        dgcs = [m for m in model.modules() if isinstance(m, DGC)]
        if dgcs:
            per_dgc = _dgc_flops_per_image(model, dgcs, example_inputs, forward_fn)
            flops += sum(per_dgc[id(d)] for d in _dgcs_hidden_from_counter(model))
            if not count_dgc:
                flops -= sum(per_dgc.values())
                params -= sum(p.numel() for d in dgcs for p in d.parameters())
        out: Dict[str, float] = {"params": int(params), "flops": int(flops)}
        if latency:
            out["latency_ms"] = measure_latency(model, example_inputs, warmup=warmup, runs=runs, threads=threads,
                                                forward_fn=forward_fn)
        return out
    finally:
        model.train(was_training)


class _CallThrough(nn.Module):
    """``model`` called through ``forward_fn`` (the counter itself only calls ``model(inputs)``)."""

    def __init__(self, model: nn.Module, forward_fn) -> None:
        super().__init__()
        self.model = model
        self.forward_fn = forward_fn

    def forward(self, *args, **kwargs):
        inputs = kwargs if kwargs else (args[0] if len(args) == 1 else args)
        return _run(self.model, inputs, self.forward_fn)


def _dgcs_hidden_from_counter(model: nn.Module) -> List[DGC]:
    """DGCs below a module that torch-pruning's counter counts as a whole (it never recurses there)."""
    counted = set(op_counter.MODULES_MAPPING) | {DGC}
    hidden = []

    def walk(module: nn.Module, covered: bool) -> None:
        for child in module.children():
            if isinstance(child, DGC):
                if covered:
                    hidden.append(child)
                continue
            walk(child, covered or type(child) in counted)

    walk(model, type(model) in counted)
    return hidden


@torch.no_grad()
def _dgc_flops_per_image(model: nn.Module, dgcs: List[DGC], example_inputs: Any, forward_fn=None) -> Dict[int, int]:
    """FLOPs of each of ``dgcs`` (by ``id``) in one forward at ``example_inputs``, per image."""
    out = {id(d): 0 for d in dgcs}

    def hook(module, inputs, output):
        out[id(module)] += _dgc_macs_per_image(module, inputs[0])

    handles = [d.register_forward_hook(hook) for d in dgcs]
    try:
        _run(model, example_inputs, forward_fn)
    finally:
        for h in handles:
            h.remove()
    return out


@torch.no_grad()
def measure_latency(model: nn.Module, example_inputs: Any, *, warmup: int = 3, runs: int = 10,
                    threads: Optional[int] = None, forward_fn=None) -> float:
    """Median wall-clock milliseconds of one eval forward."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    was_training = model.training
    model.eval()
    try:
        for _ in range(warmup):
            _run(model, example_inputs, forward_fn)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            _run(model, example_inputs, forward_fn)
            times.append((time.perf_counter() - t0) * 1000.0)
        times.sort()
        return times[len(times) // 2]
    finally:
        model.train(was_training)
        torch.set_num_threads(old)


def channel_table(dense: nn.Module, merged: nn.Module) -> List[dict]:
    """Output channels of every conv / linear layer before and after merge, in model order."""
    after = dict(merged.named_modules())
    rows = []
    for name, m in dense.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and name in after:
            a = after[name]
            b_ch = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            a_ch = a.out_channels if isinstance(a, nn.Conv2d) else getattr(a, "out_features", b_ch)
            rows.append({"layer": name, "before": int(b_ch), "after": int(a_ch)})
    return rows


def format_channel_table(rows: List[dict]) -> str:
    w = max([len(r["layer"]) for r in rows] + [5])
    lines = [f"{'layer'.ljust(w)}  before  after   kept"]
    for r in rows:
        lines.append(f"{r['layer'].ljust(w)}  {r['before']:>6}  {r['after']:>5}  {r['after'] / r['before']:>5.0%}")
    return "\n".join(lines)


def plot_channels(rows: List[dict], path: str, title: str = "Channels per layer") -> str:
    """PNG bar chart of output channels per layer, before and after merge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["before"] != r["after"]] or rows
    n = len(rows)
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * n + 2), 4.5))
    xs = range(n)
    ax.bar(xs, [r["before"] for r in rows], color="#c8d3e6", label="before merge")
    ax.bar(xs, [r["after"] for r in rows], color="#2a5caa", label="after merge")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r["layer"] for r in rows], rotation=90, fontsize=7)
    ax.set_ylabel("output channels")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
