"""Small, named fixes to mmengine 0.10.7 for reliable checkpoints and CPU-only distributed training.

mmengine is never edited or forked: ``apply()`` (run when ``cdd_plugin.integrations.mmpretrain``
is imported, i.e. by a config's ``custom_imports``) patches what breaks, each patch named
after the problem it fixes, applied only where that problem exists, and idempotent
(``apply()`` may run any number of times). ``APPLIED`` lists what was patched in this process.

* ``checkpoint_pointer_atomic`` (always): ``CheckpointHook`` writes the ``last_checkpoint``
  pointer (what ``resume=True`` / ``--resume`` reads to find the checkpoint) with a plain
  ``open(path, 'w')``, which empties the file before writing it. A process killed in between
  leaves an empty pointer, and an auto-resume then fails on the path ``''``. The pointer is
  the only file that module opens; its writes now go through ``cdd_plugin.files.atomic_open``
  (temporary file, fsync, ``os.replace``). The checkpoints themselves are made atomic by the
  configs' ``backend_args=dict(backend='atomic_local')`` (see ``fileio.py``).

The two others are applied only when the machine has no CUDA (nor another accelerator
mmengine drives: NPU, MLU, MUSA), so GPU training is untouched. They let mmengine's own
launcher (``torchrun ... tools/train.py CONFIG --launcher pytorch``) train on CPUs with the
gloo backend, selected in the config with ``env_cfg = dict(dist_cfg=dict(backend='gloo'))``:

* ``dist_init_without_cuda``: ``mmengine.dist.utils._init_dist_pytorch`` calls
  ``torch.cuda.set_device(LOCAL_RANK)`` before ``init_process_group``, which raises without
  a CUDA driver. Without an accelerator the process group is now initialised the same way
  (``init_process_group(backend, **dist_cfg)``, ranks from the launcher's environment)
  without that call. ``backend='nccl'`` (mmpretrain's default runtime) needs CUDA and is
  refused with a message naming the gloo setting.
* ``ddp_without_device_ids_on_cpu``: ``Runner.wrap_model`` builds
  ``MMDistributedDataParallel(module, device_ids=[LOCAL_RANK])``; torch's
  ``DistributedDataParallel`` refuses ``device_ids`` for a module whose parameters are on
  the CPU. For such a module ``device_ids`` / ``output_device`` are now left out, which is
  how torch wants CPU modules wrapped.

Only the ``pytorch`` launcher is handled (``slurm`` and ``mpi`` also call
``torch.cuda.set_device``).
"""
from __future__ import annotations

import builtins
import functools
import logging
import threading
from typing import Any, List

import torch

from cdd_plugin.files import atomic_open

logger = logging.getLogger("cdd_plugin.mmpretrain")

APPLIED: List[str] = []
_LOCK = threading.Lock()
_WRITE_MODES = ("w", "wt", "wb")


def _mark(name: str) -> None:
    if name not in APPLIED:
        APPLIED.append(name)


def accelerator_available() -> bool:
    """True when mmengine would train on an accelerator (CUDA, NPU, MLU or MUSA)."""
    if torch.cuda.is_available():
        return True
    from mmengine.device import is_mlu_available, is_musa_available, is_npu_available

    return bool(is_mlu_available() or is_npu_available() or is_musa_available())


# -- checkpoint_pointer_atomic -----------------------------------------------------------------
def _pointer_open(file, mode: str = "r", *args: Any, **kwargs: Any):
    """``open`` for ``mmengine.hooks.checkpoint_hook``: whole-file writes are atomic, the rest is ``open``."""
    if mode in _WRITE_MODES and not args and set(kwargs) <= {"encoding"}:
        if kwargs.get("encoding", "utf-8").lower().replace("-", "") != "utf8":
            return builtins.open(file, mode, *args, **kwargs)
        return atomic_open(file, mode)
    return builtins.open(file, mode, *args, **kwargs)


def checkpoint_pointer_atomic() -> None:
    """Write ``CheckpointHook``'s ``last_checkpoint`` pointer atomically."""
    from mmengine.hooks import checkpoint_hook

    if checkpoint_hook.__dict__.get("open") is not _pointer_open:
        checkpoint_hook.open = _pointer_open  # module global: shadows the builtin for that module only
    _mark("checkpoint_pointer_atomic")


# -- dist_init_without_cuda --------------------------------------------------------------------
def dist_init_without_cuda() -> None:
    """Initialise mmengine's ``pytorch`` launcher without ``torch.cuda.set_device`` on machines without CUDA."""
    if accelerator_available():
        return
    from mmengine.dist import utils as dist_utils

    original = dist_utils._init_dist_pytorch
    if getattr(original, "_cdd_cpu_patch", False):
        _mark("dist_init_without_cuda")
        return

    @functools.wraps(original)
    def _init_dist_pytorch(backend: str = "nccl", init_backend: str = "torch", **kwargs: Any) -> None:
        if accelerator_available() or init_backend != "torch":
            return original(backend, init_backend=init_backend, **kwargs)
        if str(backend).lower() == "nccl":
            raise RuntimeError(
                "distributed training with backend='nccl' needs CUDA GPUs, and this machine has none. Fix: train "
                "with gloo on the CPU, env_cfg = dict(dist_cfg=dict(backend='gloo')) in the config (or "
                "--cfg-options env_cfg.dist_cfg.backend=gloo)")
        torch.distributed.init_process_group(backend=backend, **kwargs)

    _init_dist_pytorch._cdd_cpu_patch = True
    dist_utils._init_dist_pytorch = _init_dist_pytorch
    _mark("dist_init_without_cuda")


# -- ddp_without_device_ids_on_cpu -------------------------------------------------------------
def _on_cpu(module) -> bool:
    tensors = list(module.parameters()) + list(module.buffers())
    return bool(tensors) and all(t.device.type == "cpu" for t in tensors)


def ddp_without_device_ids_on_cpu() -> None:
    """Let ``Runner.wrap_model`` wrap a CPU model in ``MMDistributedDataParallel`` (no ``device_ids``)."""
    if accelerator_available():
        return
    from mmengine.model import MMDistributedDataParallel

    original = MMDistributedDataParallel.__init__
    if getattr(original, "_cdd_cpu_patch", False):
        _mark("ddp_without_device_ids_on_cpu")
        return

    @functools.wraps(original)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        module = kwargs.get("module", args[0] if args else None)
        if module is not None and kwargs.get("device_ids") is not None and _on_cpu(module):
            kwargs.pop("device_ids")
            kwargs.pop("output_device", None)
        original(self, *args, **kwargs)

    __init__._cdd_cpu_patch = True
    MMDistributedDataParallel.__init__ = __init__
    _mark("ddp_without_device_ids_on_cpu")


PATCHES = (checkpoint_pointer_atomic, dist_init_without_cuda, ddp_without_device_ids_on_cpu)


def apply() -> List[str]:
    """Apply every patch this process needs (idempotent); returns ``APPLIED``."""
    with _LOCK:
        for patch in PATCHES:
            patch()
    if APPLIED:
        logger.debug("cdd_plugin mmengine compatibility patches: %s", ", ".join(APPLIED))
    return list(APPLIED)


__all__ = ["APPLIED", "PATCHES", "accelerator_available", "apply", "checkpoint_pointer_atomic",
           "ddp_without_device_ids_on_cpu", "dist_init_without_cuda"]
