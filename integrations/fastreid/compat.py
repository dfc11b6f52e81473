"""Small, named fixes that let PyPI FastReID 1.4.0 run on Python >= 3.10, torch 2.x and CPU.

FastReID 1.4.0 (January 2023) was written for Python 3.8 and torch 1.13 on CUDA. Users
never edit FastReID: ``apply()`` patches what breaks, each patch named after the problem
it fixes, applied only where the problem exists, and idempotent (``apply()`` may run any
number of times). ``APPLIED`` lists what was patched in this process.

Problems handled here (everything else -- the device check, ``contiguous=False`` for the
optimizer, the dataset root -- is done by the trainer without touching FastReID):

* ``collections_abc_aliases``: ``from collections import Mapping`` (removed in Python 3.10)
  in ``fastreid.data.build`` and ``fastreid.evaluation.testing``.
* ``torch_six``: ``from torch._six import string_classes`` (module removed in torch 2.0)
  in ``fastreid.data.build``.
* ``dataloaderx_without_cuda``: ``DataLoaderX`` creates a CUDA stream and calls
  ``torch.cuda.set_device`` unconditionally, so no data loader can be built without CUDA.
  Without CUDA it now loads batches in the same background thread, without streams.
* ``cython_evaluator_compile``: ``ReidEvaluator`` runs ``make`` inside site-packages on
  first use to compile its Cython ranker (with whatever ``python3`` is first on PATH) and
  calls ``sys.exit(1)`` if that fails. When the compiled ranker is absent, FastReID's own
  pure-Python ranking path is used instead (same numbers, ``fastreid.evaluation.rank``).
* ``checkpointer_weights_only``: torch >= 2.6 loads with ``weights_only=True`` by default.
  Checkpoints written by this FastReID on torch 2.x load as they are, but files from other
  runs can hold numpy scalars (e.g. a ``metric`` figure taken straight from the evaluator),
  which that refuses. ``Checkpointer._load_file`` keeps ``weights_only=True`` and, only
  when a file needs it, retries with the numpy scalar/dtype types allow-listed for that one
  call; anything else is refused with a message saying how to re-save the file. Safety is
  never switched off globally.
* ``launch_without_cuda``: ``launch``'s worker asserts CUDA, initialises NCCL and calls
  ``torch.cuda.set_device``, so ``--num-gpus N`` cannot start N processes on a CPU machine.
  Without CUDA the worker joins a gloo process group instead (same ``dist_url``, ranks and
  per-machine group as FastReID's); ``launch`` itself is FastReID's.
* ``ddp_without_device_ids_on_cpu``: ``DefaultTrainer`` wraps the model in
  ``DistributedDataParallel(device_ids=[local_rank])``, which torch refuses for a model on
  the CPU. Without CUDA, a CPU model is wrapped with ``device_ids=None``.

The last two only exist so that multi-process training (and its tests) runs on CPU
machines with the gloo backend; with CUDA nothing is patched and FastReID runs as shipped.
"""
from __future__ import annotations

import collections
import collections.abc
import importlib
import logging
import pickle
import sys
import threading
import types
from typing import List

import torch

logger = logging.getLogger("fastreid.cdd")

APPLIED: List[str] = []
_LOCK = threading.Lock()


def _mark(name: str) -> None:
    if name not in APPLIED:
        APPLIED.append(name)


def collections_abc_aliases() -> None:
    """Python 3.10 removed the ABC aliases from ``collections``; FastReID imports them from there."""
    for name in ("Mapping", "MutableMapping", "Sequence", "Iterable"):
        if not hasattr(collections, name):
            setattr(collections, name, getattr(collections.abc, name))
            _mark("collections_abc_aliases")


def torch_six() -> None:
    """torch 2.0 removed ``torch._six``; FastReID only needs ``string_classes`` from it."""
    try:
        importlib.import_module("torch._six")
        return
    except ImportError:
        pass
    mod = types.ModuleType("torch._six")
    mod.string_classes = (str, bytes)
    mod.int_classes = int
    mod.inf = float("inf")
    sys.modules["torch._six"] = mod
    torch._six = mod
    _mark("torch_six")


def dataloaderx_without_cuda() -> None:
    """Let ``fastreid.data.data_utils.DataLoaderX`` run without CUDA (no streams, no set_device)."""
    if torch.cuda.is_available():
        return
    from fastreid.data import data_utils

    cls = data_utils.DataLoaderX
    if getattr(cls, "_cdd_cpu_patch", False):
        return

    def __init__(self, local_rank, **kwargs):
        kwargs["pin_memory"] = False  # pinning needs a CUDA device
        torch.utils.data.DataLoader.__init__(self, **kwargs)
        self.stream = None
        self.local_rank = local_rank

    def preload(self):
        self.batch = next(self.iter, None)

    def __next__(self):
        batch = self.batch
        if batch is None:
            raise StopIteration
        self.preload()
        return batch

    gen = data_utils.BackgroundGenerator

    def run(self):
        for item in self.generator:
            if self.exit_event.is_set():
                break
            self.queue.put(item)
        self.queue.put(None)

    cls.__init__, cls.preload, cls.__next__ = __init__, preload, __next__
    gen.run = run
    cls._cdd_cpu_patch = True
    _mark("dataloaderx_without_cuda")


def cython_evaluator_compile() -> None:
    """Use FastReID's pure-Python ranking instead of compiling Cython into site-packages."""
    from fastreid.evaluation import rank, reid_evaluation

    if rank.IS_CYTHON_AVAI:
        return
    cls = reid_evaluation.ReidEvaluator
    if getattr(cls, "_cdd_python_rank", False):
        return

    def _compile_dependencies(self):
        logger.debug("FastReID's compiled ranker is not built; using its pure-Python ranking")

    cls._compile_dependencies = _compile_dependencies
    cls._cdd_python_rank = True
    _mark("cython_evaluator_compile")


def _numpy_safe_globals() -> list:
    import numpy as np

    out = [np.dtype, type(np.dtype("float64")), type(np.dtype("float32")), type(np.dtype("int64"))]
    try:  # numpy >= 2
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import scalar
    out.append(scalar)
    return out


def checkpointer_weights_only() -> None:
    """Load FastReID checkpoints with ``weights_only=True``, allowing numpy scalars when a file holds them."""
    if not hasattr(torch.serialization, "safe_globals"):  # torch < 2.4: no weights_only default to meet
        return
    from fastreid.utils import checkpoint

    cls = checkpoint.Checkpointer
    if getattr(cls, "_cdd_safe_load", False):
        return

    def _load_file(self, f: str):
        try:
            return torch.load(f, map_location=torch.device("cpu"), weights_only=True)
        except pickle.UnpicklingError:
            pass
        try:
            with torch.serialization.safe_globals(_numpy_safe_globals()):
                return torch.load(f, map_location=torch.device("cpu"), weights_only=True)
        except pickle.UnpicklingError as exc:
            raise pickle.UnpicklingError(
                f"{f} holds objects other than tensors, containers and numpy scalars, so it is not loaded "
                f"(weights_only=True; {str(exc).splitlines()[0]}). If you trust the file, re-save what FastReID "
                "needs: torch.save({'model': torch.load(f, weights_only=False)['model']}, 'clean.pth')") from exc

    cls._load_file = _load_file
    cls._cdd_safe_load = True
    _mark("checkpointer_weights_only")


def _worker_without_cuda(local_rank, main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args):
    """FastReID's ``_distributed_worker`` on the CPU: gloo, no ``set_device`` (see ``launch_without_cuda``)."""
    import torch.distributed as dist
    from fastreid.utils import comm

    launch_mod = importlib.import_module("fastreid.engine.launch")

    if torch.cuda.is_available():
        return launch_mod._cdd_cuda_worker(local_rank, main_func, world_size, num_gpus_per_machine, machine_rank,
                                           dist_url, args)
    global_rank = machine_rank * num_gpus_per_machine + local_rank
    try:
        dist.init_process_group(backend="gloo", init_method=dist_url, world_size=world_size, rank=global_rank)
    except Exception:
        logger.error("Process group URL: %s", dist_url)
        raise
    comm.synchronize()
    for i in range(world_size // num_gpus_per_machine):
        pg = dist.new_group(list(range(i * num_gpus_per_machine, (i + 1) * num_gpus_per_machine)))
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = pg
    main_func(*args)


def launch_without_cuda() -> None:
    """Let ``fastreid.engine.launch`` start gloo processes on a machine without CUDA."""
    if torch.cuda.is_available():
        return
    launch_mod = importlib.import_module("fastreid.engine.launch")  # the package re-exports the function
    if getattr(launch_mod, "_cdd_cuda_worker", None) is not None:
        return
    launch_mod._cdd_cuda_worker = launch_mod._distributed_worker
    launch_mod._distributed_worker = _worker_without_cuda
    _mark("launch_without_cuda")


def ddp_without_device_ids_on_cpu() -> None:
    """``DefaultTrainer`` passes ``device_ids=[local_rank]`` to DDP; a CPU model needs ``None``."""
    if torch.cuda.is_available():
        return
    from fastreid.engine import defaults

    ddp = defaults.DistributedDataParallel
    if getattr(ddp, "_cdd_cpu_patch", False):
        return

    class CPUDistributedDataParallel(ddp):
        _cdd_cpu_patch = True

        def __init__(self, module, device_ids=None, *args, **kwargs):
            if all(p.device.type == "cpu" for p in module.parameters()):
                device_ids = None
            super().__init__(module, device_ids, *args, **kwargs)

    defaults.DistributedDataParallel = CPUDistributedDataParallel
    _mark("ddp_without_device_ids_on_cpu")


def apply() -> List[str]:
    """Apply every needed patch (idempotent); returns the names of those applied in this process."""
    with _LOCK:
        collections_abc_aliases()
        torch_six()
        import fastreid.data  # noqa: F401  (imports only work after the two patches above)
        import fastreid.engine  # noqa: F401
        dataloaderx_without_cuda()
        cython_evaluator_compile()
        checkpointer_weights_only()
        launch_without_cuda()
        ddp_without_device_ids_on_cpu()
    return list(APPLIED)
