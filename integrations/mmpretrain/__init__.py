"""cdd_plugin for MMPretrain / mmengine.

Importing this module registers (a config pulls it in with
``custom_imports = dict(imports=['cdd_plugin.integrations.mmpretrain'], allow_failed_imports=False)``):

* MODELS: ``CDDRetriever`` (teacher + heavy student with DGCs, CDD losses),
  ``EmbeddingRetriever`` (an ``ImageToImageRetriever`` whose predictions carry embeddings;
  the teacher config trains one)
* OPTIM_WRAPPERS: ``CDDOptimWrapper``, ``CDDAmpOptimWrapper`` (RGGR gradient step);
  OPTIM_WRAPPER_CONSTRUCTORS: ``CDDOptimWrapperConstructor`` (binds them to the model)
* HOOKS: ``CDDHook`` (CDD figures in the logs; merge, evaluation, ``model_merged.pth`` and
  ``cdd_summary.json`` after training; loads merged files for ``mim test``)
* DATASETS: ``StanfordOnlineProducts``, ``Market1501``; DATA_SAMPLERS: ``PKBatchSampler``
* METRICS: ``SOPRecall`` (Recall@K, own image excluded), ``ReIDMetric`` (mAP/mINP/CMC)

It also allow-lists, for ``torch.load(weights_only=True)`` (torch's default), the few
non-tensor types inside mmengine's own checkpoints, so resume works safely
(see ``checkpoint.py``); registers the ``atomic_local`` file backend that the configs'
``CheckpointHook`` writes checkpoints with (temporary file + fsync + ``os.replace``, see
``fileio.py``); and applies the named mmengine patches of ``compat.py`` (an atomic
``last_checkpoint`` pointer; without CUDA, ``--launcher pytorch`` with gloo on CPUs),
listed in ``compat.APPLIED``.
"""
try:
    import mmengine  # noqa: F401
    import mmpretrain  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"cdd_plugin.integrations.mmpretrain needs MMPretrain and mmengine ({exc}). Fix: run `make install`, or "
        "`pip install -e '.[mmpretrain]'` in the cdd_plugin repository (mmengine==0.10.7, mmcv-lite==2.2.0, "
        "mmpretrain==1.2.0, openmim==0.3.9, numpy<2.4, setuptools<81)") from exc

from . import compat
from .checkpoint import MMENGINE_SAFE_GLOBALS, allow_mmengine_checkpoints
from .datasets import Market1501, PKBatchSampler, StanfordOnlineProducts
from .fileio import AtomicLocalBackend, register_atomic_backend
from .hooks import CDDHook
from .metrics import ReIDMetric, SOPRecall
from .model import CDDRetriever, EmbeddingRetriever, RetrievalNet
from .optim import CDDAmpOptimWrapper, CDDOptimWrapper, CDDOptimWrapperConstructor

allow_mmengine_checkpoints()
register_atomic_backend()
compat.apply()


def cli_arch(spec: str, num_classes=None) -> dict:
    """``cdd profile / merge --arch mmpretrain:<config.py>``: the dense student of an MMPretrain
    config (``CDDRetriever`` or a plain retriever: its ``image_encoder`` and ``head``), built on
    the CPU without the teacher, traced through its embedding like the training run was."""
    import os

    import torch
    from mmengine.config import Config

    from cdd_plugin import ConfigError

    from .model import _build, _embed_forward

    if not os.path.isfile(spec):
        raise FileNotFoundError(f"MMPretrain config {spec!r} not found (working directory {os.getcwd()})")
    model_cfg = Config.fromfile(spec).get("model")
    if not model_cfg or "image_encoder" not in model_cfg:
        raise ConfigError(f"{spec} has no model.image_encoder: --arch mmpretrain:<config> takes a retriever config "
                          "such as configs/cdd_resnet50_sop.py")
    head = model_cfg.get("head")
    if head is not None and num_classes is not None:
        head = dict(head, num_classes=int(num_classes))
    net = RetrievalNet(_build(model_cfg["image_encoder"]), _build(head)).eval()
    height, width = (int(v) for v in model_cfg.get("input_size", (256, 128)))
    return {"model": net, "input": (3, height, width), "forward_fn": _embed_forward,
            "example_inputs": lambda batch: torch.randn(batch, 3, height, width)}


__all__ = [
    "AtomicLocalBackend", "CDDAmpOptimWrapper", "CDDHook", "CDDOptimWrapper", "CDDOptimWrapperConstructor",
    "CDDRetriever", "EmbeddingRetriever", "MMENGINE_SAFE_GLOBALS", "Market1501", "PKBatchSampler", "ReIDMetric",
    "RetrievalNet", "SOPRecall", "StanfordOnlineProducts", "allow_mmengine_checkpoints", "cli_arch", "compat",
    "register_atomic_backend",
]
