"""CDD for FastReID: config node, meta-architecture, trainer, hooks, IBN support, datasets.

Importing this package makes PyPI FastReID 1.4.0 usable on Python >= 3.10 / torch 2.x /
CPU (``compat.apply``), registers the ``CDDDistiller`` meta-architecture and the
``*Subset`` datasets. Command line (mirrors FastReID's ``tools/train_net.py``)::

    python -m cdd_plugin.integrations.fastreid.train_net --config-file configs/fastreid/cdd_R50_market.yml \\
        [--resume] [--eval-only] [--num-gpus N] [KEY VALUE ...]

See ``configs/fastreid/README.md``.
"""
from . import compat

compat.apply()

from .config import add_cdd_config, cdd_configs, check_device, load_config  # noqa: E402
from .datasets import register_subsets  # noqa: E402
from .hooks import CDDFinalizeHook, CDDLogHook, finalize  # noqa: E402
from .ibn import IBNPruner, PrunableIBN  # noqa: E402
from .meta_arch import CDDDistiller, build_dense_student, build_teacher  # noqa: E402
from .trainer import CDDTrainer  # noqa: E402

register_subsets()

__all__ = [
    "CDDDistiller", "CDDFinalizeHook", "CDDLogHook", "CDDTrainer", "IBNPruner", "PrunableIBN", "add_cdd_config",
    "build_dense_student", "build_teacher", "cdd_configs", "check_device", "finalize", "load_config",
    "register_subsets",
]


def cli_arch(spec: str, num_classes=None) -> dict:
    """``cdd profile / merge --arch fastreid:<config.yml>``: the dense student of a FastReID
    config (built on the CPU), with the input size, tracing forward and IBN pruner it needs."""
    from . import ibn
    from .meta_arch import analysis_forward, example_inputs

    cfg = load_config(spec, ["MODEL.DEVICE", "cpu"])
    model = build_dense_student(cfg, num_classes).eval()
    return {"model": model, "input": (3, *(int(s) for s in cfg.INPUT.SIZE_TEST)),
            "example_inputs": lambda batch: example_inputs(cfg, batch), "forward_fn": analysis_forward,
            "customized_pruners": ibn.customized_pruners()}
