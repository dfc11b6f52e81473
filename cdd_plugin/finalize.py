"""The end of a CDD run, once for every front end (the demo, FastReID, MMPretrain):
merge -> evaluate three networks -> count them -> summary (-> merged file and summary file).

A front end passes only what differs between frameworks: how to evaluate a network
(``evaluate(net) -> {metric: value}``), the input to count at and the forward the retrieval
embedding takes (``forward_fn``, the one surgery traced). Everything else has one meaning:

* ``student_merged``: ``merge(student)``, the deployed network.
* ``student_unmerged``: the trained heavy student; its metrics are the trained network's, its
  costs those of ``merge(student, threshold=0)``, the same function with BatchNorms and
  compactors folded and no channel removed. The reductions compare the merged student with
  THIS network: the uncompressed student in the same deployable form.
* ``teacher``: its costs in the same folded form when surgery can fold it, else as it is
  (the row says which in ``"folded"``).

Parameters count the modules the retrieval forward uses (a classifier that only training
uses is not part of the deployed network); FLOPs are torch-pruning's count at batch 1.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from .export import save_merged
from .merge import merge
from .profile import measure_latency, profile
from .graph import SurgeryError, find_dgcs, run_with_hooks
from .surgery import insert_dgc

logger = logging.getLogger("cdd_plugin")

Evaluate = Callable[[nn.Module], Dict[str, float]]


@dataclass
class Finalized:
    summary: dict
    merged: nn.Module
    rows: List[dict]


def used_parameters(model: nn.Module, example_inputs: Any, forward_fn: Optional[Callable] = None) -> int:
    """Parameters of the modules that the forward (``forward_fn``) actually calls."""
    called: Dict[int, nn.Module] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o: called.__setitem__(id(mod), mod)) for m in model.modules()]
    run_with_hooks(model, example_inputs, forward_fn, hooks)
    seen, total = set(), 0
    for m in called.values():
        for p in m.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def costs(model: nn.Module, example_inputs: Any, *, forward_fn: Optional[Callable] = None, latency: bool = True,
          latency_runs: int = 10) -> Dict[str, Any]:
    """``params`` (used by the forward), ``flops`` (torch-pruning, per image) and ``latency_ms`` (batch
    of ``example_inputs``, median on the CPU, or None)."""
    prof = profile(model, example_inputs, forward_fn=forward_fn)
    out = {"params": used_parameters(model, example_inputs, forward_fn), "flops": int(prof["flops"]),
           "latency_ms": None}
    if latency:
        cpu = copy.deepcopy(model).cpu()
        x = _to_cpu(example_inputs)
        out["latency_ms"] = float(measure_latency(cpu, x, warmup=2, runs=latency_runs, forward_fn=forward_fn))
    return out


def _to_cpu(x):
    if isinstance(x, torch.Tensor):
        return x.cpu()
    if isinstance(x, (tuple, list)):
        return type(x)(_to_cpu(v) for v in x)
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    return x


def folded(model: nn.Module, example_inputs: Any, *, forward_fn: Optional[Callable] = None,
           customized_pruners: Optional[dict] = None) -> Optional[nn.Module]:
    """``model`` (without compactors) with its BatchNorms folded and nothing removed: identity
    compactors inserted into a copy at every site and merged with threshold 0 (same function).
    None when surgery cannot fold it."""
    work = copy.deepcopy(model)
    for p in work.parameters():  # torch-pruning traces through autograd: a frozen copy would show no graph
        p.requires_grad_(True)
    try:
        from .config import CDDConfig

        insert_dgc(work, example_inputs, CDDConfig(sites="all"), forward_fn=forward_fn,
                   customized_pruners=customized_pruners)
    except SurgeryError as exc:
        logger.info("the teacher is counted as it is (its BatchNorms cannot be folded here: %s)",
                    str(exc).splitlines()[0])
        return None
    return merge(work, threshold=0.0)


def finalize(student: nn.Module, state, evaluate: Evaluate, example_inputs: Any, *, framework: str, config: Any,
             iterations: int, teacher: Optional[nn.Module] = None, forward_fn: Optional[Callable] = None,
             customized_pruners: Optional[dict] = None, latency: bool = True, latency_runs: int = 10,
             timer: Optional[Callable[[List[nn.Module]], List[dict]]] = None, merged_path: Optional[str] = None, merged_meta: Optional[dict] = None, summary_path: Optional[str] = None,
             write: bool = True, extra: Optional[dict] = None) -> Finalized:
    """Merge ``student``, evaluate and count teacher / trained student / merged student, build the
    ``cdd_summary/v1`` summary and (``write``: on the main process) save the merged file and the
    summary atomically. ``evaluate`` runs on every process (distributed evaluators gather).
    ``timer(networks) -> [{"latency_ms": ...}, ...]`` replaces the per-network latency (e.g. the
    demo times the three networks in interleaved rounds at several batch sizes)."""
    from . import report

    if not find_dgcs(student):
        raise ValueError("finalize needs the trained student with its DGCs (call it before merging)")
    x1 = example_inputs
    merged = merge(student)
    baseline = merge(student, threshold=0.0)
    nets = []
    if teacher is not None:
        t_fold = folded(teacher, x1, forward_fn=forward_fn, customized_pruners=customized_pruners)
        nets.append(("teacher", teacher, t_fold if t_fold is not None else teacher, t_fold is not None))
    nets += [("student_unmerged", student, baseline, True), ("student_merged", merged, merged, True)]
    rows = []
    for name, evaluated, counted, was_folded in nets:
        metrics = {k: float(v) for k, v in (evaluate(evaluated) or {}).items()}
        row = {"name": name, "metrics": metrics, **costs(counted, x1, forward_fn=forward_fn,
                                                         latency=latency and timer is None, latency_runs=latency_runs)}
        if name == "teacher":
            row["folded"] = bool(was_folded)
        rows.append(row)
    if latency and timer is not None:
        for row, timed in zip(rows, timer([counted for _, _, counted, _ in nets])):
            row.update(timed)
    summary = report.build_summary(framework, config, iterations, rows, state, **(extra or {}))
    if write:
        if merged_path:
            save_merged(merged, merged_path, meta=merged_meta)
        if summary_path:
            report.write_summary(summary, summary_path)
    return Finalized(summary=summary, merged=merged, rows=rows)


def format_rows(rows: List[dict]) -> str:
    keys = [k for k in ("mAP", "rank1", "R@1") if any(k in r["metrics"] for r in rows)] or \
        sorted({k for r in rows for k in r["metrics"]})[:3]
    head = f"{'model':<18} " + " ".join(f"{k:>8}" for k in keys) + f" {'params':>12} {'FLOPs':>14} {'ms':>8}"
    lines = [head]
    for r in rows:
        lat = "-" if r.get("latency_ms") is None else f"{r['latency_ms']:.1f}"
        vals = " ".join(f"{r['metrics'].get(k, float('nan')):>8.2f}" for k in keys)
        lines.append(f"{r['name']:<18} {vals} {r['params']:>12,} {r['flops']:>14,} {lat:>8}")
    return "\n".join(lines)


__all__ = ["Finalized", "costs", "finalize", "folded", "format_rows", "used_parameters"]
