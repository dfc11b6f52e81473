"""CDDHook: CDD logging, schedule set-up, and the merge + evaluation + export after training.

During training it logs the core's ``state.summary()`` figures (``cdd_channels_active``,
``cdd_channels_kept``, ``cdd_mflops_merged`` = MFLOPs of the model merge would produce
now, ``cdd_flops_ratio`` = that over the dense student's) through mmengine's MessageHub,
so they reach the logger and every visualizer backend next to the loss terms (``loss_*``
and the logged figure ``cdd_sparsity``). After training it runs the core's end of a CDD
run, ``cdd_plugin.finalize`` (the same as the demo's and FastReID's), with the configured
evaluator: merge, evaluate teacher / trained student / merged student, count them, write
``model_merged.pth`` and ``cdd_summary.json``. Before a test/val run whose checkpoint is a merged file,
it rebuilds the narrow student so the runner can load it.

Exact resume: every checkpoint also carries the random number generator states of the
process at the moment it was written (``cdd_rng``: Python ``random``, NumPy's global
generator, torch's CPU and CUDA generators; plain ints and tensors, so the checkpoint
still loads with ``torch.load(weights_only=True)``). When training resumes from that
checkpoint they are restored before the first resumed iteration, so random data
transforms that run in the main process (``num_workers=0``) draw what the uninterrupted
run would have drawn; and a ``PKBatchSampler`` without its own seed follows the
checkpoint's seed (mmengine builds the dataloader, with a fresh seed when
``randomness.seed`` is None, before it loads the checkpoint).
"""
from __future__ import annotations

import os.path as osp
import random
from typing import Dict, Optional

import numpy as np
import torch
from mmengine.dist import barrier, get_world_size, is_main_process
from mmengine.hooks import Hook
from mmengine.runner import BaseLoop
from mmpretrain.registry import HOOKS

from cdd_plugin import report
from cdd_plugin.config import mask_start_iteration
from cdd_plugin.dgc import apply_input_dgc, apply_output_dgc

from .datasets import PKBatchSampler
from .model import CDDRetriever, _embed_forward, is_merged_file, unwrap
from .optim import is_cdd_wrapper

SUMMARY_SCHEMA = report.SCHEMA
RNG_KEY = "cdd_rng"  # the checkpoint entry with the generator states
_LOGGED = {  # state.summary() key -> logged scalar name
    "channels_active": "cdd_channels_active",
    "channels_kept": "cdd_channels_kept",
    "flops_ratio": "cdd_flops_ratio",
}


def rng_state() -> dict:
    """The states of Python's, NumPy's (global) and torch's generators, as types that
    ``torch.load(weights_only=True)`` accepts (ints, strings, tuples, tensors)."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {"python": random.getstate(),
             "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` returned (tensors may come back on another device)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([t.cpu() for t in cuda])


def _load_from(runner) -> Optional[str]:
    return getattr(runner, "_load_from", None) or runner.cfg.get("load_from")


def _is_training(runner) -> bool:
    """``Runner.train`` builds the train loop before ``before_run``; test/val runs do not."""
    return isinstance(runner._train_loop, BaseLoop)


@HOOKS.register_module()
class CDDHook(Hook):
    """Logs CDD figures while training; merges, evaluates and exports after training.

    ``cdd_summary.json`` rows: ``teacher``, ``student_unmerged`` (the trained student with
    its DGCs) and ``student_merged`` (the merged network, reloaded from
    ``model_merged.pth``). ``metrics`` come from the configured evaluator (percent);
    ``params``/``flops`` (MACs, torch-pruning's counter) and ``latency_ms`` are those of
    the embedding network (``image_encoder``, the part retrieval runs) at batch 1 and the
    training input size; for ``student_unmerged`` they are the student architecture's
    without the DGCs (the uncompressed baseline that the reductions compare with).

    Args:
        interval: log the CDD figures every ``interval`` training iterations.
        evaluate: evaluate teacher / unmerged / merged student after training with the
            validation loop's dataloader and evaluator (the test loop's when validation
            is off). Without either, the summary holds no metrics.
        latency: measure the CPU forward latency (batch 1, training input size) of
            each row; ``latency_ms`` is ``null`` otherwise.
        latency_runs: timed runs per model (median reported).
        merged_file, summary_file: names of the files written into the work dir.
        restore_rng: save the generator states in every checkpoint and restore them when
            training resumes from it (see the module docstring).
    """

    priority = "NORMAL"  # before LoggerHook, which reads the scalars

    def __init__(self, interval: int = 1, evaluate: bool = True, latency: bool = True, latency_runs: int = 10,
                 merged_file: str = "model_merged.pth", summary_file: str = "cdd_summary.json",
                 restore_rng: bool = True) -> None:
        if int(interval) < 1:
            raise ValueError(f"CDDHook interval={interval} must be >= 1")
        self.interval = int(interval)
        self.evaluate = bool(evaluate)
        self.latency = bool(latency)
        self.latency_runs = int(latency_runs)
        self.merged_file = merged_file
        self.summary_file = summary_file
        self.restore_rng = bool(restore_rng)
        self._loaded: Optional[tuple] = None  # (generator states, iteration) of the last loaded checkpoint

    @staticmethod
    def _model(runner) -> CDDRetriever:
        model = unwrap(runner.model)
        if not isinstance(model, CDDRetriever):
            raise TypeError(f"CDDHook needs model type='CDDRetriever', got {type(model).__name__}; remove CDDHook "
                            "from custom_hooks for other models")
        return model

    # -- loading a merged model for test / val -------------------------------------------
    def before_run(self, runner) -> None:
        model = self._model(runner)
        path = _load_from(runner)
        if model.merged or not is_merged_file(path):
            return
        if _is_training(runner):
            raise ValueError(f"{path} is a merged (deployed) CDD model; it can be tested, not trained or resumed. "
                             "Train from the config, or resume from a training checkpoint (epoch_N.pth / iter_N.pth)")
        model.load_merged(path)
        runner.logger.info(f"CDD: rebuilt the merged student from {path} (teacher and CDD state dropped)")

    # -- training ------------------------------------------------------------------------
    def before_train(self, runner) -> None:
        model = self._model(runner)
        if model.merged:
            raise ValueError("the model holds a merged student; CDD training needs the heavy student (do not set "
                             "load_from to model_merged.pth for training)")
        if not is_cdd_wrapper(runner.optim_wrapper):
            raise TypeError(
                f"CDD training needs optim_wrapper type='CDDOptimWrapper' (or 'CDDAmpOptimWrapper') with "
                f"constructor='CDDOptimWrapperConstructor'; the config built a {type(runner.optim_wrapper).__name__}, "
                "which would never apply the RGGR gradient step")
        state = model.cdd_state
        _check_dgcs_applied(model)
        if model.mask_start_epoch is not None:
            per_epoch = len(runner.train_dataloader) / max(1, getattr(runner.optim_wrapper, "_accumulative_counts", 1))
            state.cfg.mask_start = mask_start_iteration(model.mask_start_epoch, per_epoch)
            state.cfg.validate()
            model.mask_schedule_ready = True
        runner.logger.info(state.report())
        runner.logger.info(f"CDD: masks may change from optimizer step {state.cfg.mask_start} on "
                           f"(criterion={state.cfg.criterion}); schedule position {state.iteration}")
        self._continue_where_the_checkpoint_stopped(runner)

    # -- exact resume --------------------------------------------------------------------
    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if self.restore_rng:
            checkpoint[RNG_KEY] = rng_state()

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        meta = checkpoint.get("meta") if isinstance(checkpoint, dict) else None
        it = meta.get("iter") if isinstance(meta, dict) else None
        self._loaded = (checkpoint.get(RNG_KEY), it) if isinstance(checkpoint, dict) else None

    def _continue_where_the_checkpoint_stopped(self, runner) -> None:
        """After a resume (the train loop stands at the checkpoint's iteration): the sampler
        follows the checkpoint's seed and the generators get the checkpoint's states."""
        loaded, self._loaded = self._loaded, None
        if loaded is None or not loaded[1] or int(loaded[1]) != runner.iter:
            return  # nothing loaded, or weights loaded to start a new training (load_from)
        rng, _ = loaded
        batches = runner.train_dataloader.batch_sampler
        if isinstance(batches, PKBatchSampler) and not batches.explicit_seed and runner.seed is not None \
                and batches.seed != runner.seed:
            batches.reseed(runner.seed)
            runner.logger.info(f"CDD: PKBatchSampler re-seeded with the checkpoint's seed {runner.seed}")
        if not self.restore_rng:
            return
        if rng is None:
            runner.logger.warning("CDD: the checkpoint holds no generator states (cdd_rng); random transforms after "
                                  "the resume will differ from those of an uninterrupted run")
            return
        if get_world_size() > 1 and (runner.cfg.get("randomness") or {}).get("diff_rank_seed", False):
            runner.logger.info("CDD: generator states not restored: randomness.diff_rank_seed gives every rank its "
                               "own generators, and the checkpoint holds those of rank 0 only")
            return
        set_rng_state(rng)
        runner.logger.info("CDD: generator states (python, numpy, torch) restored from the checkpoint")

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if not self.every_n_train_iters(runner, self.interval):
            return
        summary = self._model(runner).cdd_state.summary()
        for key, name in _LOGGED.items():
            runner.message_hub.update_scalar(f"train/{name}", float(summary[key]))
        runner.message_hub.update_scalar("train/cdd_mflops_merged", summary["flops_merged"] / 1e6)

    def after_train(self, runner) -> None:
        """The core's end of a CDD run (``cdd_plugin.finalize``) with the configured evaluator."""
        from cdd_plugin.finalize import finalize

        model = self._model(runner)
        work_dir = runner.work_dir
        cfg_path = osp.abspath(runner.cfg.filename) if runner.cfg.filename else None
        main = is_main_process()
        done = finalize(
            model.student_net, model.cdd_state, lambda net: self._evaluate(runner, model, net),
            model.example_inputs(1), framework="mmpretrain", config=cfg_path, iterations=int(runner.iter),
            teacher=model.teacher, forward_fn=_embed_forward, latency=self.latency, latency_runs=self.latency_runs,
            merged_path=osp.join(work_dir, self.merged_file), summary_path=osp.join(work_dir, self.summary_file),
            merged_meta={"framework": "mmpretrain", "config": cfg_path, "iterations": int(runner.iter),
                         "input_size": list(model.input_size)},
            write=main)
        barrier()
        if not main:
            return
        runner.logger.info(_table(done.rows, done.summary))
        runner.visualizer.add_scalars({
            "cdd/flops_reduction": done.summary["flops_reduction"],
            "cdd/params_reduction": done.summary["params_reduction"]}, step=int(runner.iter))
        runner.logger.info(f"CDD: merged student written to {osp.join(work_dir, self.merged_file)}, summary to "
                           f"{osp.join(work_dir, self.summary_file)}")

    # -- evaluation ----------------------------------------------------------------------
    def _evaluate(self, runner, model: CDDRetriever, net) -> Dict[str, float]:
        """The configured evaluator over the validation (else test) dataloader, with
        predictions from ``net``."""
        if not self.evaluate:
            return {}
        loop = runner.val_loop
        if loop is None and runner._test_loop is not None:
            loop = runner.test_loop
        if loop is None:
            runner.logger.warning("CDD: no validation or test loop configured; the summary has no metrics")
            return {}
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for batch in loop.dataloader:
                    data = model.data_preprocessor(batch, False)
                    outputs = model.predict_with(net, data["inputs"], data["data_samples"])
                    loop.evaluator.process(data_samples=outputs, data_batch=batch)
            result = loop.evaluator.evaluate(len(loop.dataloader.dataset))
        finally:
            model.train(was_training)
        # the shared summary names metrics without the evaluator prefix ('reid/mAP' -> 'mAP')
        return {k.split("/", 1)[-1]: float(v) for k, v in result.items() if isinstance(v, (int, float))}


def _check_dgcs_applied(model: CDDRetriever) -> None:
    """Every DGC must still be hooked on its host module: a framework step that replaces
    modules after surgery (mmengine's ``sync_bn`` conversion builds new BatchNorm modules
    and drops their forward hooks) would silently train without the compactors."""
    for site in model.cdd_state.sites:
        host = model.student_net.get_submodule(site.host)
        hooks = host._forward_pre_hooks if site.kind == "in" else host._forward_hooks
        wanted = apply_input_dgc if site.kind == "in" else apply_output_dgc
        if not any(fn is wanted for fn in hooks.values()):
            raise RuntimeError(
                f"the DGC {site.name} is no longer applied: its host {site.host} ({type(host).__name__}) was replaced "
                "after the DGCs were inserted (e.g. by sync_bn, which converts BatchNorm layers into new "
                "SyncBatchNorm modules without their forward hooks). Fix: remove sync_bn from the config for CDD "
                "training")


def _table(rows, summary) -> str:
    keys = sorted({k for r in rows for k in r["metrics"]})
    head = f"{'model':<17} {'params':>12} {'MFLOPs':>10} {'latency ms':>11} " + " ".join(f"{k:>18}" for k in keys)
    lines = ["CDD results:", head]
    for r in rows:
        lat = "-" if r["latency_ms"] is None else f"{r['latency_ms']:.2f}"
        vals = " ".join(f"{r['metrics'].get(k, float('nan')):>18.2f}" for k in keys)
        lines.append(f"{r['name']:<17} {r['params']:>12,d} {r['flops'] / 1e6:>10.1f} {lat:>11} {vals}")
    lines.append(f"FLOPs reduction {summary['flops_reduction']:.2%}, params reduction "
                 f"{summary['params_reduction']:.2%} (merged vs unmerged student)")
    return "\n".join(lines)


__all__ = ["CDDHook", "RNG_KEY", "SUMMARY_SCHEMA", "rng_state", "set_rng_state"]
