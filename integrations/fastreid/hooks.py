"""FastReID hooks: per-iteration CDD figures, and merge + evaluate + export at the end of training.

``CDDLogHook`` puts ``CDDState.summary()`` (channels, merged FLOPs, ...) into FastReID's
EventStorage as ``cdd/<name>``, so the JSON and TensorBoard writers record them; the
loss terms are already there (FastReID logs every entry of the loss dict).

``CDDFinalizeHook`` runs after the last iteration: it merges the student
(``cdd_plugin.merge``), evaluates teacher, trained student and merged student with the
trainer's ``test`` (FastReID's ReidEvaluator), writes ``OUTPUT_DIR/model_merged.pth``
(``cdd_plugin.save_merged``) and ``OUTPUT_DIR/cdd_summary.json`` (schema
``cdd_summary/v1``, shared with the MMPretrain adapter and the demo).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional

import torch

import cdd_plugin
from cdd_plugin import report
from fastreid.engine.train_loop import HookBase
from fastreid.utils import comm

from .meta_arch import find_cdd

logger = logging.getLogger("fastreid.cdd")

SCHEMA = report.SCHEMA
MERGED_FILE = "model_merged.pth"
SUMMARY_FILE = "cdd_summary.json"


class CDDLogHook(HookBase):
    """Every ``period`` iterations (and at the last one), ``state.summary()`` into the EventStorage."""

    def __init__(self, state: "cdd_plugin.CDDState", period: int = 1):
        self.state = state
        self.period = max(int(period), 1)

    def after_step(self):
        it = self.trainer.iter
        if (it + 1) % self.period and it != self.trainer.max_iter - 1:
            return
        figures = {f"cdd/{k}": v for k, v in self.state.summary().items() if k not in ("iteration", "sparsity")}
        self.trainer.storage.put_scalars(smoothing_hint=False, **figures)

    def after_epoch(self):
        s = self.state.summary()
        logger.info("CDD after epoch %d: %d/%d channels unmasked, %d kept; merged FLOPs %.4g (%.1f%% of dense)",
                    self.trainer.epoch, s["channels_active"], s["channels_total"], s["channels_kept"],
                    s["flops_merged"], 100.0 * s["flops_ratio"])


def reid_metrics(results: Dict[str, Any]) -> Dict[str, float]:
    """FastReID ``test()`` results (one dataset, or several: the first is used) in the summary's names (0-100)."""
    if results and all(isinstance(v, dict) for v in results.values()):
        results = next(iter(results.values()))
    names = {"mAP": "mAP", "Rank-1": "rank1", "Rank-5": "rank5", "Rank-10": "rank10", "mINP": "mINP"}
    return {new: float(results[old]) for old, new in names.items() if old in (results or {})}


def _profile(model: torch.nn.Module, size, latency: bool, exclude_dgc: bool = False) -> Dict[str, Any]:
    h, w = (int(s) for s in size)
    x = torch.rand(1, 3, h, w, device=next(model.parameters()).device) * 255.0
    # Baseline normalises its input in place: every call gets its own copy
    # the DGCs exist only during training: with exclude_dgc, the dense student's own figures
    prof = cdd_plugin.profile(model, x.clone(), count_dgc=not exclude_dgc, forward_fn=lambda m, t: m(t.clone()))
    out = {"params": int(prof["params"]), "flops": int(prof["flops"]), "latency_ms": None}
    if latency:
        from cdd_plugin.profile import measure_latency

        out["latency_ms"] = float(measure_latency(model, x, forward_fn=lambda m, t: m(t.clone())))
    return out


class CDDFinalizeHook(HookBase):
    """Merge, evaluate and export after the last iteration (see the module docstring)."""

    def __init__(self, cfg, config_file: Optional[str] = None):
        self.cfg = cfg
        self.config_file = config_file
        self.result: Optional[dict] = None

    def after_train(self):
        trainer = self.trainer
        if trainer.iter < trainer.max_iter:  # training stopped early (an exception): nothing to merge
            return
        self.result = finalize(trainer, self.cfg, self.config_file)


def finalize(trainer, cfg, config_file: Optional[str] = None) -> Optional[dict]:
    """Merge the trained student, evaluate the three models, write the merged file and the summary."""
    cdd = find_cdd(trainer.model)
    if cdd is None:
        return None
    state = cdd.state
    out_dir = cfg.OUTPUT_DIR
    latency = bool(cfg.CDD.LATENCY)
    logger.info("CDD: merging the student (%d DGC sites)", len(state.sites))
    merged = cdd_plugin.merge(cdd.student)

    rows = []
    if cfg.CDD.EVAL_TEACHER:
        res = trainer.test(cfg, cdd.teacher)
        rows.append({"name": "teacher", "metrics": reid_metrics(res),
                     **_profile(cdd.teacher, cfg.INPUT.SIZE_TEST, latency)})
    res = getattr(trainer, "_last_eval_results", None)  # the final evaluation of EvalHook ({} off the main rank)
    if res is None:
        res = trainer.test(cfg, trainer.model)
    unmerged = {"name": "student_unmerged", "metrics": reid_metrics(res),
                **_profile(cdd.student, cfg.INPUT.SIZE_TEST, latency, exclude_dgc=True)}
    res = trainer.test(cfg, merged)
    merged_row = {"name": "student_merged", "metrics": reid_metrics(res),
                  **_profile(merged, cfg.INPUT.SIZE_TEST, latency)}
    rows += [unmerged, merged_row]
    if not comm.is_main_process():
        return None

    config = config_file or os.path.join(out_dir, "config.yaml")
    summary = report.build_summary("fastreid", config, trainer.iter, rows, state)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, MERGED_FILE)
    cdd_plugin.save_merged(merged, path, meta={
        "framework": "fastreid", "config": config, "iterations": int(trainer.iter),
        "num_classes": int(cdd.student.heads.weight.shape[0]),
        "input_size": [int(s) for s in cfg.INPUT.SIZE_TEST]})
    report.write_summary(summary, os.path.join(out_dir, SUMMARY_FILE))
    logger.info("CDD: wrote %s and %s\n%s", path, os.path.join(out_dir, SUMMARY_FILE), format_rows(rows))
    return summary


def format_rows(rows) -> str:
    lines = [f"{'model':<18} {'mAP':>7} {'rank1':>7} {'params':>12} {'FLOPs':>14} {'latency ms':>11}"]
    for r in rows:
        m = r["metrics"]
        lat = "-" if r["latency_ms"] is None else f"{r['latency_ms']:.1f}"
        lines.append(f"{r['name']:<18} {m.get('mAP', float('nan')):>7.2f} {m.get('rank1', float('nan')):>7.2f} "
                     f"{r['params']:>12,} {r['flops']:>14,} {lat:>11}")
    return "\n".join(lines)
