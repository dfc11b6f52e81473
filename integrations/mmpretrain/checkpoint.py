"""Let mmengine's own checkpoints load under ``torch.load(weights_only=True)``.

torch >= 2.6 loads with ``weights_only=True`` by default and mmengine 0.10.7 calls
``torch.load`` without the argument, so loading an mmengine checkpoint (resume, a
teacher checkpoint) fails on the few non-tensor objects mmengine stores in its ``meta``
(the MessageHub's log history). Instead of switching the safety off, exactly the types
found in such checkpoints (``torch.serialization.get_unsafe_globals_in_checkpoint``) are
allow-listed:

==============================================  =============================================
global in the pickle                             why it is there
==============================================  =============================================
``mmengine.logging.history_buffer.HistoryBuffer``  ``meta['message_hub']['log_scalars']``: one
                                                 buffer per logged scalar (loss, lr, metrics)
``numpy._core.multiarray._reconstruct``,         the buffers' ``_log_history`` /
``numpy.ndarray``, ``numpy.dtype``,              ``_count_history`` numpy arrays (float64 values,
``numpy.dtypes.Float64DType``, ``...Int64DType``  int64 counts; the dtype classes receive their
                                                 state through pickle's BUILD)
``numpy._core.multiarray.scalar``                numpy scalars in ``message_hub`` runtime info
                                                 (e.g. ``eta``) and metric values
``builtins.getattr``                             ``HistoryBuffer.__getstate__`` stores its
                                                 statistics methods (``min``, ``max``,
                                                 ``current``, ``mean``) as
                                                 ``getattr(HistoryBuffer, name)``: registered
                                                 as a restricted getattr that only returns
                                                 ``HistoryBuffer`` statistics methods
==============================================  =============================================

The numpy entries are registered under both ``numpy._core`` (numpy 2) and ``numpy.core``
(checkpoints written with numpy 1) names; they are the same objects.
"""
from __future__ import annotations

import pickle
from typing import Any, List, Tuple

import numpy as np
import torch
from mmengine.logging import HistoryBuffer

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray


def history_buffer_method(obj: Any, name: str):
    """The only ``getattr`` an mmengine checkpoint needs: a statistics method of
    ``HistoryBuffer`` (``min``, ``max``, ``current``, ``mean`` or a registered one)."""
    method = HistoryBuffer._statistics_methods.get(name) if obj is HistoryBuffer else None
    if method is None and obj is HistoryBuffer and name in ("min", "max", "current", "mean"):
        method = getattr(HistoryBuffer, name)
    if method is None:
        raise pickle.UnpicklingError(
            f"refusing getattr({getattr(obj, '__name__', type(obj).__name__)}, {name!r}) while loading with "
            "weights_only=True: cdd_plugin allows getattr only for mmengine HistoryBuffer statistics methods")
    return method


# dtypes of the arrays and scalars mmengine writes: float64 log values, int64 counts
_DTYPES = ("float64", "int64")


def _numpy_globals() -> List[Tuple[Any, str]]:
    out = []
    for prefix in ("numpy._core.multiarray", "numpy.core.multiarray"):
        out += [(_multiarray._reconstruct, f"{prefix}._reconstruct"), (_multiarray.scalar, f"{prefix}.scalar")]
    dtypes = [np.dtype(t).__class__ for t in _DTYPES]  # the classes BUILD sets the dtype state on
    return out + [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")] + [
        (cls, f"numpy.dtypes.{cls.__name__}") for cls in dtypes]


MMENGINE_SAFE_GLOBALS: List[Tuple[Any, str]] = [
    (HistoryBuffer, "mmengine.logging.history_buffer.HistoryBuffer"),
    *_numpy_globals(),
    (history_buffer_method, "builtins.getattr"),
]


def allow_mmengine_checkpoints() -> List[str]:
    """Register ``MMENGINE_SAFE_GLOBALS`` with ``torch.serialization.add_safe_globals``;
    returns the allow-listed names."""
    torch.serialization.add_safe_globals(list(MMENGINE_SAFE_GLOBALS))
    return [name for _, name in MMENGINE_SAFE_GLOBALS]
