"""Shared set-up of the MMPretrain integration tests: the small configs, the drawn SOP set, a teacher
trained for one epoch, and the subprocess runner (fixtures ``market`` and ``setup`` are imported
by the test modules that use them)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from cdd_plugin.datasets import parse_market1501
from synthetic import write_sop

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MIM = str(BIN / "mim")
SOP_CONFIG = REPO / "configs" / "cdd_resnet50_sop.py"
TEACHER_CONFIG = REPO / "configs" / "teacher_resnet50_sop.py"
MARKET_CONFIG = REPO / "configs" / "cdd_resnet50_market.py"
ITERS_PER_EPOCH = 3  # 24 training images, P x K batches of 2 x 4

# -- small, real set-up ---------------------------------------------------------------------
# a narrow ResNet-18 (base 16 channels) at 64x32 keeps a CPU epoch to seconds
SMALL_MODEL = """
_enc = [dict(type='ResNet', depth=18, base_channels=16, stem_channels=16, init_cfg=None),
        dict(type='GlobalAveragePooling')]
_train = [dict(type='LoadImageFromFile'), dict(type='Resize', scale=(32, 64)),
          dict(type='RandomFlip', prob=0.5, direction='horizontal'), dict(type='PackInputs')]
_test = [dict(type='LoadImageFromFile'), dict(type='Resize', scale=(32, 64)), dict(type='PackInputs')]
train_dataloader = dict(batch_size=8, num_workers=0, dataset=dict(data_root={root!r}, pipeline=_train))
val_dataloader = dict(batch_size=16, num_workers=0, dataset=dict(data_root={root!r}, pipeline=_test))
test_dataloader = val_dataloader
val_evaluator = dict(topk=(1, 5))
test_evaluator = val_evaluator
train_cfg = dict(max_epochs=1, val_interval=1)
param_scheduler = []
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=1))
"""
TEACHER_TEXT = """_base_ = [{base!r}]
""" + SMALL_MODEL + """
model = dict(image_encoder=_enc, head=dict(num_classes=6, in_channels=128), data_preprocessor=dict(num_classes=6))
"""
CDD_TEXT = """_base_ = [{base!r}]
custom_imports = dict(imports=['cdd_plugin.integrations.mmpretrain', 'cdd_test_hooks'], allow_failed_imports=False)
""" + SMALL_MODEL + """
model = dict(image_encoder=_enc, head=dict(num_classes=6, in_channels=128), data_preprocessor=dict(num_classes=6),
             teacher=dict(checkpoint={teacher!r}), input_size=(64, 32),
             cdd=dict(queue_size=64, mask_start_epoch=0))
custom_hooks = [dict(type='CDDHook', latency_runs=2), dict(type='ZeroDGCChannelsHook')]
"""
# Test helper: a one-epoch run cannot drive DGC rows to exactly zero, so at a fresh start this
# hook zeroes (and masks) the first half of every DGC's channels; merge must then remove them.
HELPER_HOOK = '''
from mmengine.hooks import Hook
from mmpretrain.registry import HOOKS


@HOOKS.register_module()
class ZeroDGCChannelsHook(Hook):
    def before_train(self, runner):
        model = runner.model.module if hasattr(runner.model, 'module') else runner.model
        if model.cdd_state.iteration:  # resumed: masks come from the checkpoint
            return
        for dgc in model.cdd_state.compactors.values():
            half = list(range(dgc.channels // 2))
            dgc.zero_(half)
            dgc.mask[half] = 0.0
'''


@pytest.fixture(scope="module")
def market(synthetic_market):
    """The synthetic Market-1501 (conftest.py), parsed."""
    return parse_market1501(synthetic_market)


def _write_sop(root: Path, market=None) -> Path:
    """Six training and six test classes, four drawn JPEGs each, in SOP's on-disk format."""
    return write_sop(root)


def _run(args, cwd: Path, env_extra=None, timeout=300, expect_ok=True) -> str:
    env = dict(os.environ, **(env_extra or {}))
    env.setdefault("OMP_NUM_THREADS", "2")
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    if expect_ok and proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{out[-6000:]}")
    if not expect_ok:
        assert proc.returncode != 0, f"expected {args} to fail:\n{out[-3000:]}"
    return out


@pytest.fixture(scope="module")
def setup(market, tmp_path_factory):
    """The SOP-format fixture and a teacher trained for one epoch with the teacher config
    (in-process mmengine Runner: the CDD runs below are the ``mim`` subprocesses)."""
    import cdd_plugin.integrations.mmpretrain  # noqa: F401
    from mmengine.config import Config
    from mmengine.runner import Runner

    tmp = tmp_path_factory.mktemp("mmpretrain")
    sop = _write_sop(tmp / "sop", market)
    (tmp / "cdd_test_hooks.py").write_text(HELPER_HOOK)
    teacher_cfg = tmp / "teacher_small.py"
    teacher_cfg.write_text(TEACHER_TEXT.format(base=str(TEACHER_CONFIG), root=str(sop)))
    cfg = Config.fromfile(str(teacher_cfg))
    cfg.work_dir = str(tmp / "teacher")
    runner = Runner.from_cfg(cfg)
    runner.train()
    teacher = tmp / "teacher" / "epoch_1.pth"
    assert teacher.is_file()
    cdd_cfg = tmp / "cdd_small.py"
    cdd_cfg.write_text(CDD_TEXT.format(base=str(SOP_CONFIG), root=str(sop), teacher=str(teacher)))
    return SimpleNamespace(tmp=tmp, sop=sop, teacher=teacher, cdd_cfg=cdd_cfg, teacher_runner=runner,
                           env={"PYTHONPATH": str(tmp) + os.pathsep + os.environ.get("PYTHONPATH", "")})


