"""Reliability of the MMPretrain / mmengine integration, with the real frameworks.

* atomic checkpoints: a checkpoint save that fails half-way through writing the file (the
  file-size limit of the process is lowered under the checkpoint's size, so the operating
  system refuses the rest of the write, as a full disk would) leaves the previous checkpoint
  and the ``last_checkpoint`` pointer intact, no partial file under the final name, and the
  work dir resumes;
* exact resume: a 1-epoch run resumed for a 2nd epoch ends with the masks, memory queues and
  weights of an uninterrupted 2-epoch run;
* distributed: 2 processes started by ``torchrun`` run MMPretrain's own ``tools/train.py
  --launcher pytorch`` with gloo on the CPU; both ranks hold the same masks and queues, and
  the queues hold the whole global batch in rank order.

The SOP-format fixture and the teacher come from ``test_mmpretrain.py``.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import os
import resource
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mmpretrain_helpers import ITERS_PER_EPOCH, REPO, _run, market, setup  # noqa: F401  (market, setup: fixtures)

ATOMIC = dict(backend="atomic_local")
_RUNS = itertools.count()


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """Let this process write files of at most ``nbytes``: a longer write fails half-way with
    EFBIG (Python ignores SIGXFSZ), after the first ``nbytes`` reached the file, as on a full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.fixture
def deterministic_restored():
    """mmengine's ``randomness.deterministic`` switches torch's deterministic algorithms on for the
    whole process; give the other tests the setting they had."""
    before = torch.are_deterministic_algorithms_enabled()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(before)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


# a CDD run of the small fixture without the helper hook that zeroes channels: the masks are RGGR's
RUN_TEXT = """_base_ = [{base!r}]
custom_imports = dict(imports=['cdd_plugin.integrations.mmpretrain', 'cdd_reliability_hooks'],
                      allow_failed_imports=False)
train_cfg = dict(max_epochs={epochs})
val_dataloader = None
val_evaluator = None
val_cfg = None
custom_hooks = [dict(type='CDDHook', evaluate=False, latency=False){extra_hooks}]
"""
# training without random transforms, one process, seeded and deterministic
DETERMINISTIC_TEXT = """
train_dataloader = dict(dataset=dict(pipeline=[
    dict(type='LoadImageFromFile'), dict(type='Resize', scale=(32, 64)),{flip} dict(type='PackInputs')]))
randomness = dict(seed={seed}, deterministic=True)
"""
FLIP = " dict(type='RandomFlip', prob=0.5, direction='horizontal'),"

RELIABILITY_HOOKS = '''
import os

import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmpretrain.registry import HOOKS


@HOOKS.register_module()
class FailingCheckpointWriteHook(Hook):
    """Before the ``fail_at``-th checkpoint save, lower the process's file-size limit under
    that checkpoint's expected size: the write then fails half-way (EFBIG)."""

    priority = "VERY_LOW"

    def __init__(self, fail_at=2, limit=4096):
        self.fail_at, self.limit, self.saves = fail_at, limit, 0

    def before_save_checkpoint(self, runner, checkpoint):
        import resource

        self.saves += 1
        if self.saves == self.fail_at:  # the test puts the limit back
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


@HOOKS.register_module()
class DumpCDDStateHook(Hook):
    """Records each rank's LOCAL teacher features given to CDDState.observe (before its
    all-gather; the real observe then runs) and its image paths per iteration; dumps them with the final masks, queues
    and DGC weights to <work_dir>/cdd_rank<r>.pth after training."""

    priority = "VERY_LOW"

    def before_train(self, runner):
        model = runner.model.module if hasattr(runner.model, "module") else runner.model
        state = model.cdd_state
        self.teacher, self.paths = [], []
        observe = state.observe

        def recording_observe(student_feats=None, teacher_feats=None):
            self.teacher.append({n: t.detach().cpu().clone() for n, t in (teacher_feats or {}).items()})
            return observe(student_feats, teacher_feats)

        state.observe = recording_observe

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.paths.append([s.img_path for s in data_batch["data_samples"]])

    def after_train(self, runner):
        model = runner.model.module if hasattr(runner.model, "module") else runner.model
        state = model.cdd_state
        torch.save({"rank": get_rank(), "iteration": state.iteration,
                    "masks": {n: m.detach().cpu().clone() for n, m in state.masks().items()},
                    "queues": {n: q.state_dict() for n, q in state.queues.items()},
                    "dgc": {n: d.weight.detach().cpu().clone() for n, d in state.compactors.items()},
                    "local_teacher": self.teacher, "paths": self.paths},
                   os.path.join(runner.work_dir, f"cdd_rank{get_rank()}.pth"))
'''


@pytest.fixture(scope="module")
def rel(setup):
    (setup.tmp / "cdd_reliability_hooks.py").write_text(RELIABILITY_HOOKS)
    return setup


def _write_cfg(rel, name: str, epochs: int, extra_hooks: str = "", extra: str = "") -> Path:
    path = rel.tmp / f"{name}.py"
    path.write_text(RUN_TEXT.format(base=str(rel.cdd_cfg), epochs=epochs, extra_hooks=extra_hooks) + extra)
    return path


def _runner(rel, cfg_path: Path, work: Path, monkeypatch, **changes):
    import cdd_plugin.integrations.mmpretrain  # noqa: F401
    from mmengine.config import Config
    from mmengine.runner import Runner

    monkeypatch.syspath_prepend(str(rel.tmp))  # the configs' custom_imports name the test hooks
    cfg = Config.fromfile(str(cfg_path))
    cfg.work_dir = str(work)
    # mmengine keys its logger, visualizer and message hub by experiment name (config name +
    # a timestamp in seconds): runners built within one second must not share them
    cfg.experiment_name = f"{cfg_path.stem}_{next(_RUNS)}_{time.strftime('%H%M%S')}"
    cfg.merge_from_dict(changes)
    return Runner.from_cfg(cfg)


# -- 1. atomic checkpoints ----------------------------------------------------------------------
def test_configs_write_checkpoints_through_the_atomic_backend():
    import mmengine.hooks.checkpoint_hook as ckpt_hook
    from mmengine.config import Config
    from mmengine.fileio import get_file_backend

    from cdd_plugin.integrations.mmpretrain import AtomicLocalBackend, compat

    for name in ("cdd_resnet50_sop.py", "teacher_resnet50_sop.py", "cdd_resnet50_market.py"):
        cfg = Config.fromfile(str(REPO / "configs" / name), import_custom_modules=False)
        assert cfg.default_hooks.checkpoint.backend_args == ATOMIC, name
    assert type(get_file_backend("/x", backend_args=ATOMIC)) is AtomicLocalBackend
    assert ckpt_hook.open is compat._pointer_open and "checkpoint_pointer_atomic" in compat.APPLIED


def test_interrupted_checkpoint_save_keeps_the_previous_one_and_resumes(rel, tmp_path, monkeypatch):
    cfg = _write_cfg(rel, "cdd_fail_save", epochs=2,
                     extra_hooks=", dict(type='FailingCheckpointWriteHook', fail_at=2, limit=1 << 20)")
    work = tmp_path / "work"
    runner = _runner(rel, cfg, work, monkeypatch)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        with pytest.raises(OSError) as info:
            runner.train()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert info.value.errno == errno.EFBIG  # the write of epoch_2.pth was cut at 1 MiB
    from cdd_plugin.integrations.mmpretrain import AtomicLocalBackend

    hook = next(h for h in runner.hooks if type(h).__name__ == "CheckpointHook")
    assert type(hook.file_backend) is AtomicLocalBackend  # the config's backend_args reached mmengine
    first = work / "epoch_1.pth"
    assert first.stat().st_size > 1 << 20  # the limit really falls inside the checkpoint
    assert not (work / "epoch_2.pth").exists()
    assert sorted(p.name for p in work.iterdir() if p.name.startswith(".")) == []  # no temporary file left
    assert (work / "last_checkpoint").read_text() == str(first)
    umask = os.umask(0)
    os.umask(umask)
    assert first.stat().st_mode & 0o777 == 0o666 & ~umask  # the mode of a plain open(), not mkstemp's 0600
    ckpt = torch.load(first, map_location="cpu")  # weights_only=True + the plug-in's allow-list
    assert ckpt["meta"]["epoch"] == 1 and ckpt["optimizer"]["cdd"]["iteration"] == ITERS_PER_EPOCH
    assert {"python", "numpy", "torch"} <= set(ckpt["cdd_rng"])  # CDDHook's generator states load safely too

    # resume=True with no checkpoint named: mmengine follows last_checkpoint
    resumed = _runner(rel, cfg, work, monkeypatch, resume=True, custom_hooks=[
        dict(type="CDDHook", evaluate=False, latency=False)])
    resumed.train()
    assert resumed.iter == 2 * ITERS_PER_EPOCH
    second = torch.load(work / "epoch_2.pth", map_location="cpu")
    assert second["meta"]["epoch"] == 2 and second["optimizer"]["cdd"]["iteration"] == 2 * ITERS_PER_EPOCH
    assert (work / "last_checkpoint").read_text() == str(work / "epoch_2.pth")


def test_failed_overwrite_keeps_the_old_file_where_mmengine_default_loses_it(rel, tmp_path, monkeypatch):
    cfg = _write_cfg(rel, "cdd_overwrite", epochs=1)
    runner = _runner(rel, cfg, tmp_path / "work", monkeypatch, default_hooks=dict(checkpoint=dict(interval=100)))
    runner.train()  # builds everything; no checkpoint (interval 100)
    out = tmp_path / "ckpts"
    runner.save_checkpoint(str(out), "model.pth", backend_args=ATOMIC)
    runner.save_checkpoint(str(out), "default.pth")  # mmengine's LocalBackend
    path, default = out / "model.pth", out / "default.pth"
    digest, size = _sha(path), path.stat().st_size
    for name, args in (("model.pth", ATOMIC), ("default.pth", None)):
        with file_size_limit(size // 2), pytest.raises(OSError):
            runner.save_checkpoint(str(out), name, backend_args=args)
    assert _sha(path) == digest and "cdd" in torch.load(path, map_location="cpu")["optimizer"]
    assert sorted(p.name for p in out.iterdir()) == ["default.pth", "model.pth"]  # no temporary file left
    # the control: the same failure through mmengine's own backend truncated the old checkpoint
    assert default.stat().st_size == size // 2


def test_last_checkpoint_pointer_write_is_atomic(tmp_path):
    import mmengine.hooks.checkpoint_hook as ckpt_hook

    import cdd_plugin.integrations.mmpretrain  # noqa: F401

    pointer = tmp_path / "last_checkpoint"
    pointer.write_text(str(tmp_path / "epoch_1.pth"))
    long = str(tmp_path / ("x" * 200) / "epoch_2.pth")
    with file_size_limit(16), pytest.raises(OSError):
        with ckpt_hook.open(str(pointer), "w") as f:  # what CheckpointHook runs
            f.write(long)
    assert pointer.read_text() == str(tmp_path / "epoch_1.pth")
    with file_size_limit(16), pytest.raises(OSError):
        with open(str(tmp_path / "plain"), "w") as f:  # the builtin it replaces: a truncated pointer
            f.write(long)
    assert len((tmp_path / "plain").read_text()) == 16
    with ckpt_hook.open(str(pointer), "w") as f:
        f.write(long)
    assert pointer.read_text() == long and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# -- 3. exact resume -------------------------------------------------------------------------------
def _final_state(runner):
    model = runner.model.module if hasattr(runner.model, "module") else runner.model
    state = model.cdd_state
    return SimpleNamespace(
        weights={k: v.detach().clone() for k, v in model.state_dict().items()},
        masks={n: m.clone() for n, m in state.masks().items()},
        queues={n: q.state_dict() for n, q in state.queues.items()},
        iteration=state.iteration,
        momentum={k: v["momentum_buffer"].clone()
                  for k, v in runner.optim_wrapper.optimizer.state_dict()["state"].items()
                  if v.get("momentum_buffer") is not None})


@pytest.mark.parametrize("variant", ["fixed_pipeline_seeded", "random_flip_unseeded"])
def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(rel, tmp_path, monkeypatch,
                                                                    deterministic_restored, variant):
    """Uninterrupted 2 epochs vs 1 epoch + ``resume=True`` for the 2nd, in-process, CPU, num_workers=0,
    deterministic algorithms: same masks, queues, momentum and bit-identical weights (``torch.equal``:
    the same operations on the same data in the same order give the same bits on one machine).

    ``fixed_pipeline_seeded``: no random transform, ``randomness.seed=7``. ``random_flip_unseeded``: a
    ``RandomFlip`` drawing from NumPy's global generator and ``randomness.seed=None`` (mmpretrain's
    default): the resumed process draws a fresh seed and builds its sampler with it before loading the
    checkpoint, so the run is exact only because CDDHook restores the generator states and re-seeds
    ``PKBatchSampler`` with the checkpoint's seed (without either the masks already differ). The
    uninterrupted run uses the seed the interrupted one drew."""
    flip = variant == "random_flip_unseeded"
    seed = None if flip else 7
    cfg = _write_cfg(rel, f"cdd_exact_{variant}", epochs=2,
                     extra=DETERMINISTIC_TEXT.format(flip=FLIP if flip else "", seed=seed))
    t0 = time.perf_counter()
    half = _runner(rel, cfg, tmp_path / "half", monkeypatch, train_cfg=dict(max_epochs=1))
    half.train()
    drawn = half.seed
    resumed = _runner(rel, cfg, tmp_path / "half", monkeypatch, resume=True)
    resumed.train()
    b = _final_state(resumed)
    full = _runner(rel, cfg, tmp_path / "full", monkeypatch, randomness=dict(seed=drawn))
    full.train()
    a = _final_state(full)
    print(f"exact resume ({variant}): 3 runs in {time.perf_counter() - t0:.1f} s")
    if flip:
        assert resumed.train_dataloader.batch_sampler.seed == drawn
    assert a.iteration == b.iteration == 2 * ITERS_PER_EPOCH
    masked = sum(int((m == 0).sum()) for m in a.masks.values())
    print(f"masked channels after 2 epochs: {masked} of {sum(m.numel() for m in a.masks.values())}")
    assert masked > 0
    for n in a.masks:
        assert torch.equal(a.masks[n], b.masks[n]), n
        qa, qb = a.queues[n], b.queues[n]
        assert (qa["ptr"], qa["count"]) == (qb["ptr"], qb["count"]) and torch.equal(qa["data"], qb["data"]), n
    assert a.momentum.keys() == b.momentum.keys() and all(torch.equal(a.momentum[k], b.momentum[k]) for k in a.momentum)
    diff = {k: (a.weights[k].double() - b.weights[k].double()).abs().max().item()
            for k in a.weights if a.weights[k].is_floating_point()}
    worst = max(diff, key=diff.get)
    print(f"largest weight difference: {diff[worst]:.3g} ({worst})")
    assert a.weights.keys() == b.weights.keys()
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights), (worst, diff[worst])


# -- 2. distributed: torchrun, 2 processes, gloo, CPU ---------------------------------------------
DIST_EPOCHS = 3  # 24 images, P x K batches of 8: one batch per rank and epoch, a global batch of 16
DIST_TEXT = """
env_cfg = dict(dist_cfg=dict(backend='gloo'))
train_cfg = dict(max_epochs={epochs})
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval={epochs}))
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("launch", ["torchrun", "mim"])
def test_two_cpu_processes_share_masks_and_the_global_batch_queue(rel, tmp_path, launch):
    """``torchrun --nproc_per_node 2 <mmpretrain>/.mim/tools/train.py CONFIG --launcher pytorch``, and
    ``mim train mmpretrain CONFIG --launcher pytorch --gpus 2`` (mim starts the same script with
    ``torch.distributed.launch``; ``--gpus`` is its process count), gloo on the CPU."""
    import mmpretrain

    train_py = Path(mmpretrain.__file__).parent / ".mim" / "tools" / "train.py"
    assert train_py.is_file()
    cfg = _write_cfg(rel, "cdd_dist", epochs=DIST_EPOCHS, extra_hooks=", dict(type='DumpCDDStateHook')",
                     extra=DIST_TEXT.format(epochs=DIST_EPOCHS))
    work = tmp_path / "work"
    port = str(_free_port())
    if launch == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", port, str(train_py), str(cfg), "--launcher", "pytorch",
               "--work-dir", str(work)]
    else:
        cmd = [str(Path(sys.executable).parent / "mim"), "train", "mmpretrain", str(cfg), "--launcher", "pytorch",
               "--gpus", "2", "--port", port, "--work-dir", str(work)]
    t0 = time.perf_counter()
    log = _run(cmd, cwd=rel.tmp, env_extra=dict(rel.env, OMP_NUM_THREADS="1"), timeout=600)
    print(f"{launch}, 2 processes, gloo: {time.perf_counter() - t0:.1f} s")
    assert "Distributed training: True" in log and "Distributed launcher: pytorch" in log
    ranks = [torch.load(work / f"cdd_rank{r}.pth", map_location="cpu") for r in (0, 1)]
    r0, r1 = ranks
    iters = DIST_EPOCHS
    global_batch = 2 * 8
    assert r0["rank"] == 0 and r1["rank"] == 1 and r0["iteration"] == r1["iteration"] == iters
    # (a) one set of masks and queues
    for n in r0["masks"]:
        assert torch.equal(r0["masks"][n], r1["masks"][n]), n
        assert torch.equal(r0["queues"][n]["data"], r1["queues"][n]["data"]), n
        assert torch.equal(r0["dgc"][n], r1["dgc"][n]), n  # DDP kept the weights in step
    # (b) the queues hold the whole global batch of every iteration, rank 0's rows first
    assert len(r0["local_teacher"]) == len(r1["local_teacher"]) == iters
    for n, q in r0["queues"].items():
        assert q["count"] == iters * global_batch and q["ptr"] == iters * global_batch % q["size"], n
        for i in range(iters):
            t0_i, t1_i = r0["local_teacher"][i][n], r1["local_teacher"][i][n]
            assert t0_i.shape[0] == t1_i.shape[0] == 8
            rows = q["data"][i * global_batch:(i + 1) * global_batch]
            assert torch.equal(rows, torch.cat([t0_i, t1_i]).float()), (n, i)
    # (c) the two ranks trained on different images (each rank draws its own P x K batches, so on this
    # 6-identity fixture both may draw the same identities at some iteration, but not at all of them)
    assert any(sorted(r0["paths"][i]) != sorted(r1["paths"][i]) for i in range(iters))
    assert any(not torch.equal(r0["local_teacher"][i][n], r1["local_teacher"][i][n])
               for i in range(iters) for n in r0["masks"])
    # (d) RGGR masked channels (no helper zeroes any here)
    masked = sum(int((m == 0).sum()) for m in r0["masks"].values())
    total = sum(m.numel() for m in r0["masks"].values())
    print(f"masked channels: {masked} of {total}")
    assert masked > 0


def test_cpu_distributed_patches_are_applied_and_needed(tmp_path, monkeypatch):
    """Without CUDA the two launcher patches are in place, idempotent, and each fixes a real
    failure of mmengine's own code (the original functions, kept as ``__wrapped__``, still fail)."""
    import torch.distributed as dist
    from mmengine.dist import utils as dist_utils
    from mmengine.model import MMDistributedDataParallel

    from cdd_plugin.integrations.mmpretrain import compat

    if compat.accelerator_available():
        assert not {"dist_init_without_cuda", "ddp_without_device_ids_on_cpu"} & set(compat.APPLIED)
        pytest.skip("an accelerator is present: the CPU launcher patches are (rightly) not applied")
    assert compat.apply() == compat.APPLIED == [
        "checkpoint_pointer_atomic", "dist_init_without_cuda", "ddp_without_device_ids_on_cpu"]
    init, ddp_init = dist_utils._init_dist_pytorch, MMDistributedDataParallel.__init__
    compat.apply()
    assert dist_utils._init_dist_pytorch is init and MMDistributedDataParallel.__init__ is ddp_init  # no re-wrap
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises((RuntimeError, AssertionError)):  # mmengine's own: torch.cuda.set_device(LOCAL_RANK)
        init.__wrapped__("gloo")
    with pytest.raises(RuntimeError, match=r"env_cfg = dict\(dist_cfg=dict\(backend='gloo'\)\)"):
        init("nccl")

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        net = torch.nn.Linear(3, 2)
        with pytest.raises(ValueError, match="device_ids"):  # torch refuses device_ids for a CPU module
            ddp_init.__wrapped__(MMDistributedDataParallel.__new__(MMDistributedDataParallel), module=net,
                                 device_ids=[0])
        wrapped = MMDistributedDataParallel(module=net, device_ids=[0], broadcast_buffers=False)
        assert wrapped.device_ids is None and wrapped(torch.ones(1, 3)).shape == (1, 2)
    finally:
        dist.destroy_process_group()
