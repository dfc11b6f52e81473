"""FastReID integration, on real FastReID and real Market-1501 (a few identities, 64x32, ResNet-18, CPU).

One teacher and one CDD run are trained per module and shared: training moves masks and
queues, the end of training merges and exports, the merged model evaluates like the
trained one, resume restores the CDD state, ``--eval-only`` reads the merged file, IBN
students merge exactly, and bad settings fail with the fix in the message.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from fastreid_helpers import CDD_YML, REPO, TEACHER_YML, datasets_root, smoke_cfg

if os.environ.get("CI", "").lower() != "true":  # in CI a missing FastReID fails the module loudly
    pytest.importorskip("fastreid", reason="FastReID is not installed (pip install -e .[fastreid])")

import cdd_plugin.integrations.fastreid as fastreid_adapter  # noqa: E402

import cdd_plugin  # noqa: E402
from cdd_plugin import ConfigError  # noqa: E402
from cdd_plugin.integrations.fastreid import CDDTrainer, compat, finalize, load_config  # noqa: E402
from cdd_plugin.integrations.fastreid.ibn import PrunableIBN  # noqa: E402
from cdd_plugin.integrations.fastreid.meta_arch import build_dense_student, find_cdd  # noqa: E402

BATCH = 16  # SOLVER.IMS_PER_BATCH of the smoke configs


# -- shared runs ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def market(synthetic_market):
    return synthetic_market


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fastreid")


@pytest.fixture(scope="module")
def teacher(market, workdir):
    """A ResNet-18 teacher trained for one epoch (10 iterations) on 8 identities."""
    out = workdir / "teacher"
    cfg = smoke_cfg(TEACHER_YML, out, market, "SOLVER.MAX_EPOCH", "1", "TEST.EVAL_PERIOD", "1")
    cfg.freeze()
    trainer = CDDTrainer(cfg)
    trainer.resume_or_load(resume=False)
    before = {k: p.detach().clone() for k, p in trainer.model.named_parameters() if p.requires_grad}
    results = trainer.train()
    after = dict(trainer.model.named_parameters())
    unchanged = [k for k, v in before.items() if torch.equal(v, after[k].detach())]
    return SimpleNamespace(dir=out, weights=out / "model_final.pth", results=results, unchanged=unchanged,
                           trained=list(before))


@pytest.fixture(scope="module")
def cdd_run(market, workdir, teacher):
    """CDD training: R18 teacher -> R18 student, 2 epochs (20 iterations), masks from epoch 1."""
    out = workdir / "cdd"
    cfg = smoke_cfg(CDD_YML, out, market, "CDD.TEACHER.WEIGHTS", str(teacher.weights))
    cfg.freeze()
    trainer = CDDTrainer(cfg)
    trainer.resume_or_load(resume=False)
    cdd = find_cdd(trainer.model)
    teacher_before = {k: v.clone() for k, v in cdd.teacher.state_dict().items()}
    results = trainer.train()
    return SimpleNamespace(cfg=cfg, dir=out, trainer=trainer, cdd=cdd, results=results,
                           teacher_before=teacher_before)


@pytest.fixture(scope="module")
def merged_run(cdd_run, workdir):
    """Every other channel of every DGC set exactly to zero, then the end-of-training merge + export again."""
    cdd, trainer = cdd_run.cdd, cdd_run.trainer
    for dgc in cdd.state.compactors.values():
        dgc.zero_(range(0, dgc.channels, 2))
    cfg = cdd_run.cfg.clone()
    cfg.defrost()
    cfg.OUTPUT_DIR = str(workdir / "merged")
    cfg.CDD.LATENCY = True
    cfg.freeze()
    trainer._last_eval_results = None  # the trained model changed: evaluate it again
    summary = finalize(trainer, cfg, str(CDD_YML))
    return SimpleNamespace(dir=workdir / "merged", summary=summary,
                           rows={r["name"]: r for r in summary["rows"]})


# -- training ------------------------------------------------------------------------------------
def test_teacher_training_updates_every_weight_and_evaluates(teacher):
    # FastReID's default contiguous parameter buffer never updates weights on torch 2.x
    assert teacher.trained and teacher.unchanged == []
    assert teacher.weights.is_file()
    assert 0.0 < float(teacher.results["mAP"]) <= 100.0


def test_cdd_training_moves_masks_and_queues(cdd_run):
    state = cdd_run.cdd.state
    assert state.iteration == 20
    assert state.cfg.mask_start == 10  # CDD.MASK_START 1 epoch x 10 iterations per epoch
    assert sum(state.active_channels().values()) < sum(s.channels for s in state.sites)
    assert all(q.count == 20 * BATCH for q in state.queues.values())
    # the teacher is frozen, in eval mode and never trained
    teacher = cdd_run.cdd.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, cdd_run.teacher_before[k]) for k, v in teacher.state_dict().items())


def test_cdd_figures_reach_fastreid_writers(cdd_run):
    records = [json.loads(line) for line in (cdd_run.dir / "metrics.json").read_text().splitlines()]
    last = records[-1]
    for key in ("cdd/channels_active", "cdd/flops_merged", "cdd/flops_ratio", "cdd/sparsity", "loss_kd",
                "loss_feat", "loss_id", "loss_triplet"):
        assert key in last, key
    assert "cdd_sparsity" not in last  # a logged figure, not a loss FastReID would add to the total


def test_end_of_training_writes_merged_model_and_summary(cdd_run):
    summary = json.loads((cdd_run.dir / "cdd_summary.json").read_text())
    assert summary["schema"] == "cdd_summary/v1" and summary["framework"] == "fastreid"
    assert summary["iterations"] == 20
    assert [r["name"] for r in summary["rows"]] == ["teacher", "student_unmerged", "student_merged"]
    for row in summary["rows"]:
        assert set(row) - {"folded"} == {"name", "metrics", "params", "flops", "latency_ms"}
        assert 0.0 <= row["metrics"]["mAP"] <= 100.0 and 0.0 <= row["metrics"]["rank1"] <= 100.0
    assert summary["rows"][0]["folded"] is True  # the teacher is counted with its BatchNorms folded, like the rest
    assert summary["cdd"]["iteration"] == 20 and "flops_merged" in summary["cdd"]
    assert isinstance(summary["flops_reduction"], float) and isinstance(summary["predicted_flops"], int)
    payload = torch.load(cdd_run.dir / "model_merged.pth", map_location="cpu", weights_only=True)
    assert payload["format"] == "cdd_plugin.merged"


def test_checkpoint_carries_cdd_state(cdd_run):
    ckpt = torch.load(cdd_run.dir / "model_final.pth", map_location="cpu", weights_only=True)
    saved = ckpt["optimizer"]["cdd"]
    assert saved["iteration"] == 20
    state = cdd_run.cdd.state
    assert all(torch.equal(saved["masks"][n], m.cpu()) for n, m in state.masks().items())


def test_optimizer_is_fastreid_sgd_with_rggr_and_the_authors_decay_on_dgcs(cdd_run):
    opt = cdd_run.trainer.optimizer
    assert isinstance(opt, torch.optim.SGD)  # RGGROptimizer keeps the inner class
    assert opt.cdd is cdd_run.cdd.state
    assert cdd_run.cdd.state.cfg.decay_compactors is True  # CDD.DECAY_COMPACTORS, the authors' default
    dgc = {id(d.weight) for d in cdd_run.cdd.state.compactors.values()}
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert dgc <= set(decay) and all(decay[i] == cdd_run.cfg.SOLVER.WEIGHT_DECAY for i in dgc)
    assert {decay[i] for i in decay if i not in dgc} == {cdd_run.cfg.SOLVER.WEIGHT_DECAY}
    teacher = {id(p) for p in cdd_run.cdd.teacher.parameters()}
    assert not teacher & set(decay)  # the teacher is never optimised


# -- merge ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_merged_model_evaluates_like_the_trained_model(merged_run):
    unmerged, merged = merged_run.rows["student_unmerged"], merged_run.rows["student_merged"]
    assert abs(merged["metrics"]["mAP"] - unmerged["metrics"]["mAP"]) <= 0.1
    assert abs(merged["metrics"]["rank1"] - unmerged["metrics"]["rank1"]) <= 0.1


@pytest.mark.slow
def test_merged_flops_match_the_prediction(merged_run):
    s, merged, unmerged = merged_run.summary, merged_run.rows["student_merged"], merged_run.rows["student_unmerged"]
    assert merged["flops"] == s["predicted_flops"] == s["cdd"]["flops_merged"]
    assert s["flops_reduction"] > 0.2 and merged["params"] < unmerged["params"]
    assert all(isinstance(r["latency_ms"], float) and r["latency_ms"] > 0 for r in s["rows"])
    assert (merged_run.dir / "model_merged.pth").is_file()


@pytest.mark.slow
def test_eval_only_reads_the_merged_checkpoint(merged_run, market, workdir):
    cmd = [sys.executable, "-m", "cdd_plugin.integrations.fastreid.train_net", "--config-file", str(CDD_YML),
           "--eval-only", "MODEL.WEIGHTS", str(merged_run.dir / "model_merged.pth"),
           "DATASETS.ROOT", datasets_root(market), "OUTPUT_DIR", str(workdir / "eval_only")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Loaded the merged student" in proc.stdout
    row = re.search(r"\|\s*Market1501Subset\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|",
                    proc.stdout)
    assert row, proc.stdout[-3000:]
    rank1, mAP = float(row.group(1)), float(row.group(4))
    expected = merged_run.rows["student_merged"]["metrics"]
    assert abs(mAP - expected["mAP"]) <= 0.1 and abs(rank1 - expected["rank1"]) <= 0.1


def test_cdd_profile_reads_the_merged_file_with_the_fastreid_config(merged_run):
    """`cdd profile --arch fastreid:<config>` rebuilds the narrow student and counts what the summary says."""
    cmd = [sys.executable, "-m", "cdd_plugin.app", "profile", str(merged_run.dir / "model_merged.pth"),
           "--arch", f"fastreid:{CDD_YML}", "--json"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    merged = merged_run.rows["student_merged"]
    assert result["params"] == merged["params"] and result["flops"] == merged["flops"]


# -- resume --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_restores_iteration_masks_and_queues(cdd_run, market, workdir, teacher):
    out = workdir / "resume"
    out.mkdir()
    shutil.copy(cdd_run.dir / "model_final.pth", out / "model_final.pth")
    (out / "last_checkpoint").write_text("model_final.pth")
    saved = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)["optimizer"]["cdd"]
    cfg = smoke_cfg(CDD_YML, out, market, "CDD.TEACHER.WEIGHTS", str(teacher.weights), "SOLVER.MAX_EPOCH", "3",
                    "CDD.EVAL_TEACHER", "False")
    cfg.freeze()
    trainer = CDDTrainer(cfg)
    state = find_cdd(trainer.model).state
    assert state.iteration == 0
    trainer.resume_or_load(resume=True)
    assert trainer.start_epoch == 2
    assert state.iteration == saved["iteration"] == 20
    masks = state.masks()
    assert all(torch.equal(saved["masks"][n], masks[n].cpu()) for n in masks)
    assert all(torch.equal(cdd_run.cdd.state.masks()[n].cpu(), masks[n].cpu()) for n in masks)
    assert all(q.count == saved["queues"][n]["count"] and q.ptr == saved["queues"][n]["ptr"]
               for n, q in state.queues.items())
    trainer.train()
    assert state.iteration == 30
    assert json.loads((out / "cdd_summary.json").read_text())["iterations"] == 30


@pytest.mark.slow
def test_resume_continues_the_data_stream_and_ends_with_the_uninterrupted_weights(market, workdir, teacher):
    """2 epochs straight vs 1 epoch + --resume for the 2nd: same masks, queues and (bit for bit) weights.

    Augmentations off: FastReID runs them in a prefetching thread whose generator state
    cannot be captured at a batch boundary (the documented limit)."""
    from fastreid.utils.env import seed_all_rng

    opts = ["CDD.TEACHER.WEIGHTS", str(teacher.weights), "INPUT.FLIP.ENABLED", "False",
            "INPUT.PADDING.ENABLED", "False", "CDD.MASK_START", "0", "CDD.MASK_START_UNIT", "iter",
            "CDD.RATIO", "0.9", "CDD.EVAL_TEACHER", "False", "TEST.EVAL_PERIOD", "100"]

    def run(out, resume):
        seed_all_rng(0)  # what default_setup does with SEED 0: the sampler's stream seed comes from it
        cfg = smoke_cfg(CDD_YML, out, market, *opts)
        cfg.freeze()
        trainer = CDDTrainer(cfg)
        trainer.resume_or_load(resume=resume)
        trainer.train()
        return find_cdd(trainer.model)

    full = run(workdir / "exact_full", False)
    part = workdir / "exact_resumed"
    part.mkdir()
    shutil.copy(workdir / "exact_full" / "model_0000.pth", part / "model_0000.pth")  # the end of epoch 1
    (part / "last_checkpoint").write_text("model_0000.pth")
    resumed = run(part, True)
    assert resumed.state.iteration == full.state.iteration == 20
    assert any((m == 0).any() for m in full.state.masks().values())
    for name, mask in full.state.masks().items():
        assert torch.equal(mask, resumed.state.masks()[name]), name
        assert torch.equal(full.state.queues[name].bank(), resumed.state.queues[name].bank()), name
    weights = resumed.student.state_dict()
    diff = {k: (v.float() - weights[k].float()).abs().max().item() for k, v in full.student.state_dict().items()}
    assert max(diff.values()) == 0.0, sorted(diff.items(), key=lambda kv: -kv[1])[:3]


# -- IBN -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ibn_student_trains_and_merges_exactly(teacher, market, workdir):
    cfg = smoke_cfg(CDD_YML, workdir / "ibn", market, "CDD.TEACHER.WEIGHTS", str(teacher.weights),
                    "MODEL.BACKBONE.WITH_IBN", "True", "MODEL.HEADS.NUM_CLASSES", "8",
                    "CDD.MASK_START", "0", "CDD.MASK_START_UNIT", "iter")
    model = CDDTrainer.build_model(cfg)
    cdd = find_cdd(model)
    state = cdd.state
    ibn_sites = [s for s in state.sites if s.kind == "in"]
    assert len(ibn_sites) == 6  # conv2 input of every IBN block (layers 1-3 of ResNet-18)
    assert all(isinstance(cdd.student.get_submodule(s.producer.rsplit(".", 1)[0] + ".bn1"), PrunableIBN)
               for s in ibn_sites)
    assert not cdd.distiller.unpaired  # the IBN sites read the teacher at the same conv inputs

    optimizer, _ = CDDTrainer.build_optimizer(cfg, model)
    batches = iter(CDDTrainer.build_train_loader(cfg))
    model.train()
    for _ in range(3):
        losses = model(next(batches))
        assert {"loss_id", "loss_triplet", "loss_kd", "loss_feat"} <= set(losses)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    assert state.iteration == 3

    images = next(batches)["images"][:8]
    for i, dgc in enumerate(state.compactors.values()):  # empty the InstanceNorm part, the BN part, or neither
        dgc.zero_(range(dgc.channels // 2) if i % 3 == 0 else
                  range(dgc.channels // 2, dgc.channels) if i % 3 == 1 else range(0, dgc.channels, 2))
    model.eval()
    with torch.no_grad():
        reference = model({"images": images.clone()})
        merged = cdd_plugin.merge(cdd.student)
        out = merged(images.clone())
    assert out.shape == reference.shape
    assert torch.allclose(out, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())
    halves = [m.half for m in merged.modules() if isinstance(m, PrunableIBN)]
    assert 0 in halves  # a whole InstanceNorm part was removed
    path = workdir / "ibn" / "model_merged.pth"
    cdd_plugin.save_merged(merged, str(path))
    reloaded = cdd_plugin.load_merged(str(path), build_dense_student(cfg))
    with torch.no_grad():
        assert torch.equal(reloaded(images.clone()), out)


def test_residual_groups_from_the_cdd_node_train_tied_and_merge_exactly(teacher, market, workdir):
    """CDD.RESIDUAL: True compacts the stages' residual streams too: one mask per stream, scored at the
    teacher's stage output; merge cuts every block's output, shortcut and the next stage's inputs."""
    cfg = smoke_cfg(CDD_YML, workdir / "residual", market, "CDD.TEACHER.WEIGHTS", str(teacher.weights),
                    "MODEL.HEADS.NUM_CLASSES", "8", "CDD.RESIDUAL", "True", "CDD.MASK_START", "0",
                    "CDD.MASK_START_UNIT", "iter", "CDD.RATIO", "0.9", "CDD.QUEUE_SIZE", "32")
    model = CDDTrainer.build_model(cfg)
    cdd = find_cdd(model)
    state = cdd.state
    groups = [u for u in state.units if state.tied(u)]
    # layers 1-3 of the ResNet-18 backbone (the stem is a member of layer1's); the last stage is the embedding
    assert len(groups) == 3, state.report()
    assert any("layer4" in sk.layers[0] and "model output" in sk.reason for sk in state.skipped), state.report()
    assert all(u in cdd.distiller.pairs for u in groups)  # read at the same point of the teacher
    optimizer, _ = CDDTrainer.build_optimizer(cfg, model)
    batches = iter(CDDTrainer.build_train_loader(cfg))
    model.train()
    for _ in range(3):
        losses = model(next(batches))
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    for u in groups:
        assert all(torch.equal(state.compactors[n].mask, state.unit_mask(u)) for n in state.units[u])
    assert any((state.unit_mask(u) == 0).any() for u in groups)
    images = next(batches)["images"][:8]
    for u, members in state.units.items():  # what the tied lasso leaves: masked rows at zero in every member
        for n in members:
            state.compactors[n].zero_((state.unit_mask(u) == 0).nonzero().flatten().tolist())
    model.eval()
    with torch.no_grad():
        reference = model({"images": images.clone()})
        merged = cdd_plugin.merge(cdd.student)
        out = merged(images.clone())
    assert torch.allclose(out, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())
    kept = state.kept_channels()
    sites = {s.name: s for s in state.sites}
    for u in groups:  # every member's conv is cut to the group's width
        for n in state.units[u]:
            assert merged.get_submodule(sites[n].producer).out_channels == kept[u] <= state.unit_channels(u)
    assert sum(kept[u] for u in groups) < sum(state.unit_channels(u) for u in groups)
    path = workdir / "residual" / "model_merged.pth"
    cdd_plugin.save_merged(merged, str(path))
    reloaded = cdd_plugin.load_merged(str(path), build_dense_student(cfg))
    with torch.no_grad():
        assert torch.equal(reloaded(images.clone()), out)


def test_student_starts_from_student_weights(market, workdir, teacher):
    cfg = smoke_cfg(CDD_YML, workdir / "student_init", market, "CDD.TEACHER.WEIGHTS", str(teacher.weights),
                    "CDD.STUDENT_WEIGHTS", str(teacher.weights), "MODEL.HEADS.NUM_CLASSES", "8")
    cdd = find_cdd(CDDTrainer.build_model(cfg))
    student, reference = cdd.student.state_dict(), cdd.teacher.state_dict()
    assert all(torch.equal(student[k], v) for k, v in reference.items())  # DGCs start as the identity
    with torch.no_grad():
        images = torch.rand(2, 3, 64, 32) * 255
        cdd.eval()
        assert torch.allclose(cdd({"images": images}), cdd.teacher(images.clone()), atol=1e-5)


# -- bad input -----------------------------------------------------------------------------------
def test_missing_teacher_weights_names_the_fix(market, workdir):
    cfg = smoke_cfg(CDD_YML, workdir / "bad_teacher", market, "CDD.TEACHER.WEIGHTS", str(workdir / "missing.pth"))
    with pytest.raises(FileNotFoundError, match=r"CDD.TEACHER.WEIGHTS .*train the teacher first"):
        CDDTrainer(cfg)


def test_teacher_and_student_class_counts_must_match_for_kd(market, workdir, teacher):
    cfg = smoke_cfg(CDD_YML, workdir / "bad_classes", market, "CDD.TEACHER.WEIGHTS", str(teacher.weights),
                    "DATASETS.SUBSET_IDS", "6")
    with pytest.raises(ConfigError, match=r"teacher has 8 classes .* student 6 .*CDD.LOSS.KD_WEIGHT 0"):
        CDDTrainer(cfg)
    cfg.CDD.LOSS.KD_WEIGHT = 0.0
    cfg.MODEL.HEADS.NUM_CLASSES = 6
    assert find_cdd(CDDTrainer.build_model(cfg)) is not None  # without the KD term, other classes are fine


def test_plain_checkpoint_as_model_weights_points_to_student_weights(market, workdir, teacher):
    cfg = smoke_cfg(CDD_YML, workdir / "bad_weights", market, "CDD.TEACHER.WEIGHTS", str(teacher.weights),
                    "MODEL.WEIGHTS", str(teacher.weights))
    trainer = CDDTrainer(cfg)
    with pytest.raises(ConfigError, match=r"not a CDD checkpoint.*set CDD.STUDENT_WEIGHTS"):
        trainer.resume_or_load(resume=False)


def test_missing_dataset_folder_names_the_fix(market, workdir):
    cfg = smoke_cfg(TEACHER_YML, workdir / "bad_data", market, "DATASETS.ROOT", str(workdir / "no_datasets"))
    with pytest.raises(FileNotFoundError, match=r"Market1501Subset not found under DATASETS.ROOT=.*Fix: point "
                                                r"DATASETS.ROOT"):
        CDDTrainer(cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda_names_the_fix(market, workdir):
    cfg = smoke_cfg(TEACHER_YML, workdir / "bad_device", market, "MODEL.DEVICE", "cuda")
    with pytest.raises(ConfigError, match="MODEL.DEVICE cpu"):
        CDDTrainer(cfg)


def test_unknown_cdd_keys_list_the_valid_ones(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text(f"_BASE_: {CDD_YML}\nCDD:\n  LASOO: 0.1\n  LOSS:\n    KD_WIEGHT: 1.0\n")
    with pytest.raises(ConfigError, match=r"\['CDD.LASOO', 'CDD.LOSS.KD_WIEGHT'\].*valid keys are: .*CDD.LASSO.*"
                                          r"CDD.LOSS.KD_WEIGHT"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match=r"CDD.QUEUE.*command line.*CDD.QUEUE_SIZE"):
        load_config(str(CDD_YML), ["CDD.QUEUE", "100"])
    with pytest.raises(ConfigError, match=r"CDD.MASK_START_UNIT='epochs'.*'epoch'"):
        fastreid_adapter.cdd_configs(load_config(str(CDD_YML), ["CDD.MASK_START_UNIT", "epochs"]))


def test_compat_patches_are_idempotent():
    first = compat.apply()
    assert compat.apply() == first
    assert "torch_six" in first or "torch._six" in sys.modules


@pytest.mark.parametrize("name", ["R101_veri", "R50_market", "R50-ibn_msmt17"])
def test_shipped_configs_load(name):
    from fastreid.config import get_cfg

    teacher_yml = REPO / "configs" / "fastreid" / f"teacher_{name}.yml"
    plain = get_cfg()
    plain.merge_from_file(str(teacher_yml))  # teacher configs are plain FastReID configs
    assert plain.MODEL.META_ARCHITECTURE == "Baseline"
    cfg = load_config(str(REPO / "configs" / "fastreid" / f"cdd_{name}.yml"))
    assert cfg.MODEL.META_ARCHITECTURE == "CDDDistiller"
    assert (REPO / cfg.CDD.TEACHER.CONFIG).resolve() == teacher_yml.resolve()
    for key in ("MODEL.BACKBONE", "MODEL.HEADS", "INPUT.SIZE_TRAIN", "DATASETS.NAMES"):
        node_c, node_t = cfg, plain
        for part in key.split("."):
            node_c, node_t = node_c[part], node_t[part]
        assert node_c == node_t, key  # the heavy student has the teacher's architecture and data
    compression, losses = fastreid_adapter.cdd_configs(cfg, iters_per_epoch=100)
    assert compression.mask_start == 20 * 100 and compression.queue_size == 24000 and losses.kd_weight == 1.0


class _NotAllowed:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_fastreid_checkpointer_stays_weights_only(tmp_path):
    import numpy as np
    from fastreid.utils.checkpoint import Checkpointer

    model = torch.nn.Linear(2, 2)
    ok = tmp_path / "numpy_metric.pth"
    torch.save({"model": model.state_dict(), "metric": np.float64(41.5), "epoch": np.int64(3)}, ok)
    loaded = Checkpointer(torch.nn.Linear(2, 2)).load(str(ok))
    assert float(loaded["metric"]) == 41.5
    bad = tmp_path / "pickled_object.pth"
    torch.save({"model": model.state_dict(), "extra": _NotAllowed()}, bad)
    with pytest.raises(Exception, match="not loaded .*weights_only=True"):
        Checkpointer(torch.nn.Linear(2, 2)).load(str(bad))


# -- no data loss: atomic checkpoints ------------------------------------------------------------
class _FailsHalfWay:
    """Pickling this raises: torch.save stops after part of the file has been written."""

    def __reduce__(self):
        raise RuntimeError("disk full (simulated)")


def test_checkpoints_are_written_atomically_so_a_failed_save_keeps_the_last_good_one(cdd_run, tmp_path):
    from fastreid.engine.hooks import PeriodicCheckpointer

    from cdd_plugin.integrations.fastreid.checkpoint import AtomicCheckpointer

    trainer = cdd_run.trainer
    assert isinstance(trainer.checkpointer, AtomicCheckpointer)  # the one FastReID's periodic hook saves with
    assert any(isinstance(h, PeriodicCheckpointer) and h.checkpointer is trainer.checkpointer
               for h in trainer._hooks)
    ckpt = AtomicCheckpointer(trainer.model, str(tmp_path), optimizer=trainer.optimizer)
    ckpt.save("model_final", iteration=20)
    good = (tmp_path / "model_final.pth").read_bytes()
    with pytest.raises(RuntimeError, match="disk full"):
        ckpt.save("model_final", iteration=30, extra=_FailsHalfWay())
    assert (tmp_path / "model_final.pth").read_bytes() == good
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_final.pth"]  # no temp left
    with pytest.raises(RuntimeError, match="disk full"):
        ckpt.save("model_0001", extra=_FailsHalfWay())
    assert not (tmp_path / "model_0001.pth").exists()
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"  # still points at a whole file
    loaded = ckpt._load_file(str(tmp_path / "model_final.pth"))
    assert loaded["iteration"] == 20 and "cdd" in loaded["optimizer"]
    assert oct((tmp_path / "model_final.pth").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- mixed precision through FastReID's AMPTrainer ---------------------------------------------------
class _ScaledLosses(torch.nn.Module):
    """The CDD model; with ``magnitude`` set, every loss is rescaled to that size: a huge finite loss
    (1e36 fits float32 whatever the loss was: a plain factor of 1e36 turned a feature loss above ~340
    into inf, which FastReID stops on) whose gradients, times the loss scale, overflow."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.magnitude = model, None

    def forward(self, data):
        losses = self.inner(data)
        if self.magnitude is None:
            return losses
        return {k: v * (self.magnitude / v.detach().abs().clamp_min(1e-12)) for k, v in losses.items()}


@pytest.mark.slow
def test_fastreid_amp_trainer_unscales_before_rggr_and_skips_overflow_steps(market, workdir, teacher, monkeypatch):
    """FastReID's own ``AMPTrainer.run_step`` with a real (CPU, bf16) GradScaler and autocast.

    The trainer asserts CUDA; this test opens only that assertion and points ``torch.cuda.amp.
    autocast`` at CPU bf16 autocast, so the scaling, unscaling and skipping are torch's own.
    """
    import types

    from fastreid.engine import train_loop
    from fastreid.utils.events import EventStorage
    from torch.amp.grad_scaler import OptState

    cfg = smoke_cfg(CDD_YML, workdir / "amp", market, "CDD.TEACHER.WEIGHTS", str(teacher.weights),
                    "CDD.MASK_START", "0", "CDD.MASK_START_UNIT", "iter", "CDD.RATIO", "0.9")
    cfg.freeze()
    trainer = CDDTrainer(cfg)
    cdd = find_cdd(trainer.model)
    state = cdd.state
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    model = _ScaledLosses(trainer.model).train()
    amp = train_loop.AMPTrainer(model, trainer._trainer.data_loader, trainer.optimizer, None, grad_scaler=scaler)

    class _View(types.ModuleType):  # the real module, but for the attributes set on the view
        def __init__(self, real, **overrides):
            super().__init__(real.__name__)
            self._real = real
            self.__dict__.update(overrides)

        def __getattr__(self, name):
            return getattr(self._real, name)

    view = _View(torch, cuda=_View(torch.cuda, is_available=lambda: True))
    monkeypatch.setattr(train_loop, "torch", view)
    monkeypatch.setattr(torch.cuda.amp, "autocast", lambda: torch.autocast("cpu", dtype=torch.bfloat16))

    stages, grads = [], []
    reset = state.reset_gradients

    def recording_reset(*args, **kwargs):
        stages.append(scaler._per_optimizer_states[id(trainer.optimizer)]["stage"])
        grads.append(max(d.weight.grad.abs().max().item() for d in state.compactors.values()))
        return reset(*args, **kwargs)

    monkeypatch.setattr(state, "reset_gradients", recording_reset)
    with EventStorage(0) as storage:
        amp.storage = storage
        for it in range(3):
            amp.iter = it
            amp.run_step()
        assert state.iteration == 3 and stages == [OptState.UNSCALED] * 3
        assert max(grads) < 100  # unscaled; scaled by 4096 they would be in the thousands
        assert any((m == 0).any() for m in state.masks().values()), "RGGR masked nothing"
        masks = {n: m.clone() for n, m in state.masks().items()}
        weights = {n: d.weight.detach().clone() for n, d in state.compactors.items()}
        scale = scaler.get_scale()
        # a finite loss whose scaled gradients overflow (FastReID itself stops on an infinite loss)
        model.magnitude = 1e36
        amp.iter = 3
        amp.run_step()
    assert scaler.get_scale() < scale  # torch skipped the step and lowered the scale
    assert state.iteration == 3 and len(stages) == 3  # RGGR did not run for the skipped step
    assert all(torch.equal(masks[n], m) for n, m in state.masks().items())
    assert all(torch.equal(weights[n], d.weight) for n, d in state.compactors.items())


# -- distributed: FastReID's launch, two CPU processes, gloo --------------------------------------------
@pytest.mark.slow
def test_two_processes_through_fastreid_launch_gather_the_global_batch_and_agree_on_masks(market, workdir,
                                                                                          teacher):
    out, dump = workdir / "dist", workdir / "dist_dump"
    dump.mkdir()
    cmd = [sys.executable, str(REPO / "tests" / "fastreid_dist_driver.py"), str(dump), "--num-gpus", "2",
           "--config-file", str(CDD_YML), "DATASETS.ROOT", datasets_root(market), "OUTPUT_DIR", str(out),
           "CDD.TEACHER.WEIGHTS", str(teacher.weights), "SOLVER.MAX_EPOCH", "1", "TEST.EVAL_PERIOD", "1",
           "CDD.MASK_START", "0", "CDD.MASK_START_UNIT", "iter", "CDD.RATIO", "0.9", "CDD.EVAL_TEACHER", "False"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "tests") + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    r0 = torch.load(dump / "rank0.pt", weights_only=True)
    r1 = torch.load(dump / "rank1.pt", weights_only=True)
    assert (r0["rank"], r1["rank"], r0["world"]) == (0, 1, 2)
    iters = r0["iteration"]
    assert iters == r1["iteration"] == len(r0["local"]) == len(r1["local"]) > 0
    for name in r0["masks"]:
        assert torch.equal(r0["masks"][name], r1["masks"][name]), f"ranks disagree on the masks of {name}"
        assert torch.equal(r0["queues"][name], r1["queues"][name]), f"ranks hold different queues at {name}"
    assert any((m == 0).any() for m in r0["masks"].values()), "RGGR masked nothing"
    # each rank ran half of the global batch (IMS_PER_BATCH 16), on different images ...
    assert all(t.shape[0] == BATCH // 2 for t in r0["local"] + r1["local"])
    assert not torch.allclose(r0["local"][0], r1["local"][0])
    # ... and every rank's queue holds the whole global batch of every step, in rank order
    bank = r0["queues"][r0["site"]]
    assert bank.shape[0] == iters * BATCH
    for i, (a, b) in enumerate(zip(r0["local"], r1["local"])):
        assert torch.equal(bank[i * BATCH:(i + 1) * BATCH], torch.cat([a, b])), f"step {i}"
    summary = json.loads((out / "cdd_summary.json").read_text())  # written once, by rank 0
    assert summary["iterations"] == iters and (out / "model_merged.pth").is_file()


def test_the_summary_reductions_are_the_core_definition(merged_run, cdd_run):
    """One meaning of the uncompressed baseline in every front end: the FastReID summary's reductions
    equal the core's (the trained student folded, nothing removed, vs the merged student), counted
    by the core recipe alone on the same model."""
    from cdd_plugin.finalize import finalize as core_finalize
    from cdd_plugin.integrations.fastreid.meta_arch import analysis_forward

    cdd = cdd_run.cdd
    h, w = (int(v) for v in cdd_run.cfg.INPUT.SIZE_TEST)
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0)) * 255.0
    core = core_finalize(cdd.student, cdd.state, lambda net: {}, x, framework="core", config=None, iterations=0,
                         forward_fn=analysis_forward, latency=False, write=False).summary
    assert core["flops_reduction"] == pytest.approx(merged_run.summary["flops_reduction"], abs=1e-12)
    assert core["params_reduction"] == pytest.approx(merged_run.summary["params_reduction"], abs=1e-12)
