"""cdd_plugin: Capacity Dynamic Distillation (CVPR 2023) with RGGR for PyTorch CNNs.

Public API (see docs/API.md): ``CDDConfig``, ``insert_dgc``, ``RGGROptimizer``,
``merge``, ``save_merged``, ``load_merged``, ``profile``, ``export_onnx``, ``CDDDistiller``, ``LossConfig``.
"""
from .config import CDDConfig, ConfigError
from .dgc import DGC
from .export import load_merged, read_merged, save_merged
from .merge import MergeError, merge
from .optim import RGGROptimizer, param_groups
from .profile import channel_table, plot_channels, profile
from .state import CDDState
from .surgery import DGCSite, SurgeryError, insert_dgc
from . import rggr

__version__ = "0.1.0"

__all__ = [
    "CDDConfig", "ConfigError", "CDDState", "DGC", "DGCSite", "MergeError", "RGGROptimizer", "SurgeryError",
    "channel_table", "insert_dgc", "load_merged", "merge", "param_groups", "plot_channels", "profile", "read_merged",
    "rggr", "save_merged",
]


def __getattr__(name):  # heavier parts are imported on first use
    import importlib

    if name in ("CDDDistiller", "LossConfig"):
        return getattr(importlib.import_module(".distill", __name__), name)
    if name in ("export_onnx", "ExportError"):
        return getattr(importlib.import_module(".deploy", __name__), name)
    if name in ("distill", "evaluation", "datasets", "deploy"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'cdd_plugin' has no attribute {name!r}")
