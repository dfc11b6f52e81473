"""cdd_plugin: Capacity Dynamic Distillation (CVPR 2023) with RGGR for PyTorch CNNs.

Public API (see docs/API.md): ``CDDConfig``, ``insert_dgc``, ``RGGROptimizer``,
``merge``, ``save_merged``, ``load_merged``, ``profile``, ``CDDDistiller``, ``LossConfig``.
"""
from .config import CDDConfig, ConfigError
from .dgc import DGC
from .merge import MergeError, load_merged, merge, save_merged
from .optim import RGGROptimizer, param_groups
from .profile import channel_table, plot_channels, profile
from .state import CDDState
from .surgery import DGCSite, SurgeryError, insert_dgc
from . import rggr

__version__ = "0.1.0"

__all__ = [
    "CDDConfig", "ConfigError", "CDDState", "DGC", "DGCSite", "MergeError", "RGGROptimizer", "SurgeryError",
    "channel_table", "insert_dgc", "load_merged", "merge", "param_groups", "plot_channels", "profile", "rggr",
    "save_merged",
]


def __getattr__(name):  # the distiller pulls in more; import it on first use
    if name in ("CDDDistiller", "LossConfig"):
        from . import distill

        return getattr(distill, name)
    raise AttributeError(f"module 'cdd_plugin' has no attribute {name!r}")
