"""``CDDDistiller``: the FastReID meta-architecture that wraps ``cdd_plugin.CDDDistiller``.

``MODEL.META_ARCHITECTURE: CDDDistiller`` builds

* the heavy student: a FastReID ``Baseline`` from the same config (``MODEL.BACKBONE``,
  ``MODEL.HEADS``, ...), optionally initialised from ``CDD.STUDENT_WEIGHTS``, with DGCs
  inserted by ``cdd_plugin.insert_dgc`` at ``INPUT.SIZE_TRAIN`` (batch 2);
* the teacher: the FastReID model of ``CDD.TEACHER.CONFIG`` restored from
  ``CDD.TEACHER.WEIGHTS``; frozen, in eval mode, a registered submodule (moves with the
  model, is saved in its checkpoints), never trained.

In training ``forward`` returns the core distiller's loss dict (FastReID sums every
value, so the ``cdd_sparsity`` figure goes to the EventStorage as ``cdd/sparsity``
instead); in evaluation it returns the student's embedding, exactly as ``Baseline``
does, so FastReID's ``ReidEvaluator`` works unchanged.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

import cdd_plugin
from cdd_plugin.config import mask_start_iteration
from cdd_plugin import ConfigError
from fastreid.modeling.meta_arch import META_ARCH_REGISTRY

from . import ibn
from .config import cdd_configs, check_device, load_config, teacher_paths

logger = logging.getLogger("fastreid.cdd")

STUDENT_META_ARCH = "Baseline"


# -- forward adapters: fn(model, images, labels) -> (logits or None, embedding) -----------------
def _normalize(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``Baseline.preprocess_image`` without its in-place edit (teacher and student read the same batch)."""
    return (images - model.pixel_mean) / model.pixel_std


def analysis_forward(model: nn.Module, images: torch.Tensor):
    """The eval-mode computation of a ``Baseline`` on raw images, for surgery and merge tracing."""
    with ibn.opaque_ibn():
        return model.heads(model.backbone(_normalize(model, images)))


def student_forward(model: nn.Module, images: torch.Tensor, labels: Optional[torch.Tensor]):
    feats = model.backbone(_normalize(model, images))
    if not model.training or labels is None:
        return None, model.heads(feats)  # the embedding Baseline returns in evaluation
    out = model.heads(feats, labels)
    return out["pred_class_logits"], out["features"]


def teacher_forward(model: nn.Module, images: torch.Tensor, labels: Optional[torch.Tensor]):
    """Teacher logits and embedding with every layer in eval mode.

    ``EmbeddingHead`` only computes logits when ``self.training`` is set; that flag is
    switched on for the head module alone (its BatchNorm stays in eval mode) for the call.
    """
    feats = model.backbone(_normalize(model, images))
    heads = model.heads
    if labels is None:
        return None, heads(feats)
    was = heads.training
    heads.training = True
    try:
        out = heads(feats, labels)
    finally:
        heads.training = was
    return out["pred_class_logits"], out["features"]


def teacher_embedding_forward(model: nn.Module, images: torch.Tensor, labels: Optional[torch.Tensor]):
    """Teacher without logits (``CDD.LOSS.KD_WEIGHT 0``): its feature taps still feed RGGR and FitNet."""
    return None, model.heads(model.backbone(_normalize(model, images)))


# -- building ----------------------------------------------------------------------------------------
def _student_cfg(cfg):
    scfg = cfg.clone()
    scfg.defrost()
    scfg.MODEL.META_ARCHITECTURE = STUDENT_META_ARCH
    return scfg


def build_dense_student(cfg, num_classes: Optional[int] = None) -> nn.Module:
    """The student architecture without DGCs (also the model a merged file is loaded into)."""
    scfg = _student_cfg(cfg)
    if num_classes is not None:
        scfg.MODEL.HEADS.NUM_CLASSES = int(num_classes)
    student = META_ARCH_REGISTRY.get(STUDENT_META_ARCH)(scfg)
    ibn.make_prunable(student)
    return student


def _state_dict_of(path: str, what: str) -> dict:
    from fastreid.utils.checkpoint import Checkpointer

    ckpt = Checkpointer(nn.Identity())._load_file(path)
    if isinstance(ckpt, dict) and ckpt.get("format") == "cdd_plugin.merged":
        raise ConfigError(f"{what} {path!r} is a merged CDD model (model_merged.pth); use a FastReID checkpoint "
                          "of a plain model (e.g. the teacher run's model_final.pth)")
    sd = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict):
        raise ConfigError(f"{what} {path!r} is not a FastReID checkpoint (no 'model' state dict)")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    if any(k.startswith("distiller.") for k in sd):
        raise ConfigError(f"{what} {path!r} is a CDD training checkpoint; use the checkpoint of a plain FastReID "
                          "model (MODEL.META_ARCHITECTURE Baseline)")
    return sd


def _load_strict(model: nn.Module, sd: dict, what: str, path: str, fix: str) -> None:
    own = model.state_dict()
    shapes = [f"{k}: {tuple(v.shape)} in the file, {tuple(own[k].shape)} in the model" for k, v in sd.items()
              if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if shapes or missing or unexpected:
        detail = "; ".join(x for x in [
            f"shape mismatch: {', '.join(shapes[:3])}" if shapes else "",
            f"missing: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}" if missing else "",
            f"unexpected: {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}" if unexpected else "",
        ] if x)
        raise ConfigError(f"{what} {path!r} does not fit the model built from the config ({detail}). Fix: {fix}")
    model.load_state_dict(sd, strict=True)


def build_teacher(cfg) -> nn.Module:
    """The frozen FastReID teacher of ``CDD.TEACHER.CONFIG`` with ``CDD.TEACHER.WEIGHTS`` loaded."""
    conf, weights = teacher_paths(cfg)
    tcfg = load_config(conf)
    if tcfg.MODEL.META_ARCHITECTURE == "CDDDistiller":
        raise ConfigError(f"CDD.TEACHER.CONFIG {conf!r} is itself a CDD config; point it at the plain FastReID "
                          "config the teacher was trained with (MODEL.META_ARCHITECTURE Baseline)")
    sd = _state_dict_of(weights, "CDD.TEACHER.WEIGHTS")
    tcfg.MODEL.DEVICE = cfg.MODEL.DEVICE
    tcfg.MODEL.BACKBONE.PRETRAIN = False  # its trained weights are loaded below
    for node in (tcfg.MODEL.BACKBONE, tcfg.MODEL.HEADS):
        if node.NORM == "syncBN":  # never trained: no synchronisation needed
            node.NORM = "BN"
    if tcfg.MODEL.HEADS.NUM_CLASSES == 0 and "heads.weight" in sd:
        # the teacher yaml auto-scales its classes to its training set; the checkpoint knows how many
        tcfg.MODEL.HEADS.NUM_CLASSES = int(sd["heads.weight"].shape[0])
    teacher = META_ARCH_REGISTRY.get(tcfg.MODEL.META_ARCHITECTURE)(tcfg)
    _load_strict(teacher, sd, "CDD.TEACHER.WEIGHTS", weights,
                 "set CDD.TEACHER.CONFIG to the config the teacher was trained with (its OUTPUT_DIR/config.yaml)")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def example_inputs(cfg, batch: int = 2) -> torch.Tensor:
    """Surgery input: ``batch`` images of ``INPUT.SIZE_TRAIN`` in FastReID's 0-255 pixel range."""
    h, w = (int(s) for s in cfg.INPUT.SIZE_TRAIN)
    g = torch.Generator().manual_seed(0)
    return torch.rand(batch, 3, h, w, generator=g) * 255.0


@META_ARCH_REGISTRY.register()
class CDDDistiller(nn.Module):
    """FastReID meta-architecture: teacher + heavy student with DGCs (see the module docstring)."""

    def __init__(self, cfg):
        super().__init__()
        if "CDD" not in cfg:
            raise ConfigError("MODEL.META_ARCHITECTURE is CDDDistiller but the config has no CDD node; build it with "
                              "cdd_plugin.integrations.fastreid.load_config(yaml) or call add_cdd_config(cfg) "
                              "before cfg.merge_from_file(yaml)")
        check_device(cfg)
        cdd_cfg, loss_cfg = cdd_configs(cfg)
        self._mask_start = int(cfg.CDD.MASK_START)
        self.schedule_resolved = cfg.CDD.MASK_START_UNIT == "iter"
        student = build_dense_student(cfg)
        if cfg.CDD.STUDENT_WEIGHTS:
            path = str(cfg.CDD.STUDENT_WEIGHTS)
            _load_strict(student, _state_dict_of(path, "CDD.STUDENT_WEIGHTS"), "CDD.STUDENT_WEIGHTS", path,
                         "use a checkpoint of the same architecture and number of classes as the student")
        teacher = build_teacher(cfg)
        student_classes = int(cfg.MODEL.HEADS.NUM_CLASSES)
        teacher_classes = int(teacher.heads.weight.shape[0])
        if loss_cfg.kd_weight > 0 and student_classes > 0 and teacher_classes != student_classes:
            raise ConfigError(
                f"the teacher has {teacher_classes} classes (CDD.TEACHER.WEIGHTS) but the student {student_classes} "
                "(the identities of DATASETS.NAMES); the logit distillation term (CDD.LOSS.KD_WEIGHT > 0) compares "
                "them class by class. Fix: train the teacher on the same training set (same DATASETS.NAMES and "
                "DATASETS.SUBSET_IDS), or set CDD.LOSS.KD_WEIGHT 0")
        if cfg.MODEL.HEADS.CLS_LAYER != "Linear":
            logger.warning("CDD uses the margin-free logits (pred_class_logits) of %s for the identity and KD "
                           "losses; FastReID's own loss would add the margin", cfg.MODEL.HEADS.CLS_LAYER)
        state = cdd_plugin.insert_dgc(student, example_inputs(cfg), cdd_cfg,
                                      customized_pruners=ibn.customized_pruners(), forward_fn=analysis_forward)
        logger.info("%s", state.report())
        self.distiller = cdd_plugin.CDDDistiller(
            student, teacher, state, loss_cfg, student_forward=student_forward,
            teacher_forward=teacher_forward if loss_cfg.kd_weight > 0 else teacher_embedding_forward)
        self.register_buffer("pixel_mean", student.pixel_mean.clone(), False)

    # -- accessors ----------------------------------------------------------------------------
    @property
    def student(self) -> nn.Module:
        return self.distiller.student

    @property
    def teacher(self) -> nn.Module:
        return self.distiller.teacher

    @property
    def state(self) -> "cdd_plugin.CDDState":
        return self.distiller.cdd

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def resolve_schedule(self, iters_per_epoch: int) -> None:
        """Convert ``CDD.MASK_START`` from epochs to iterations (``CDDTrainer`` calls this)."""
        if not self.schedule_resolved:
            self.state.cfg.mask_start = mask_start_iteration(self._mask_start, max(int(iters_per_epoch), 1))
            self.state.cfg.validate()
            self.schedule_resolved = True
            logger.info("CDD masks start at iteration %d (epoch %d x %d iterations per epoch)",
                        self.state.cfg.mask_start, self._mask_start, iters_per_epoch)

    # -- forward ------------------------------------------------------------------------------
    @staticmethod
    def _images(batched_inputs) -> torch.Tensor:
        if isinstance(batched_inputs, dict):
            return batched_inputs["images"]
        if isinstance(batched_inputs, torch.Tensor):
            return batched_inputs
        raise TypeError(f"batched_inputs must be a dict or a torch.Tensor, got {type(batched_inputs).__name__}")

    def forward(self, batched_inputs):
        images = self._images(batched_inputs).to(self.device)
        if not self.training:
            return self.distiller(images)
        if not self.schedule_resolved:
            raise RuntimeError("CDD.MASK_START is in epochs but the iterations per epoch are unknown; call "
                               "model.resolve_schedule(iters_per_epoch) before training (CDDTrainer does), or set "
                               "CDD.MASK_START_UNIT iter")
        if not isinstance(batched_inputs, dict) or "targets" not in batched_inputs:
            raise ValueError("CDD training needs identity labels: pass {'images': ..., 'targets': ...}")
        targets = batched_inputs["targets"].to(self.device)
        losses = self.distiller(images, targets)
        sparsity = losses.pop("cdd_sparsity", None)
        if sparsity is not None:
            _put_scalar("cdd/sparsity", float(sparsity))
        return losses


def _put_scalar(name: str, value: float) -> None:
    from fastreid.utils.events import _CURRENT_STORAGE_STACK

    if _CURRENT_STORAGE_STACK:  # inside a FastReID training loop
        _CURRENT_STORAGE_STACK[-1].put_scalar(name, value, smoothing_hint=False)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def find_cdd(model: nn.Module) -> Optional[CDDDistiller]:
    m = unwrap(model)
    return m if isinstance(m, CDDDistiller) else None

