"""MMPretrain / mmengine integration, run for real.

``mim train`` / ``mim test`` run as subprocesses (the venv's ``mim``) on a small
Stanford-Online-Products-format fixture written into a tmp dir from real Market-1501
images (a few identities, 64x32 input, a narrow ResNet-18 teacher and student, one short
epoch); the error messages and the optimizer wrappers are checked in-process on real
MMPretrain models.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import cdd_plugin
from synthetic import write_market1501

from mmpretrain_helpers import (CDD_TEXT, HELPER_HOOK, ITERS_PER_EPOCH, MARKET_CONFIG, MIM, REPO, SOP_CONFIG,  # noqa: F401
                                TEACHER_CONFIG, TEACHER_TEXT, _run, _write_sop, market, setup)


def test_teacher_config_trains_an_embedding_retriever_evaluated_with_sop_recall(setup):
    runner = setup.teacher_runner
    assert type(runner.model).__name__ == "EmbeddingRetriever"
    metrics = runner.message_hub.get_scalar("val/retrieval/Recall@1").current()
    assert 0.0 <= metrics <= 100.0
    keys = torch.load(setup.teacher, map_location="cpu")["state_dict"].keys()
    assert any(k.startswith("image_encoder.") for k in keys) and any(k.startswith("head.") for k in keys)


@pytest.fixture(scope="module")
def cdd_run(setup):
    work = setup.tmp / "cdd"
    log = _run([MIM, "train", "mmpretrain", str(setup.cdd_cfg), "--work-dir", str(work)], cwd=setup.tmp,
               env_extra=setup.env)
    summary = json.loads((work / "cdd_summary.json").read_text())
    return SimpleNamespace(dir=work, log=log, summary=summary, rows={r["name"]: r for r in summary["rows"]})


@pytest.fixture(scope="module")
def small_cfg(setup):
    import cdd_plugin.integrations.mmpretrain  # noqa: F401  (registers the plug-in)
    from mmengine.config import Config

    return Config.fromfile(str(setup.cdd_cfg), import_custom_modules=False)


def _build(cfg, **changes):
    from mmpretrain.registry import MODELS

    model_cfg = cfg.model.to_dict()
    model_cfg.update(changes)  # replaces whole entries
    return MODELS.build(model_cfg)


# -- mim train / test ------------------------------------------------------------------------
def test_mim_train_writes_merged_model_and_summary(cdd_run):
    s = cdd_run.summary
    assert (cdd_run.dir / "model_merged.pth").is_file() and (cdd_run.dir / "epoch_1.pth").is_file()
    assert s["schema"] == "cdd_summary/v1" and s["framework"] == "mmpretrain"
    assert s["config"].endswith("cdd_small.py") and s["iterations"] == ITERS_PER_EPOCH
    assert [r["name"] for r in s["rows"]] == ["teacher", "student_unmerged", "student_merged"]
    for row in s["rows"]:
        assert set(row) - {"folded"} == {"name", "metrics", "params", "flops", "latency_ms"}
        assert set(row["metrics"]) == {"Recall@1", "Recall@5"}
        assert all(0.0 <= v <= 100.0 for v in row["metrics"].values())
        assert isinstance(row["latency_ms"], float) and row["latency_ms"] > 0
    assert s["cdd"]["iteration"] == ITERS_PER_EPOCH
    assert isinstance(s["predicted_flops"], int) and isinstance(s["flops_reduction"], float)


def test_cdd_profile_reads_the_merged_file_with_the_mmpretrain_config(setup, cdd_run):
    """`cdd profile --arch mmpretrain:<config>` rebuilds the narrow student and counts what the summary says."""
    out = _run([sys.executable, "-m", "cdd_plugin.app", "profile", str(cdd_run.dir / "model_merged.pth"), "--arch",
                f"mmpretrain:{setup.cdd_cfg}", "--json"], cwd=setup.tmp, env_extra=setup.env)
    result = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])  # warnings follow
    assert result["flops"] == cdd_run.rows["student_merged"]["flops"]
    assert result["flops"] < cdd_run.rows["student_unmerged"]["flops"]


def test_merge_removes_the_zeroed_channels_and_keeps_the_metrics(cdd_run):
    s, merged, unmerged = cdd_run.summary, cdd_run.rows["student_merged"], cdd_run.rows["student_unmerged"]
    # the helper zeroed half of every DGC's channels: exactly those are gone. With the authors' placement a
    # ResNet-18 has one site per basic block (conv1's output): half of conv1's outputs and conv2's inputs
    assert s["cdd"]["channels_kept"] == s["cdd"]["channels_total"] // 2
    assert merged["params"] < unmerged["params"] and s["flops_reduction"] > 0.2 and s["params_reduction"] > 0.1
    assert s["predicted_flops"] == merged["flops"]  # the state's prediction is the merged model's real count
    for k in ("Recall@1", "Recall@5"):
        assert abs(merged["metrics"][k] - unmerged["metrics"][k]) <= 0.1


def test_training_logs_cdd_figures_and_losses(cdd_run):
    assert "CDD surgery:" in cdd_run.log and "CDD results:" in cdd_run.log
    scalars = next(cdd_run.dir.glob("*/vis_data/scalars.json")).read_text().splitlines()
    train = [json.loads(line) for line in scalars if '"loss"' in line]
    assert train, "no training records in the visualizer backend"
    for key in ("loss_id", "loss_triplet", "loss_kd", "loss_feat", "cdd_sparsity", "cdd_channels_active",
                "cdd_channels_kept", "cdd_flops_ratio", "cdd_mflops_merged"):
        assert key in train[-1], key
    # cdd_sparsity is a logged figure, not part of the optimised loss
    last = train[-1]
    assert last["loss"] == pytest.approx(sum(last[k] for k in ("loss_id", "loss_triplet", "loss_kd", "loss_feat")),
                                         rel=1e-3)
    assert last["cdd_channels_active"] == cdd_run.summary["cdd"]["channels_total"] // 2


def test_mim_test_evaluates_the_merged_checkpoint(setup, cdd_run):
    out = _run([MIM, "test", "mmpretrain", str(setup.cdd_cfg), "--checkpoint", str(cdd_run.dir / "model_merged.pth"),
                "--work-dir", str(setup.tmp / "test_merged")], cwd=setup.tmp, env_extra=setup.env)
    assert "rebuilt the merged student" in out
    assert "size mismatch" not in out and "missing keys" not in out and "unexpected key" not in out
    got = float(re.findall(r"retrieval/Recall@1: ([0-9.]+)", out)[-1])
    assert got == pytest.approx(cdd_run.rows["student_merged"]["metrics"]["Recall@1"], abs=1e-3)


def test_resume_restores_masks_queues_and_schedule(setup, cdd_run):
    work = setup.tmp / "resumed"
    work.mkdir()
    first = work / "epoch_1.pth"
    shutil.copy(cdd_run.dir / "epoch_1.pth", first)
    log = _run([MIM, "train", "mmpretrain", str(setup.cdd_cfg), "--work-dir", str(work), "--resume", str(first),
                "--cfg-options", "train_cfg.max_epochs=2", "train_cfg.val_interval=10", "custom_hooks.0.latency=False",
                "custom_hooks.0.evaluate=False"],
               cwd=setup.tmp, env_extra=setup.env)
    assert f"schedule position {ITERS_PER_EPOCH}" in log
    import cdd_plugin.integrations.mmpretrain  # noqa: F401  (allow-lists what mmengine checkpoints hold)

    ckpt1 = torch.load(first, map_location="cpu")  # torch's default: weights_only=True
    ckpt2 = torch.load(work / "epoch_2.pth", map_location="cpu")
    cdd1, cdd2 = ckpt1["optimizer"]["cdd"], ckpt2["optimizer"]["cdd"]
    assert cdd2["iteration"] == 2 * ITERS_PER_EPOCH
    for name, mask in cdd1["masks"].items():
        zeroed = mask == 0
        assert zeroed.any() and bool((cdd2["masks"][name][zeroed] == 0).all()), name
        queue = cdd2["queues"][name]
        assert queue["count"] == min(queue["size"], 2 * ITERS_PER_EPOCH * 8)
    assert json.loads((work / "cdd_summary.json").read_text())["iterations"] == 2 * ITERS_PER_EPOCH


# -- checkpoints and weights_only -------------------------------------------------------------
def test_mmengine_checkpoints_need_the_allow_list_and_nothing_more(cdd_run, tmp_path):
    ckpt = cdd_run.dir / "epoch_1.pth"
    bare = subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(ckpt)!r})"], capture_output=True,
                          text=True)
    assert bare.returncode != 0 and "weights_only" in bare.stderr.replace("Weights only", "weights_only")
    from cdd_plugin.integrations.mmpretrain import MMENGINE_SAFE_GLOBALS

    assert torch.load(ckpt, map_location="cpu")["meta"]["epoch"] == 1
    names = {name for _, name in MMENGINE_SAFE_GLOBALS}
    assert "builtins.getattr" in names
    from mmengine.logging import HistoryBuffer

    class Sneaky:  # a pickle asking getattr for anything but a HistoryBuffer statistics method
        def __reduce__(self):
            return getattr, (HistoryBuffer, "update")

    torch.save({"x": Sneaky()}, tmp_path / "sneaky.pth")
    with pytest.raises(Exception, match="refusing getattr"):
        torch.load(tmp_path / "sneaky.pth")


# -- bad input --------------------------------------------------------------------------------
def test_config_without_teacher_names_the_fix(small_cfg):
    from mmpretrain.registry import MODELS

    model_cfg = small_cfg.model.copy()
    model_cfg.pop("teacher")
    with pytest.raises(ValueError, match=r"needs a teacher.*model\.teacher=dict\(checkpoint="):
        MODELS.build(model_cfg)


def test_teacher_checkpoint_that_does_not_fit_names_the_fix(small_cfg, setup, tmp_path):
    model = _build(small_cfg, teacher=dict(checkpoint=str(setup.teacher), image_encoder=[
        dict(type="ResNet", depth=18, base_channels=8, stem_channels=8, init_cfg=None),
        dict(type="GlobalAveragePooling")], head=dict(type="LinearClsHead", num_classes=6, in_channels=64)))
    with pytest.raises(ValueError, match=r"does not fit model\.teacher.*shape mismatch.*Fix:"):
        model.init_weights()
    model.teacher_checkpoint = str(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="train the teacher first"):
        model.init_weights()


def test_init_weights_restores_dgc_identity_and_loads_a_frozen_teacher(small_cfg, setup):
    model = _build(small_cfg)
    dgcs = list(model.cdd_state.compactors.values())
    for dgc in dgcs:
        torch.nn.init.normal_(dgc.weight)  # what an init_cfg matching the DGC would do
    model.init_weights()
    assert all(torch.equal(d.weight.detach(), torch.eye(d.channels)) for d in dgcs)
    saved = torch.load(setup.teacher, map_location="cpu")["state_dict"]
    teacher = model.teacher.state_dict()
    assert all(torch.equal(teacher[k], saved[k]) for k in teacher)
    model.train()
    assert not model.teacher.training and model.image_encoder.training
    assert not any(p.requires_grad for p in model.teacher.parameters())


def test_sync_bn_conversion_that_drops_the_dgcs_is_refused(small_cfg):
    from mmengine.model.utils import convert_sync_batchnorm

    from cdd_plugin.integrations.mmpretrain.hooks import _check_dgcs_applied

    model = _build(small_cfg)
    _check_dgcs_applied(model)
    model.image_encoder = convert_sync_batchnorm(model.image_encoder)  # what sync_bn does under DDP
    with pytest.raises(RuntimeError, match="remove sync_bn"):
        _check_dgcs_applied(model)


def test_sop_lists_with_a_wrong_header_or_a_missing_image_are_refused(setup, tmp_path):
    import cdd_plugin.integrations.mmpretrain  # noqa: F401
    from mmpretrain.registry import DATASETS

    bad = tmp_path / "sop"
    shutil.copytree(setup.sop, bad)
    train = (bad / "Ebay_train.txt").read_text()
    (bad / "Ebay_train.txt").write_text(train.replace("image_id class_id super_class_id path", "id class path"))
    with pytest.raises(ValueError, match=r"Ebay_train\.txt:1: header"):
        DATASETS.build(dict(type="StanfordOnlineProducts", data_root=str(bad), split="train"))
    (bad / "Ebay_train.txt").write_text(train)
    victim = train.splitlines()[3].split()[3]
    (bad / victim).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(victim)):
        DATASETS.build(dict(type="StanfordOnlineProducts", data_root=str(bad), split="train"))
    ok = DATASETS.build(dict(type="StanfordOnlineProducts", data_root=str(setup.sop), split="test"))
    assert len(ok) == 24 and ok.get_data_info(0)["gt_label"] == 7


def test_plugin_not_importable_says_how_to_install(tmp_path):
    """A Python environment with MMPretrain but without cdd_plugin: mim train must say how to install it."""
    env_dir = tmp_path / "env"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    site = next(env_dir.glob("lib/python*/site-packages"))
    main_site = next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    (site / "main_venv.pth").write_text(main_site + "\n")  # mmengine/mmpretrain, but not the editable plug-in
    python = str(env_dir / "bin" / "python")
    probe = subprocess.run([python, "-c", "import mmpretrain, importlib.util as u; print(u.find_spec('cdd_plugin'))"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert probe.stdout.strip() == "None", probe.stderr[-2000:]
    out = _run([python, "-m", "mim", "train", "mmpretrain", str(SOP_CONFIG), "--work-dir", str(tmp_path / "w")],
               cwd=tmp_path, expect_ok=False, timeout=120)
    assert "cdd_plugin" in out and "make install" in out and "pip install -e" in out


# -- metrics ------------------------------------------------------------------------------------
def _evaluate(metric: dict, items) -> dict:
    import cdd_plugin.integrations.mmpretrain  # noqa: F401
    from mmengine.evaluator import Evaluator
    from mmpretrain.registry import METRICS
    from mmpretrain.structures import DataSample

    evaluator = Evaluator(METRICS.build(metric))
    samples = []
    for emb, label, extra in items:
        sample = DataSample().set_gt_label(label)
        sample.set_field(torch.tensor(emb, dtype=torch.float32), "embedding")
        for key, value in extra.items():
            sample.set_field(value, key)
        samples.append(sample)
    evaluator.process(samples)
    return evaluator.evaluate(len(samples))


def test_sop_recall_excludes_each_querys_own_image():
    # every image's nearest *other* image has another label: Recall@1 is 0 (100 if it matched itself)
    items = [([1.0, 0.0], 0, {}), ([0.0, 1.0], 0, {}), ([0.9, 0.1], 1, {}), ([0.1, 0.9], 1, {})]
    res = _evaluate(dict(type="SOPRecall", topk=(1, 3)), items)
    assert res["retrieval/Recall@1"] == 0.0 and res["retrieval/Recall@3"] == 100.0


def test_reid_metric_drops_same_identity_same_camera_gallery_images():
    q = dict(camid=0, is_query=True)
    items = [([1.0, 0.0], 1, q),
             ([1.0, 0.0], 1, dict(camid=0, is_query=False)),   # same id, same camera: junk, removed
             ([0.8, 0.6], 2, dict(camid=1, is_query=False)),   # nearest remaining: wrong id
             ([0.6, 0.8], 1, dict(camid=1, is_query=False))]   # the true match, at rank 2
    res = _evaluate(dict(type="ReIDMetric", ranks=(1, 2), max_rank=2), items)
    assert res["reid/rank1"] == 0.0 and res["reid/rank2"] == 100.0 and res["reid/mAP"] == pytest.approx(50.0)


# -- the RGGR optimizer wrappers --------------------------------------------------------------
def _batch(model, n=8):
    from mmpretrain.structures import DataSample

    gen = torch.Generator().manual_seed(1)
    inputs = torch.randn(n, 3, *model.input_size, generator=gen)
    samples = [DataSample().set_gt_label(i % 4) for i in range(n)]
    return inputs, samples


def test_amp_wrapper_unscales_before_the_rggr_edit(small_cfg, monkeypatch):
    """mmengine's AmpOptimWrapper refuses to be built without CUDA (an assertion in its
    __init__), so AMP cannot run on this CPU machine as configured. The CUDA gate is opened and
    mmengine's (then disabled) CUDA GradScaler replaced by torch's CPU GradScaler, so the real
    scaled bf16 step runs; the DGC update must use unscaled gradients plus the lasso term."""
    import mmengine.optim.optimizer.amp_optimizer_wrapper as amp
    from mmengine.optim import build_optim_wrapper

    torch.manual_seed(0)  # the weights and the batch: a fixed, finite scaled step (overflow has its own test)
    model = _build(small_cfg, cdd=dict(queue_size=64))
    model.train()
    monkeypatch.setattr(amp, "is_cuda_available", lambda: True)
    lr, scale = 0.5, 64.0
    wrapper = build_optim_wrapper(model, dict(type="CDDAmpOptimWrapper", dtype="bfloat16",
                                              constructor="CDDOptimWrapperConstructor",
                                              optimizer=dict(type="SGD", lr=lr, momentum=0.0)))
    wrapper.loss_scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    state = model.cdd_state
    first = next(iter(state.compactors.values()))
    first.mask[: first.channels // 2] = 0.0  # masked rows feel only the lasso
    inputs, samples = _batch(model)
    with wrapper.optim_context(model):
        losses = model.loss(inputs, samples)
        assert losses["loss_id"].dtype == torch.float32 and torch.is_autocast_enabled("cpu")
    loss, _ = model.parse_losses(losses)
    wrapper.backward(loss)
    before = {n: (d.weight.detach().clone(), d.weight.grad.detach().clone()) for n, d in state.compactors.items()}
    assert all(torch.isfinite(g).all() for _, g in before.values())
    wrapper.step()
    assert wrapper.loss_scaler.get_scale() == scale  # the step was taken, not skipped
    lam = state.cfg.lasso
    for name, dgc in state.compactors.items():
        w, scaled = before[name]
        lasso = lam * w / w.norm(dim=1, keepdim=True)
        right = w - lr * (dgc.mask[:, None] * scaled / scale + lasso)
        wrong = w - lr * (dgc.mask[:, None] * scaled + lasso) / scale  # edit before unscaling
        assert torch.allclose(dgc.weight.detach(), right, atol=1e-6), name
        assert not torch.allclose(dgc.weight.detach(), wrong, atol=1e-6), name
    assert state.iteration == 1 and "cdd" in wrapper.state_dict() and "loss_scaler" in wrapper.state_dict()


def test_gradient_accumulation_resets_gradients_only_on_the_real_step(small_cfg):
    from mmengine.optim import build_optim_wrapper

    model = _build(small_cfg, cdd=dict(queue_size=64))
    model.train()
    wrapper = build_optim_wrapper(model, dict(type="CDDOptimWrapper", constructor="CDDOptimWrapperConstructor",
                                              accumulative_counts=2, optimizer=dict(type="SGD", lr=0.1)))
    state = model.cdd_state
    dgc = next(iter(state.compactors.values()))
    w0 = dgc.weight.detach().clone()
    inputs, samples = _batch(model)
    loss, _ = model.parse_losses(model.loss(inputs, samples))
    wrapper.update_params(loss)
    assert state.iteration == 0 and torch.equal(dgc.weight.detach(), w0)  # accumulating: no step, no reset
    raw = dgc.weight.grad.detach().clone()
    loss, _ = model.parse_losses(model.loss(inputs, samples))
    wrapper.update_params(loss)
    assert state.iteration == 1 and not torch.equal(dgc.weight.detach(), w0)
    assert raw.abs().sum() > 0


def test_epoch_schedule_without_cdd_hook_is_refused(small_cfg):
    model = _build(small_cfg)  # the config gives mask_start_epoch; only CDDHook converts it
    model.train()
    with pytest.raises(RuntimeError, match=r"custom_hooks=\[dict\(type='CDDHook'\)\]"):
        model.loss(*_batch(model))


def test_embedding_retriever_keeps_mmpretrain_gallery_matching(small_cfg):
    from mmpretrain.registry import MODELS

    gallery = torch.randn(5, 128)
    model = MODELS.build(dict(type="EmbeddingRetriever", image_encoder=small_cfg.model.image_encoder,
                              prototype=gallery, data_preprocessor=dict(type="ClsDataPreprocessor")))
    model.eval()
    with torch.no_grad():
        preds = model.predict(torch.randn(3, 3, 64, 32))
    assert all(p.pred_score.shape == (5,) and p.embedding.shape == (128,) for p in preds)


def test_cdd_wrapper_needs_the_constructor_and_the_constructor_a_cdd_wrapper(small_cfg):
    from mmengine.optim import build_optim_wrapper

    model = _build(small_cfg)
    with pytest.raises(TypeError, match="optim_wrapper.type='CDDOptimWrapper'"):
        build_optim_wrapper(model, dict(constructor="CDDOptimWrapperConstructor", optimizer=dict(type="SGD", lr=0.1)))
    loose = build_optim_wrapper(model, dict(type="CDDOptimWrapper", optimizer=dict(type="SGD", lr=0.1)))
    with pytest.raises(RuntimeError, match="constructor='CDDOptimWrapperConstructor'"):
        loose.step()


# -- Market-1501 re-ID config -----------------------------------------------------------------
def _write_market(root: Path, market=None) -> Path:
    """Four training identities, and three test identities seen by several cameras (query + gallery)."""
    return write_market1501(root, train_ids=4, test_ids=3, train_images=6, gallery_images=6, distractors=2, junk=1)


def test_market_config_evaluates_with_the_camera_aware_reid_metric(market, setup, tmp_path):
    import cdd_plugin.integrations.mmpretrain  # noqa: F401
    from mmengine.config import Config
    from mmengine.runner import Runner

    root = _write_market(tmp_path / "market", market)
    cfg = Config.fromfile(str(MARKET_CONFIG))
    enc = [dict(type="ResNet", depth=18, base_channels=16, stem_channels=16, init_cfg=None),
           dict(type="GlobalAveragePooling")]
    cfg.merge_from_dict({
        "model.image_encoder": enc, "model.head.num_classes": 4, "model.head.in_channels": 128,
        "model.data_preprocessor.num_classes": 4, "model.input_size": (64, 32), "model.cdd.queue_size": 64,
        "model.teacher.checkpoint": str(setup.teacher), "work_dir": str(tmp_path / "work"),
        "val_dataloader.dataset.data_root": str(root), "val_dataloader.num_workers": 0,
        "val_dataloader.batch_size": 16, "train_dataloader.dataset.data_root": str(root),
        "train_dataloader.num_workers": 0, "train_dataloader.batch_size": 8,
    })
    cfg.val_dataloader.dataset.pipeline[1].scale = (32, 64)
    runner = Runner.from_cfg(cfg)
    metrics = runner.val()
    assert set(metrics) == {"reid/mAP", "reid/mINP", "reid/rank1", "reid/rank5", "reid/rank10"}
    assert all(0.0 <= v <= 100.0 for v in metrics.values())
    assert metrics["reid/rank1"] <= metrics["reid/rank5"] <= metrics["reid/rank10"]
    dataset = runner.val_dataloader.dataset
    infos = [dataset.get_data_info(i) for i in range(len(dataset))]
    assert {i["is_query"] for i in infos} == {True, False} and all("camid" in i for i in infos)


def test_merged_file_is_a_safe_cdd_file_that_load_merged_rebuilds(cdd_run, small_cfg):
    model = _build(small_cfg)
    payload = torch.load(cdd_run.dir / "model_merged.pth", map_location="cpu", weights_only=True)
    assert payload["format"] == "cdd_plugin.merged" and payload["meta"]["framework"] == "mmpretrain"
    narrow = cdd_plugin.load_merged(str(cdd_run.dir / "model_merged.pth"), model.build_dense_student())
    assert sum(p.numel() for p in narrow.image_encoder.parameters()) == cdd_run.rows["student_merged"]["params"]


def test_the_summary_reductions_are_the_core_definition(cdd_run, small_cfg):
    """The MMPretrain summary's reductions equal the core recipe's on the same trained student (rebuilt
    from the run's checkpoint): one meaning of the uncompressed baseline in every front end."""
    from cdd_plugin.finalize import finalize as core_finalize
    from cdd_plugin.integrations.mmpretrain.model import _embed_forward

    model = _build(small_cfg)
    sd = torch.load(cdd_run.dir / "epoch_1.pth", map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict(sd, strict=False)
    core = core_finalize(model.student_net, model.cdd_state, lambda net: {}, model.example_inputs(1),
                         framework="core", config=None, iterations=0, forward_fn=_embed_forward, latency=False,
                         write=False).summary
    assert core["flops_reduction"] == pytest.approx(cdd_run.summary["flops_reduction"], abs=1e-12)
    assert core["params_reduction"] == pytest.approx(cdd_run.summary["params_reduction"], abs=1e-12)


# -- vision transformers -------------------------------------------------------------------------
TINY_VIT = dict(type="VisionTransformer", arch=dict(embed_dims=32, num_layers=2, num_heads=2, feedforward_channels=64),
                img_size=(64, 32), patch_size=16, out_type="cls_token", init_cfg=None)


def _train_with_cdd_wrapper(model, steps):
    """``steps`` SGD steps through the CDD optimizer wrapper on one batch; returns the batch's inputs."""
    from mmengine.optim import build_optim_wrapper

    wrapper = build_optim_wrapper(model, dict(type="CDDOptimWrapper", constructor="CDDOptimWrapperConstructor",
                                              optimizer=dict(type="SGD", lr=0.05, momentum=0.9)))
    model.train()
    inputs, samples = _batch(model)
    for _ in range(steps):
        loss, _ = model.parse_losses(model.loss(inputs, samples))
        wrapper.update_params(loss)
    return inputs


def test_vit_student_compacts_its_mlps_trains_with_the_wrappers_and_merges_exactly(small_cfg):
    """MMPretrain's VisionTransformer through CDDRetriever: the authors' placement selects each
    block's MLP hidden set (attention stays dense, the report says why), the CDD optimizer
    wrapper trains it on token features, and the merged student computes what the trained one
    computes with narrower MLPs."""
    model = _build(small_cfg, image_encoder=[TINY_VIT], cdd=dict(queue_size=64, mask_start=0, ratio=0.9,
                                                                  lasso=0.05),
                   head=dict(type="LinearClsHead", num_classes=6, in_channels=32))
    state = model.cdd_state
    assert all(s.producer.endswith("ffn.layers.0.0") for s in state.sites), state.report()
    assert len(state.sites) == 2 and all(s.channels == 64 and s.channels_last for s in state.sites)
    assert "attn.qkv" in state.report()
    inputs = _train_with_cdd_wrapper(model, 6)
    assert state.iteration == 6
    assert sum(int((d.mask == 0).sum()) for d in state.compactors.values()) > 0
    net = model.student_net
    net.eval()
    for d in state.compactors.values():  # what a long run reaches: the masked rows at zero
        d.zero_((d.mask == 0).nonzero().flatten().tolist())
    with torch.no_grad():
        want = net.embed(inputs)
    merged = cdd_plugin.merge(net)
    with torch.no_grad():
        got = merged.embed(inputs)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    widths = [m.out_features for n, m in merged.named_modules() if n.endswith("ffn.layers.0.0")]
    assert len(widths) == 2 and min(widths) < 64


def test_residual_groups_from_cdd_dict_train_tied_and_merge_exactly(small_cfg):
    """cdd=dict(residual=True): MMPretrain's ResNet stages are compacted as tied groups through
    CDDRetriever and the CDD optimizer wrapper; merge cuts the streams exactly."""
    torch.manual_seed(0)
    model = _build(small_cfg, cdd=dict(queue_size=64, mask_start=0, ratio=0.9, lasso=0.05, residual=True))
    state = model.cdd_state
    groups = [u for u in state.units if state.tied(u)]
    assert groups and all(len(state.units[u]) >= 2 for u in groups), state.report()
    inputs = _train_with_cdd_wrapper(model, 4)
    for u in groups:
        assert all(torch.equal(state.compactors[n].mask, state.unit_mask(u)) for n in state.units[u])
    assert any((state.unit_mask(u) == 0).any() for u in groups)
    net = model.student_net
    net.eval()
    for u, members in state.units.items():
        for n in members:
            state.compactors[n].zero_((state.unit_mask(u) == 0).nonzero().flatten().tolist())
    with torch.no_grad():
        want = net.embed(inputs)
    merged = cdd_plugin.merge(net)
    with torch.no_grad():
        got = merged.embed(inputs)
    assert torch.allclose(got, want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)
    from cdd_plugin.integrations.mmpretrain.model import _embed_forward

    # the embedding path (what a retrieval deployment runs) is what surgery traced and predicts
    assert cdd_plugin.profile(merged, inputs[:1], forward_fn=_embed_forward)["flops"] == state.predicted_flops()


def test_cut_embedding_narrows_the_embedding_and_the_head_outside_the_traced_path(small_cfg):
    """cdd=dict(residual=True, cut_embedding=True): the last stage (the embedding) is a group too; merge
    drops its zero channels from the embedding and the LinearClsHead's inputs alike (the head is not on
    the traced embedding path: RetrievalNet.cdd_cut_embedding), so the logits stay the trained ones."""
    torch.manual_seed(0)
    model = _build(small_cfg, cdd=dict(queue_size=64, residual=True, cut_embedding=True))
    state = model.cdd_state
    last = [u for u in state.units if state.tied(u) and state.unit_site(u).embedding]
    assert len(last) == 1 and state.tap_points()[last[0]][1] == "output", state.report()
    net = model.student_net
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for u, members in state.units.items():
            rows = torch.randperm(state.unit_channels(u), generator=g)[: state.unit_channels(u) // 2].tolist()
            for n in members:
                state.compactors[n].zero_(rows)
    net.eval()
    inputs, _ = _batch(model)
    with torch.no_grad():
        logits, emb = net(inputs)
    merged = cdd_plugin.merge(net)
    with torch.no_grad():
        logits2, emb2 = merged(inputs)
    width = state.unit_channels(last[0])
    assert emb2.shape[1] == width // 2 and merged.head.fc.in_features == width // 2
    assert torch.allclose(logits2, logits, atol=1e-5 * logits.abs().max().item(), rtol=1e-5)
    assert torch.allclose(torch.cdist(emb2, emb2), torch.cdist(emb, emb), atol=1e-5 * emb.abs().max().item())


def test_the_vit_configs_build_the_authors_placement_on_deit_small():
    """configs/cdd_vit_small_sop.py (and its teacher) load and build: 12 MLP sites of ViT-S/16."""
    import cdd_plugin.integrations.mmpretrain  # noqa: F401
    from mmengine.config import Config
    from mmpretrain.registry import MODELS

    cfg = Config.fromfile(str(REPO / "configs" / "cdd_vit_small_sop.py"), import_custom_modules=False)
    teacher = Config.fromfile(str(REPO / "configs" / "teacher_vit_small_sop.py"), import_custom_modules=False)
    assert teacher.model.image_encoder == cfg.model.image_encoder and teacher.model.head.in_channels == 384
    model = MODELS.build(cfg.model.to_dict())
    sites = model.cdd_state.sites
    assert len(sites) == 12 and all(s.channels == 1536 and s.producer.endswith("ffn.layers.0.0") for s in sites)
    assert model.cdd_state.cfg.queue_dtype == "bfloat16" and model.cdd_state.cfg.sites == "paper"
