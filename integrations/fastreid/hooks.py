"""FastReID hooks: per-iteration CDD figures, and merge + evaluate + export at the end of training.

``CDDLogHook`` puts ``CDDState.summary()`` (channels, merged FLOPs, ...) into FastReID's
EventStorage as ``cdd/<name>``, so the JSON and TensorBoard writers record them; the
loss terms are already there (FastReID logs every entry of the loss dict).

``CDDFinalizeHook`` runs after the last iteration: the core's ``cdd_plugin.finalize`` (the
same end of training as the demo's and the MMPretrain adapter's) with the trainer's ``test``
(FastReID's ReidEvaluator) as the evaluator: merge, evaluate teacher / trained student /
merged student, count them, write ``OUTPUT_DIR/model_merged.pth`` and
``OUTPUT_DIR/cdd_summary.json`` (schema ``cdd_summary/v1``).
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

from . import ibn
from .meta_arch import analysis_forward, find_cdd

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
    """The core's end of a CDD run (``cdd_plugin.finalize``) with FastReID's evaluator: merge the trained
    student, evaluate and count the three models, write the merged file and the summary (main process)."""
    from cdd_plugin.finalize import finalize as core_finalize, format_rows

    cdd = find_cdd(trainer.model)
    if cdd is None:
        return None
    state = cdd.state
    out_dir = cfg.OUTPUT_DIR
    logger.info("CDD: merging the student (%d DGC sites)", len(state.sites))
    last = getattr(trainer, "_last_eval_results", None)  # EvalHook's final evaluation of the student

    def evaluate(net):
        if net is cdd.student and last is not None:
            return reid_metrics(last)
        return reid_metrics(trainer.test(cfg, net))

    h, w = (int(s) for s in cfg.INPUT.SIZE_TEST)
    x = (torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0)) * 255.0).to(cdd.device)
    config = config_file or os.path.join(out_dir, "config.yaml")
    main = comm.is_main_process()
    if main:
        os.makedirs(out_dir, exist_ok=True)
    done = core_finalize(
        cdd.student, state, evaluate, x, framework="fastreid", config=config, iterations=int(trainer.iter),
        teacher=cdd.teacher if cfg.CDD.EVAL_TEACHER else None, forward_fn=analysis_forward,
        customized_pruners=ibn.customized_pruners(), latency=bool(cfg.CDD.LATENCY),
        merged_path=os.path.join(out_dir, MERGED_FILE), summary_path=os.path.join(out_dir, SUMMARY_FILE),
        merged_meta={"framework": "fastreid", "config": config, "iterations": int(trainer.iter),
                     "num_classes": int(cdd.student.heads.weight.shape[0]),
                     "input_size": [int(s) for s in cfg.INPUT.SIZE_TEST]},
        write=main)
    if not main:
        return None
    logger.info("CDD: wrote %s and %s\n%s", os.path.join(out_dir, MERGED_FILE), os.path.join(out_dir, SUMMARY_FILE),
                format_rows(done.rows))
    return done.summary
