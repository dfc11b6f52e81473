"""Train / evaluate FastReID models with CDD; the flags of FastReID's ``tools/train_net.py``.

    python -m cdd_plugin.integrations.fastreid.train_net --config-file configs/fastreid/cdd_R50_market.yml \\
        [--resume] [--eval-only] [--num-gpus N] [KEY VALUE ...]

* A plain FastReID config (e.g. a teacher's) trains exactly as FastReID would.
* ``MODEL.META_ARCHITECTURE CDDDistiller`` with a ``CDD:`` node distils into a heavy
  student while compressing it; at the end ``OUTPUT_DIR`` holds ``model_final.pth``
  (training checkpoint), ``model_merged.pth`` (the merged, narrower student) and
  ``cdd_summary.json``.
* ``--eval-only`` evaluates ``MODEL.WEIGHTS``: a FastReID checkpoint, or a merged
  ``model_merged.pth`` (the narrow student is rebuilt from the config and the file).
* ``--resume`` continues from ``OUTPUT_DIR/last_checkpoint``, CDD state included.
* ``--num-gpus N`` starts N processes through FastReID's ``launch`` (NCCL on GPUs; on a
  machine without CUDA, with ``MODEL.DEVICE cpu``, N CPU processes joined by gloo).
"""
from __future__ import annotations

import logging
import os
import sys

from . import compat

compat.apply()

import torch  # noqa: E402
from fastreid.engine import default_argument_parser, default_setup, launch  # noqa: E402
from fastreid.utils import comm  # noqa: E402
from fastreid.utils.checkpoint import Checkpointer  # noqa: E402
from fastreid.utils.logger import setup_logger  # noqa: E402

import cdd_plugin  # noqa: E402
from cdd_plugin import ConfigError  # noqa: E402
from cdd_plugin.export import read_merged  # noqa: E402

from .config import check_device, load_config  # noqa: E402
from .meta_arch import build_dense_student  # noqa: E402
from .trainer import CDDTrainer  # noqa: E402

logger = logging.getLogger("fastreid.cdd")


def setup(args):
    """Config from ``--config-file`` and ``KEY VALUE`` overrides, checked, frozen; FastReID's default setup."""
    cfg = load_config(args.config_file, args.opts)
    if args.eval_only:
        cfg.MODEL.BACKBONE.PRETRAIN = False  # the weights come from MODEL.WEIGHTS
    check_device(cfg)
    if args.num_gpus > 1 and not torch.cuda.is_available():
        logger.info("--num-gpus %d without CUDA: %d CPU processes joined by the gloo backend", args.num_gpus,
                    args.num_gpus)
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="cdd_plugin")  # the core's messages
    return cfg


def is_merged_file(path: str) -> bool:
    """True for a file written by ``cdd_plugin.save_merged`` (checked by content, not by name)."""
    try:
        read_merged(path)
        return True
    except (ValueError, FileNotFoundError):
        return False


def build_eval_model(cfg):
    """The model ``--eval-only`` evaluates: the narrow merged student, or the config's model + checkpoint."""
    path = str(cfg.MODEL.WEIGHTS)
    if not path:
        raise SystemExit("--eval-only needs MODEL.WEIGHTS: append `MODEL.WEIGHTS path/to/model_final.pth` (or "
                         "model_merged.pth) to the command line")
    if is_merged_file(path):
        meta = read_merged(path).get("meta", {})
        num_classes = meta.get("num_classes")
        if num_classes is None:
            num_classes = int(read_merged(path)["state_dict"]["heads.weight"].shape[0])
        model = cdd_plugin.load_merged(path, build_dense_student(cfg, num_classes=num_classes))
        logger.info("Loaded the merged student from %s (%s parameters)", path,
                    f"{sum(p.numel() for p in model.parameters()):,}")
        return model.to(torch.device(cfg.MODEL.DEVICE))
    if cfg.MODEL.HEADS.NUM_CLASSES == 0 and os.path.isfile(path):  # auto-scaled classes: read them from the file
        sd = Checkpointer(torch.nn.Identity())._load_file(path)
        sd = sd.get("model", sd) if isinstance(sd, dict) else {}
        head = next((v for k, v in sd.items() if k.endswith("heads.weight") and "teacher" not in k), None)
        if head is not None:
            cfg = cfg.clone()
            cfg.defrost()
            cfg.MODEL.HEADS.NUM_CLASSES = int(head.shape[0])
            cfg.freeze()
    model = CDDTrainer.build_model(cfg)
    Checkpointer(model).load(path)
    return model


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = build_eval_model(cfg)
        return CDDTrainer.test(cfg, model)
    CDDTrainer.config_file = args.config_file
    trainer = CDDTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def cli(argv=None):
    args = default_argument_parser().parse_args(argv)
    print("Command Line Args:", args)
    try:
        return launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
                      dist_url=args.dist_url, args=(args,))
    except (ConfigError, FileNotFoundError) as exc:  # a setting to fix: say which, without a traceback
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    cli(sys.argv[1:])
