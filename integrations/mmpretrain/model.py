"""Retrievers registered in MMPretrain's ``MODELS``: a plain embedding retriever and CDD.

``EmbeddingRetriever`` is MMPretrain's ``ImageToImageRetriever`` whose predictions also
carry each image's embedding, so the retrieval metrics of this plug-in (SOP Recall@K
with self-exclusion, camera-aware re-ID mAP/CMC) can evaluate it; the prototype
(gallery) of the parent class becomes optional. The teacher config trains one.

``CDDRetriever`` builds the teacher and the heavy student from config, inserts the DGCs
when it is built (mmengine builds the optimizer before any hook runs), and trains the
student with the core ``CDDDistiller``. Everything CDD does lives in ``cdd_plugin``;
this module only wires it into MMPretrain's model interface.
"""
from __future__ import annotations

import copy
import os.path as osp
import re
from typing import Dict, List, Optional, Sequence

import torch
from mmengine.runner import CheckpointLoader
from mmpretrain.models.retrievers import ImageToImageRetriever
from mmpretrain.registry import MODELS
from mmpretrain.structures import DataSample
from torch import nn

import cdd_plugin
from cdd_plugin.config import ConfigError
from cdd_plugin.distill import CDDDistiller, LossConfig
from cdd_plugin.export import FORMAT as MERGED_FORMAT

EMBEDDING_FIELD = "embedding"
_ADAPTER_CDD_KEYS = ("mask_start_epoch",)


class RetrievalNet(nn.Module):
    """An image encoder and an optional classification head as one network.

    ``forward`` returns ``(logits, embedding)`` (just the embedding without a head), the
    convention of ``cdd_plugin.CDDDistiller``; ``embed`` returns the retrieval embedding
    (the encoder's last output). Attribute names match the retriever's, so the keys of
    its state dict (``image_encoder.*``, ``head.*``) are the retriever's own keys.
    """

    def __init__(self, image_encoder: nn.Module, head: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.head = head

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.image_encoder(x)
        return feats[-1] if isinstance(feats, (tuple, list)) else feats

    def forward(self, x: torch.Tensor):
        feats = self.image_encoder(x)
        if not isinstance(feats, (tuple, list)):
            feats = (feats,)
        if self.head is None:
            return feats[-1]
        return self.head(tuple(feats)), feats[-1]


    def cdd_cut_embedding(self, dropped: List[int]) -> None:
        """Merge calls this when the embedding loses the (exactly zero) channels ``dropped``
        (``cdd=dict(cut_embedding=True)``): the classification head, outside the traced embedding
        path, loses the same inputs, so ``forward`` still computes the trained logits."""
        if self.head is None or not dropped:
            return
        name, fc = next(((n, m) for n, m in self.head.named_modules() if isinstance(m, nn.Linear)), (None, None))
        if fc is None or max(dropped) >= fc.in_features:
            raise ValueError(f"the head {type(self.head).__name__} has no Linear layer reading the "
                             f"{max(dropped) + 1}+-wide embedding, so its inputs cannot be cut to match; train "
                             "without cut_embedding")
        gone = set(dropped)
        keep = torch.tensor([i for i in range(fc.in_features) if i not in gone], device=fc.weight.device)
        new = nn.Linear(len(keep), fc.out_features, bias=fc.bias is not None).to(fc.weight.device, fc.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(fc.weight[:, keep])
            if fc.bias is not None:
                new.bias.copy_(fc.bias)
        parent, _, child = name.rpartition(".")
        setattr(self.head.get_submodule(parent) if parent else self.head, child, new)


def _embed_forward(model: RetrievalNet, inputs: torch.Tensor) -> torch.Tensor:
    """Surgery/FLOPs/merge trace only the embedding network (the classifier is not deployed)."""
    return model.embed(inputs)


def _build(cfg):
    if cfg is None or isinstance(cfg, nn.Module):
        return cfg
    return MODELS.build(copy.deepcopy(cfg))


def attach_embeddings(data_samples: Optional[List[DataSample]], embeddings: torch.Tensor) -> List[DataSample]:
    """Set each sample's ``embedding`` field (a detached 1-D tensor)."""
    if data_samples is None:
        data_samples = [DataSample() for _ in range(embeddings.shape[0])]
    for sample, emb in zip(data_samples, embeddings.detach()):
        sample.set_field(emb, EMBEDDING_FIELD)
    return data_samples


@MODELS.register_module()
class EmbeddingRetriever(ImageToImageRetriever):
    """``ImageToImageRetriever`` whose predictions carry the embedding of every image.

    Same arguments as ``ImageToImageRetriever``; ``prototype`` may be ``None`` (no
    gallery matching, only embeddings; what ``SOPRecall`` and ``ReIDMetric`` need).
    With a prototype, ``pred_score``/``pred_label`` are set as in the parent class, so
    MMPretrain's own ``RetrievalRecall`` keeps working.
    """

    def __init__(self, image_encoder, prototype=None, head=None, **kwargs) -> None:
        # the parent insists on a prototype; None here means "embeddings only"
        super().__init__(image_encoder=image_encoder, head=head,
                         prototype=torch.empty(0, 0) if prototype is None else prototype, **kwargs)
        self.prototype = prototype

    def prepare_prototype(self):
        if self.prototype is None:
            self.prototype_inited = True
            return
        super().prepare_prototype()

    def _retrieval_net(self) -> nn.Module:
        return RetrievalNet(self.image_encoder, self.head)

    def predict_with(self, net: RetrievalNet, inputs: torch.Tensor,
                     data_samples: Optional[List[DataSample]] = None) -> List[DataSample]:
        """Predictions of ``net`` (any network with ``embed``): embeddings, and gallery
        matches when a prototype is configured."""
        emb = net.embed(inputs)
        if self.prototype is not None:
            if not self.prototype_inited:
                self.prepare_prototype()
            data_samples = self._get_predictions(self.matching(emb), data_samples)
        return attach_embeddings(data_samples, emb)

    def predict(self, inputs: torch.Tensor, data_samples: Optional[List[DataSample]] = None,
                **kwargs) -> List[DataSample]:
        return self.predict_with(self._retrieval_net(), inputs, data_samples)


def _teacher_error(path: str, why: str) -> ValueError:
    return ValueError(
        f"the teacher checkpoint {path} does not fit model.teacher: {why}. Fix: point model.teacher.checkpoint at a "
        "checkpoint of the teacher architecture (train one with configs/teacher_resnet50_sop.py), or make "
        "model.teacher.image_encoder / model.teacher.head match the checkpoint (ResNet depth, embedding size, "
        "num_classes), or map its keys with model.teacher.revise_keys=[(pattern, replacement), ...]")


@MODELS.register_module()
class CDDRetriever(EmbeddingRetriever):
    """Capacity Dynamic Distillation for MMPretrain retrieval models.

    The student is this retriever's own ``image_encoder`` + ``head`` (so MMPretrain's
    retrieval hooks and metrics see an ordinary retriever). When the model is built,
    the DGCs are inserted into the student (``cdd_plugin.insert_dgc``) and a frozen
    teacher is built; ``init_weights`` restores the DGC identity (MMPretrain's init_cfg
    re-initialises layers) and loads the teacher checkpoint. ``loss`` returns the core
    distiller's losses (``loss_*`` terms plus the logged figure ``cdd_sparsity``).

    Args:
        image_encoder: the heavy student encoder (backbone + neck), as for
            ``ImageToImageRetriever``; its last output is the retrieval embedding.
        head: the student's classification head (its logits feed the identity and
            logit-distillation losses; its own ``loss`` setting is not used: the
            losses are ``losses``).
        teacher: ``dict(checkpoint=PATH, image_encoder=..., head=..., revise_keys=...)``;
            ``image_encoder``/``head`` default to the student's. Required.
        cdd: settings of ``cdd_plugin.CDDConfig`` (``lasso``, ``threshold``, ``k``,
            ``ratio``, ``queue_size``, ``metric``, ``mask_start``, ...), plus
            ``mask_start_epoch``: first epoch at which masks may change (converted to
            iterations by ``CDDHook``; use either it or ``mask_start``).
        losses: settings of ``cdd_plugin.LossConfig`` (loss weights, temperature...).
        input_size: ``(H, W)`` of the training input; surgery traces the student at
            this size and FLOPs are counted at it.
        prototype, data_preprocessor, train_cfg, init_cfg, similarity_fn, topk: as for
            ``ImageToImageRetriever`` (``prototype`` optional, see ``EmbeddingRetriever``).
    """

    def __init__(self, image_encoder, head=None, teacher: Optional[dict] = None, cdd: Optional[dict] = None,
                 losses: Optional[dict] = None, input_size: Sequence[int] = (256, 128), prototype=None,
                 **kwargs) -> None:
        if not teacher:
            raise ConfigError(
                "CDDRetriever needs a teacher: set model.teacher=dict(checkpoint='path/to/teacher.pth') (the teacher "
                "architecture defaults to the student's image_encoder/head; override them inside model.teacher). "
                "Train a teacher with configs/teacher_resnet50_sop.py")
        teacher = dict(teacher)
        unknown = sorted(set(teacher) - {"checkpoint", "image_encoder", "head", "revise_keys"})
        if unknown:
            raise ConfigError(f"unknown model.teacher key(s) {unknown}; valid keys are checkpoint, image_encoder, "
                              "head, revise_keys")
        if not teacher.get("checkpoint"):
            raise ConfigError("model.teacher.checkpoint is not set: the teacher must be trained; point it at the "
                              "teacher's checkpoint (e.g. work_dirs/teacher_sop/epoch_N.pth from "
                              "configs/teacher_resnet50_sop.py)")
        if not (isinstance(input_size, (tuple, list)) and len(input_size) == 2 and all(int(v) > 0 for v in input_size)):
            raise ConfigError(f"model.input_size={input_size!r} must be (height, width) of the training input, "
                              "e.g. (256, 128)")
        cdd = dict(cdd or {})
        adapter = {k: cdd.pop(k) for k in _ADAPTER_CDD_KEYS if k in cdd}
        if "mask_start_epoch" in adapter and "mask_start" in cdd:
            raise ConfigError("model.cdd sets both mask_start (iterations) and mask_start_epoch; keep one")
        cfg = cdd_plugin.CDDConfig.from_dict(cdd)
        loss_cfg = LossConfig.from_dict(dict(losses or {}))

        # the configs that rebuild a dense student (to load a merged file)
        self._student_cfgs = (copy.deepcopy(image_encoder), copy.deepcopy(head))
        super().__init__(image_encoder=image_encoder, head=head, prototype=prototype, **kwargs)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.mask_start_epoch = adapter.get("mask_start_epoch")
        # CDDHook converts mask_start_epoch to optimizer steps before training starts
        self.mask_schedule_ready = self.mask_start_epoch is None
        self.teacher_checkpoint = str(teacher["checkpoint"])
        self.teacher_revise_keys = [tuple(p) for p in teacher.get("revise_keys", [(r"^module\.", "")])]
        t_encoder = teacher.get("image_encoder", self._student_cfgs[0])
        t_head = teacher.get("head", self._student_cfgs[1])
        self.teacher = RetrievalNet(_build(t_encoder), _build(t_head))

        student = RetrievalNet(self.image_encoder, self.head)
        state = cdd_plugin.insert_dgc(student, self.example_inputs(2), cfg, forward_fn=_embed_forward)
        distiller = CDDDistiller(student, self.teacher, state, loss_cfg)
        # helpers over modules the retriever already owns: kept out of its module tree
        # (no duplicate parameters or state-dict keys)
        self.__dict__["student_net"] = student
        self.__dict__["distiller"] = distiller
        self.cdd_state = state
        self.merged = False

    # -- helpers -------------------------------------------------------------------------
    def example_inputs(self, batch: int = 1) -> torch.Tensor:
        """A random batch at the training input size, on the model's device (own RNG)."""
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 3, *self.input_size, generator=gen)
        p = next(self.image_encoder.parameters(), None)
        return x if p is None else x.to(p.device)

    def _retrieval_net(self) -> nn.Module:
        return self.student_net

    def build_dense_student(self) -> RetrievalNet:
        """A fresh dense student (no DGCs) of the configured architecture, on the model's device."""
        net = RetrievalNet(_build(self._student_cfgs[0]), _build(self._student_cfgs[1]))
        return net.to(self.example_inputs().device)

    def train(self, mode: bool = True):
        super().train(mode)
        distiller = self.__dict__.get("distiller")
        if distiller is not None:
            distiller.train(mode)  # keeps the teacher in eval mode
        return self

    # -- weights -------------------------------------------------------------------------
    def init_weights(self):
        super().init_weights()
        if self.merged:
            return
        for dgc in self.cdd_state.compactors.values():
            dgc.reset_identity()  # init_cfg re-initialises every layer it matches
        self.load_teacher()

    def load_teacher(self, path: Optional[str] = None) -> None:
        """Load the frozen teacher from its checkpoint (an mmengine checkpoint of a
        retriever with ``image_encoder.*``/``head.*`` keys, or a plain state dict)."""
        path = path or self.teacher_checkpoint
        local = "://" not in path
        if local and not osp.isfile(path):
            raise FileNotFoundError(
                f"teacher checkpoint {path} does not exist. Fix: train the teacher first (mim train mmpretrain "
                "configs/teacher_resnet50_sop.py) and set model.teacher.checkpoint to its checkpoint")
        ckpt = CheckpointLoader.load_checkpoint(path, map_location="cpu")
        sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
        if not isinstance(sd, dict):
            raise _teacher_error(path, f"it holds a {type(ckpt).__name__}, not a state dict")
        for pattern, repl in self.teacher_revise_keys:
            sd = {re.sub(pattern, repl, k): v for k, v in sd.items()}
        own = self.teacher.state_dict()
        sd = {k: v for k, v in sd.items() if k in own or k.startswith(("image_encoder.", "head."))}
        missing = [k for k in own if k not in sd]
        unexpected = [k for k in sd if k not in own]
        shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or shapes:
            parts = []
            if shapes:
                parts.append(f"{len(shapes)} shape mismatch(es), e.g. {'; '.join(shapes[:3])}")
            if missing:
                parts.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
            raise _teacher_error(path, "; ".join(parts))
        self.teacher.load_state_dict(sd, strict=True)
        self.teacher.eval()

    def load_merged(self, path: str) -> None:
        """Replace the heavy student by the narrow network of a ``cdd_plugin`` merged
        file (``model_merged.pth``); the teacher and the CDD training state are dropped,
        so the model is a plain retriever for evaluation or deployment."""
        device = self.example_inputs().device
        narrow = cdd_plugin.load_merged(path, self.build_dense_student().cpu()).to(device)
        self.image_encoder = narrow.image_encoder
        self.head = narrow.head
        self.teacher = None
        self.__dict__["student_net"] = narrow
        self.__dict__["distiller"] = None
        self.cdd_state = None
        self.merged = True
        self.train(self.training)

    # -- forward -------------------------------------------------------------------------
    def loss(self, inputs: torch.Tensor, data_samples: List[DataSample]) -> Dict[str, torch.Tensor]:
        if self.distiller is None:
            raise RuntimeError("this CDDRetriever holds a merged (deployed) student loaded from a merged file; it "
                               "cannot be trained with CDD. Train from the config, or fine-tune the merged network "
                               "as an ordinary model")
        if not self.mask_schedule_ready:
            raise RuntimeError(
                "model.cdd.mask_start_epoch is set but nothing converted it to optimizer steps: add "
                "custom_hooks=[dict(type='CDDHook')] to the config (it also logs the CDD figures and merges the "
                "student after training), or give model.cdd.mask_start in iterations instead")
        labels = torch.cat([s.gt_label for s in data_samples]).to(inputs.device)
        return self.distiller(inputs, labels)


def is_merged_file(path: Optional[str]) -> bool:
    """True when ``path`` is a local ``cdd_plugin`` merged-model file (``model_merged.pth``).

    Only the file's format tag is read (memory-mapped), so asking about a large
    training checkpoint is cheap; files that cannot be read safely count as "no".
    """
    if not path or "://" in str(path) or not osp.isfile(path):
        return False
    try:
        payload = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # not a zip-format torch file, or not loadable safely: not ours
        return False
    return isinstance(payload, dict) and payload.get("format") == MERGED_FORMAT


def unwrap(model: nn.Module) -> nn.Module:
    from mmengine.model import is_model_wrapper

    return model.module if is_model_wrapper(model) else model


__all__ = ["CDDRetriever", "EmbeddingRetriever", "RetrievalNet", "attach_embeddings", "is_merged_file", "unwrap"]
