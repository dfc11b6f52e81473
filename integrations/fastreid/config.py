"""The ``CDD:`` node of a FastReID config: defaults in one place, validation, conversion.

Every CDD setting lives under ``CDD`` (yacs keys in FastReID's upper-case style); the
compression keys map one to one onto ``cdd_plugin.CDDConfig`` and ``CDD.LOSS`` onto
``cdd_plugin.LossConfig``. ``add_cdd_config`` also adds ``DATASETS.ROOT`` and
``DATASETS.SUBSET_IDS`` (see ``datasets.py``). Defaults are the authors' (METHOD.md).

Units: ``CDD.MASK_START`` counts epochs when ``CDD.MASK_START_UNIT`` is ``"epoch"``
(the default, converted with the trainer's iterations per epoch) and optimizer
iterations when it is ``"iter"``; ``CDD.MASK_INTERVAL`` always counts iterations.
"""
from __future__ import annotations

import os
from dataclasses import fields
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from cdd_plugin import CDDConfig, ConfigError
from cdd_plugin.config import mask_start_iteration
from cdd_plugin.distill import LossConfig

# Every compression key under CDD is a CDDConfig field in upper case, every key under CDD.LOSS a
# LossConfig field: the defaults live in the dataclasses only. CDD.MASK_START (with its unit) stands
# for CDDConfig.mask_start; CDD.LOSS.PAIRS is a list of "student:teacher" strings (a dict in LossConfig).
COMPRESSION_KEYS = {f.name.upper(): f.name for f in fields(CDDConfig) if f.name != "mask_start"}
LOSS_KEYS = {f.name.upper(): f.name for f in fields(LossConfig)}
MASK_START_UNITS = ("epoch", "iter")


def add_cdd_config(cfg):
    """Add the ``CDD`` node (and ``DATASETS.ROOT`` / ``DATASETS.SUBSET_IDS``) with defaults; idempotent."""
    from fastreid.config import CfgNode as CN

    if "CDD" in cfg:
        return cfg
    frozen = cfg.is_frozen()
    cfg.defrost()
    _C = cfg
    _C.CDD = CN()
    # Teacher: a plain FastReID model (e.g. MODEL.META_ARCHITECTURE Baseline), frozen, never trained.
    _C.CDD.TEACHER = CN()
    _C.CDD.TEACHER.CONFIG = ""   # FastReID yaml the teacher was trained with
    _C.CDD.TEACHER.WEIGHTS = ""  # its checkpoint (OUTPUT_DIR/model_final.pth of the teacher run)
    # Optional FastReID checkpoint to initialise the heavy student with before surgery.
    _C.CDD.STUDENT_WEIGHTS = ""
    # Compression (cdd_plugin.CDDConfig) and losses (cdd_plugin.LossConfig): the dataclasses' defaults.
    comp, loss = CDDConfig(), LossConfig()
    for key, name in COMPRESSION_KEYS.items():
        _C.CDD[key] = getattr(comp, name)
    _C.CDD.MASK_START = 20      # in CDD.MASK_START_UNIT (the authors': epoch 20 of 120)
    _C.CDD.MASK_START_UNIT = "epoch"  # epoch | iter
    _C.CDD.LOSS = CN()
    for key, name in LOSS_KEYS.items():
        _C.CDD.LOSS[key] = [] if name == "pairs" else getattr(loss, name)
    # Logging and the end of training.
    _C.CDD.LOG_PERIOD = 1       # iterations between CDD figures in FastReID's EventStorage
    _C.CDD.EVAL_TEACHER = True  # evaluate the teacher for cdd_summary.json
    _C.CDD.LATENCY = True       # measure batch-1 latency of each model for cdd_summary.json
    # Datasets.
    if "ROOT" not in _C.DATASETS:
        _C.DATASETS.ROOT = ""   # folder with the datasets; "" = $FASTREID_DATASETS or "datasets"
    if "SUBSET_IDS" not in _C.DATASETS:
        _C.DATASETS.SUBSET_IDS = 0  # identities kept by the *Subset datasets
    if frozen:
        cfg.freeze()
    return cfg


def _flat(node, prefix: str = "") -> List[str]:
    out = []
    for k, v in node.items():
        if isinstance(v, dict):
            out.extend(_flat(v, f"{prefix}{k}."))
        else:
            out.append(f"{prefix}{k}")
    return out


def valid_cdd_keys() -> List[str]:
    from fastreid.config import get_cfg

    return ["CDD." + k for k in _flat(add_cdd_config(get_cfg()).CDD)]


def _unknown_error(unknown: Sequence[str], where: str) -> ConfigError:
    return ConfigError(f"unknown CDD setting(s) {sorted(unknown)} in {where}; valid keys are: "
                       f"{', '.join(valid_cdd_keys())}")


def check_cdd_keys(loaded: Dict[str, Any], where: str = "the config file") -> None:
    """Fail on unknown keys under ``CDD`` in a loaded yaml mapping, listing the valid ones."""
    node = loaded.get("CDD") if isinstance(loaded, dict) else None
    if node is None:
        return
    if not isinstance(node, dict):
        raise ConfigError(f"CDD in {where} must be a mapping of settings, got {node!r}")
    valid = set(valid_cdd_keys())
    unknown = [k for k in ("CDD." + f for f in _flat(node)) if k not in valid]
    if unknown:
        raise _unknown_error(unknown, where)


def check_cdd_opts(opts: Optional[Sequence[str]]) -> None:
    """Fail on unknown ``CDD.*`` keys in a KEY VALUE command-line list."""
    keys = list(opts or [])[0::2]
    valid = set(valid_cdd_keys())
    unknown = [k for k in keys if k.startswith("CDD.") and k not in valid]
    if unknown:
        raise _unknown_error(unknown, "the command line")


def load_config(config_file: str, opts: Optional[Sequence[str]] = None):
    """A FastReID config with the CDD node: defaults + ``config_file`` + ``KEY VALUE`` overrides (not frozen)."""
    from fastreid.config import CfgNode, get_cfg

    if not config_file:
        raise ConfigError("no config file given; pass --config-file configs/fastreid/<name>.yml")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"config file {config_file!r} not found (working directory {os.getcwd()}); pass "
                                "a path to an existing yaml, e.g. configs/fastreid/cdd_R50_market.yml")
    check_cdd_keys(CfgNode.load_yaml_with_base(config_file), f"{config_file}")
    check_cdd_opts(opts)
    cfg = add_cdd_config(get_cfg())
    cfg.merge_from_file(config_file)
    if opts:
        cfg.merge_from_list(list(opts))
    return cfg


def is_cdd(cfg) -> bool:
    return cfg.MODEL.META_ARCHITECTURE == "CDDDistiller"


def cdd_configs(cfg, iters_per_epoch: Optional[int] = None):
    """``(CDDConfig, LossConfig)`` from the CDD node; ``mask_start`` in iterations.

    With ``CDD.MASK_START_UNIT epoch`` the start is ``MASK_START * iters_per_epoch``; when
    ``iters_per_epoch`` is not known yet (the model is built before the trainer knows it)
    the start is provisional and ``CDDDistiller.resolve_schedule`` sets it.
    """
    node = cfg.CDD
    unit = str(node.MASK_START_UNIT)
    if unit not in MASK_START_UNITS:
        raise ConfigError(f"CDD.MASK_START_UNIT={unit!r} is invalid; use 'epoch' (CDD.MASK_START counts epochs) "
                          "or 'iter' (it counts optimizer iterations)")
    start = node.MASK_START
    if not isinstance(start, int) or isinstance(start, bool) or start < 0:
        raise ConfigError(f"CDD.MASK_START={start!r} must be an integer >= 0 (in CDD.MASK_START_UNIT={unit})")
    comp = {field: node[key] for key, field in COMPRESSION_KEYS.items()}
    comp["mask_start"] = start if unit == "iter" else (mask_start_iteration(start, iters_per_epoch)
                                                       if iters_per_epoch else 0)
    if comp["flops_target"] is not None and float(comp["flops_target"]) == 0.0:
        comp["flops_target"] = None
    loss = {field: node.LOSS[key] for key, field in LOSS_KEYS.items()}
    loss["pairs"] = parse_pairs(node.LOSS.PAIRS)
    try:
        return CDDConfig.from_dict(comp), LossConfig.from_dict(loss)
    except ConfigError as exc:
        raise ConfigError(f"invalid CDD setting in the config: {exc} (the yaml keys are upper case under CDD, "
                          f"e.g. CDD.K, CDD.LOSS.KD_WEIGHT)") from exc


def parse_pairs(pairs: Iterable[str]) -> Dict[str, str]:
    out = {}
    for p in pairs or []:
        if not isinstance(p, str) or p.count(":") != 1:
            raise ConfigError(f"CDD.LOSS.PAIRS entry {p!r} is invalid; write 'student_module:teacher_module', e.g. "
                              "'backbone.layer1.0.bn1:backbone.layer1.0.bn1'")
        s, t = (x.strip() for x in p.split(":"))
        out[s] = t
    return out


def check_device(cfg) -> None:
    """Fail early, naming the fix, when the config asks for CUDA on a machine without it."""
    dev = str(cfg.MODEL.DEVICE)
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"MODEL.DEVICE is {dev!r} but CUDA is not available on this machine "
                          "(torch.cuda.is_available() is False). Fix: set MODEL.DEVICE cpu, e.g. append "
                          "`MODEL.DEVICE cpu` to the command line.")
    if not torch.cuda.is_available():
        if cfg.SOLVER.AMP.ENABLED:
            raise ConfigError("SOLVER.AMP.ENABLED True needs CUDA (FastReID's AMPTrainer); set SOLVER.AMP.ENABLED "
                              "False on a CPU machine")
        if cfg.TEST.RERANK.ENABLED:
            raise ConfigError("TEST.RERANK.ENABLED True needs CUDA (FastReID's re-ranking uses faiss on the GPU); "
                              "set TEST.RERANK.ENABLED False on a CPU machine")


def teacher_paths(cfg) -> Tuple[str, str]:
    """``(config, weights)`` of the teacher, checked to exist, with errors that name the fix."""
    conf, weights = str(cfg.CDD.TEACHER.CONFIG), str(cfg.CDD.TEACHER.WEIGHTS)
    train_hint = ("train the teacher first with `python -m cdd_plugin.integrations.fastreid.train_net "
                  "--config-file <teacher yaml>` (it writes OUTPUT_DIR/model_final.pth)")
    if not conf:
        raise ConfigError("CDD.TEACHER.CONFIG is empty; set it to the FastReID yaml the teacher was trained with, "
                          "e.g. configs/fastreid/teacher_R50_market.yml")
    if not os.path.isfile(conf):
        raise FileNotFoundError(f"CDD.TEACHER.CONFIG {conf!r} not found (working directory {os.getcwd()}); set it "
                                "to the teacher's FastReID yaml")
    if not weights:
        raise ConfigError(f"CDD.TEACHER.WEIGHTS is empty; {train_hint}, then set CDD.TEACHER.WEIGHTS to that file")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"CDD.TEACHER.WEIGHTS {weights!r} not found (working directory {os.getcwd()}); "
                                f"{train_hint}, then set CDD.TEACHER.WEIGHTS to that file")
    return conf, weights
