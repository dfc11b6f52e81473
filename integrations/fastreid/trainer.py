"""``CDDTrainer``: FastReID's ``DefaultTrainer`` with CDD wired in (and FastReID made to run here).

For any FastReID config (teacher training included) it
* applies the compatibility patches (``compat.apply``) and checks the device;
* builds the optimizer with ``contiguous=False`` (FastReID's default contiguous parameter
  buffer silently stops updating weights on torch >= 2.0);
* reads datasets from ``DATASETS.ROOT`` and supports the ``*Subset`` datasets; evaluation uses
  ``DATALOADER.NUM_WORKERS`` loader processes (FastReID always starts 4);
* on ``--resume``, continues the data stream where the checkpoint left it (FastReID
  restarts its sampler, so a resumed run would repeat the first batches);
* writes checkpoints atomically (``checkpoint.AtomicCheckpointer``: an interrupted save
  keeps the last good checkpoint and ``last_checkpoint`` pointing at it).

When ``MODEL.META_ARCHITECTURE`` is ``CDDDistiller`` it also
* builds the model (DGC surgery happens there, before the optimizer exists);
* builds FastReID's optimizer over the student (so ``HEADS_LR_FACTOR`` and
  ``FREEZE_LAYERS`` see the student's own parameter names) and wraps it in
  ``cdd_plugin.RGGROptimizer`` (which applies ``CDD.DECAY_COMPACTORS``): the CDD state (masks,
  queues, schedule) then travels in ``optimizer.state_dict()["cdd"]``, so FastReID's
  checkpointer saves it and ``--resume`` restores it;
* converts ``CDD.MASK_START`` from epochs to iterations;
* adds ``CDDLogHook`` and ``CDDFinalizeHook`` (merge, evaluation, export at the end).
"""
from __future__ import annotations

import itertools
import logging
import os
from typing import Optional

import torch

from . import compat

compat.apply()

import cdd_plugin  # noqa: E402
from cdd_plugin import ConfigError  # noqa: E402
from fastreid.data import build_reid_test_loader, build_reid_train_loader  # noqa: E402
from fastreid.data.build import _test_loader_from_config  # noqa: E402
from fastreid.engine import DefaultTrainer, hooks  # noqa: E402
from fastreid.modeling.meta_arch import build_model  # noqa: E402
from fastreid.solver import build_optimizer  # noqa: E402
from fastreid.utils import comm  # noqa: E402

from .checkpoint import make_atomic  # noqa: E402
from .config import check_device  # noqa: E402
from .datasets import (dataset_root, is_missing_dataset, loader_kwargs, missing_dataset_error,  # noqa: E402
                       register_subsets, using_root)
from .hooks import CDDFinalizeHook, CDDLogHook  # noqa: E402
from .meta_arch import find_cdd  # noqa: E402

logger = logging.getLogger("fastreid.cdd")
register_subsets()


class _SkipFirst(torch.utils.data.Sampler):
    """``sampler`` without its first ``count`` indices (on the first pass only)."""

    def __init__(self, sampler, count: int) -> None:
        self.sampler, self.count = sampler, int(count)

    def __iter__(self):
        count, self.count = self.count, 0
        return itertools.islice(iter(self.sampler), count, None)


class CDDTrainer(DefaultTrainer):
    """FastReID ``DefaultTrainer`` with CDD (see the module docstring)."""

    #: the config file path recorded in ``cdd_summary.json`` (``train_net`` sets it)
    config_file: Optional[str] = None

    def __init__(self, cfg):
        check_device(cfg)
        if comm.is_main_process() and cfg.OUTPUT_DIR:
            os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)  # DefaultTrainer writes config.yaml there before anything else
        super().__init__(cfg)
        cdd = find_cdd(self.model)
        if cdd is not None:
            cdd.resolve_schedule(self.iters_per_epoch)

    def resume_or_load(self, resume=True):
        """FastReID's resume/load; for CDD, ``MODEL.WEIGHTS`` must be a CDD checkpoint (see ``CDD.STUDENT_WEIGHTS``)."""
        weights = str(self.cfg.MODEL.WEIGHTS)
        if find_cdd(self.model) is not None and weights and not (resume and self.checkpointer.has_checkpoint()):
            sd = self.checkpointer._load_file(weights) if os.path.isfile(weights) else {}
            keys = list((sd.get("model", sd) if isinstance(sd, dict) else {}).keys())
            if keys and not any(k.startswith(("distiller.", "module.distiller.")) for k in keys):
                raise ConfigError(f"MODEL.WEIGHTS {weights!r} is not a CDD checkpoint, so none of its weights would "
                                  "reach the CDD model. Fix: to start the student from it set CDD.STUDENT_WEIGHTS "
                                  "to that file and MODEL.WEIGHTS to '' (the teacher is CDD.TEACHER.WEIGHTS)")
        out = super().resume_or_load(resume=resume)
        if resume and self.checkpointer.has_checkpoint() and self.start_epoch > 0:
            self._continue_data_stream(self.start_epoch * self.iters_per_epoch)
        return out

    def _continue_data_stream(self, iterations: int) -> None:
        """Skip the batches the interrupted run already trained on.

        FastReID's training samplers are infinite, seeded streams that restart on every
        resume, so a resumed run would train on the first batches of the stream again. The
        stream is replayed at the index level (no image is loaded) up to the checkpoint, so
        the resumed run sees the batches the uninterrupted one would have seen (with
        augmentations that draw no random numbers this makes the resumed weights equal to
        the uninterrupted run's; random augmentations run in a prefetching thread whose
        generator state cannot be captured at a batch boundary).
        """
        loader = self._trainer.data_loader
        batches = getattr(loader, "batch_sampler", None)
        if not isinstance(batches, torch.utils.data.BatchSampler):
            logger.warning("resume: the train loader has no BatchSampler, so its data stream restarts from the start")
            return
        if hasattr(loader, "_shutdown_background_thread") and getattr(loader, "iter", None) is not None:
            loader._shutdown_background_thread()  # the prefetching thread of the stream being replaced
        batches.sampler = _SkipFirst(batches.sampler, iterations * batches.batch_size)
        self._trainer._data_loader_iter = iter(loader)
        logger.info("resume: data stream continued after %d iterations (%d sampler indices skipped)", iterations,
                    iterations * batches.batch_size)

    # -- builders -----------------------------------------------------------------------------
    @classmethod
    def build_model(cls, cfg):
        model = build_model(cfg)
        cdd = find_cdd(model)
        if cdd is not None:
            logger.info("CDD student: %d DGC sites, %d prunable channels; teacher: %s",
                        len(cdd.state.sites), sum(s.channels for s in cdd.state.sites),
                        type(cdd.teacher.backbone).__name__)
        return model

    @classmethod
    def build_optimizer(cls, cfg, model):
        cdd = find_cdd(model)
        target = cdd.student if cdd is not None else model
        optimizer, params = build_optimizer(cfg, target, contiguous=False)
        if cdd is None:
            return optimizer, params
        # RGGROptimizer applies CDD.DECAY_COMPACTORS (the authors': the compactors decay like every weight)
        return cdd_plugin.RGGROptimizer(optimizer, cdd.state), params

    @classmethod
    def build_train_loader(cls, cfg):
        names = list(cfg.DATASETS.NAMES)
        root = dataset_root(cfg)
        try:
            with using_root(root):
                return build_reid_train_loader(cfg, combineall=cfg.DATASETS.COMBINEALL, **loader_kwargs(cfg, names))
        except (RuntimeError, AssertionError, FileNotFoundError) as exc:
            if is_missing_dataset(exc):
                raise missing_dataset_error(names, root, exc) from exc
            raise

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        root = dataset_root(cfg)
        try:
            with using_root(root):
                # FastReID's test loader always starts 4 worker processes per rank; DATALOADER.NUM_WORKERS
                # (the configured value) applies to evaluation too, so a CPU run does not start extra processes
                args = _test_loader_from_config(cfg, dataset_name=dataset_name, **loader_kwargs(cfg, [dataset_name]))
                return build_reid_test_loader(**args, num_workers=int(cfg.DATALOADER.NUM_WORKERS))
        except (RuntimeError, AssertionError, FileNotFoundError) as exc:
            if is_missing_dataset(exc):
                raise missing_dataset_error([dataset_name], root, exc) from exc
            raise

    def build_hooks(self):
        make_atomic(self.checkpointer)  # before FastReID's PeriodicCheckpointer takes it
        ret = super().build_hooks()
        cdd = find_cdd(self.model)
        if cdd is None:
            return ret
        for h in ret:  # FastReID's layer hooks address the Baseline's children: give them the student
            if isinstance(h, hooks.LayerFreeze):
                h.model = cdd.student
            if isinstance(h, hooks.PreciseBN) and not h._disabled:
                h._model = cdd.student
        at = next((i + 1 for i, h in enumerate(ret) if isinstance(h, hooks.EvalHook)), len(ret))
        ret[at:at] = [CDDLogHook(cdd.state, self.cfg.CDD.LOG_PERIOD), CDDFinalizeHook(self.cfg, self.config_file)]
        return ret
