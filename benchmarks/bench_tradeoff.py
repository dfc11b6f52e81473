"""The trade-off study: CDD + RGGR against its alternatives on Market-1501, at an equal budget.

    python benchmarks/bench_tradeoff.py [--preset cpu|smoke|full] [--rows ROW,...] [--seed N]
                                        [--subset-seed N] [--out DIR] [--cache DIR] [--device cpu|cuda]

The paper compresses a heavy student that starts from pretrained weights; so does this study.
Market-1501's 751 training identities are split three ways by ``--subset-seed``:

* ``pretrain_ids`` identities for a PRETRAINING stage that stands in for ImageNet weights: the heavy
  architecture (and, separately, the light one) trained with CE + triplet. Cached outside the
  repository (``--cache``, default ``$CDD_BENCH_CACHE`` or ``~/.cache/cdd_plugin/tradeoff``), keyed by
  its settings, outside the rows' budgets.
* ``train_ids`` identities: the study's training set. The TEACHER is the pretrained heavy network
  trained on them for ``teacher_iters`` (cached, outside the budgets; the same teacher for every row).
* ``val_ids`` held-out training identities: the VALIDATION split (query = one image per camera for
  two cameras, gallery = the rest). Settings are chosen on it, never on the test identities.

Test: ``test_ids`` identities of Market-1501's query / gallery split, standard re-ID protocol
(``cdd_plugin.evaluation.evaluate_reid``: same identity and camera removed), cosine distance.

Every row trains for the same ``budget`` iterations on the same batches (PK order and augmentations
are a function of the seed and the epoch only), with the authors' schedule shape (warm-up 10/120, LR
flat until 40/120, cosine to 0), SGD momentum 0.9, weight decay 5e-4 on every parameter, classifier
LR x1.5, and the authors' losses (CE with label smoothing 0.1, batch-hard triplet margin 0.35, logit
KD at T = 2, and the FitNet feature term 0.5 wherever the student has the teacher's width at the
tapped module). Heavy rows start from the heavy pretraining, the light row from its own.

=============  ===========================================================================
row            what
=============  ===========================================================================
teacher        (outside the budgets) the pretrained heavy network trained on the study's identities
kd_heavy       heavy student, KD, not compressed (the accuracy reference)
cdd_rggr       THE method: ``insert_dgc`` + CDDDistiller + RGGROptimizer, masks from 1/6 of the budget,
               K = 2. At the cpu preset, the recommended recipe (README): every channel set
               (``sites='all'``), p = 0.9, the paper's lasso 0.004 on rows that still learn and the
               schedule-scaled lasso on masked rows (``CDDConfig.masked_lasso``), masks until 35% of
               the FLOPs. With ``--authors`` (and at the full preset): the authors' placement
               (``sites='paper'``), p = 0.5, one lasso on every row, no FLOPs target. The scaled lasso
               is chosen on the validation split (below); the merged FLOPs are the study's "equal FLOPs"
cdd_rggr_all   the same with every compactable channel set, to the equal FLOPs (skipped when the main row
               has them already)
cdd_rggr_paper the same with the authors' placement, to the equal FLOPs (skipped when the main row has it)
cdd_authors    CDD + RGGR with every setting the authors' (as ``--authors``) and the chosen lasso, at the
               FLOPs it reaches itself (no target, not matched): what the authors' recipe does in this
               budget (skipped when the main row is that already)
cdd_norm       ResRep's rule (criterion ``norm``) with the main row's placement, to the equal FLOPs; at the
               end every masked row is removed, as ResRep does (masked rows not at zero yet included)
cdd_lasso      the group lasso alone (criterion ``none``), smallest rows cut to the equal FLOPs at the end
tp             torch-pruning one-shot: kd_heavy's weights at the mask start (1/6 of the budget, the
               same point as CDD), ``MagnitudeImportance`` + ``BasePruner`` to the equal FLOPs, KD for
               the rest of the budget (its first 1/6 counts in the budget)
tp_sparse      torch-pruning's own sparse training: ``GroupNormPruner`` regulariser during KD for
               ``tp_sparse_frac`` of the budget, then pruned (group importance) to the equal FLOPs,
               KD for the rest
light          the same ResNet with the ``width_per_group`` whose deployed FLOPs are closest to the
               equal FLOPs, its own pretraining, KD for the whole budget
tp_residual    (only when named in ``--rows``) ``tp`` with the residual streams prunable too (the channel
               sets of ``residual=True``): the fair partner of the residual CDD rows below
=============  ===========================================================================

Ablations of the recipe (run with ``--rows``; each is cdd_rggr with its chosen lasso and one setting
changed): ``abl_one_lasso`` (the scaled lasso on every row, as the authors), ``abl_feat_after`` (feature
term after the compactor), ``abl_no_decay`` (compactors exempt from weight decay), ``abl_no_snap`` (no
proximal snap), ``abl_mask_late`` (masks from 1/3 of the budget), ``abl_ratio_authors`` (p = 0.5),
``abl_sites_authors`` / ``abl_sites_all`` (placement), ``abl_live_lasso_paper`` (the paper's 0.004 on the
rows that still learn, the chosen scaled lasso on masked rows only: ``CDDConfig.masked_lasso``),
``abl_live_lasso_p09`` (the same with p = 0.9, so masks grow faster under the weak live pull),
``abl_live_p09_feat_after`` (that, with the feature term read after the compactor),
``abl_live_p09_no_decay`` (that, with the compactors exempt from weight decay). Beyond the paper:
``abl_residual`` and ``abl_live_p09_residual`` (the chosen row and the live-lasso row with
``CDDConfig(residual=True)``: the residual streams of stages 1-3 compacted too; the last stage is the
embedding and stays dense).

The lasso (METHOD.md section 6): the paper's 0.004 covers ~39,350 iterations after the mask start;
the lasso's travel scales with iterations x LR x lambda, so the scaled value is 0.004 x 39,350 /
(our iterations after the mask start). ``lasso_grid`` multiplies it; the value used is the one with
the best validation mAP among those whose merged model removes >= ``min_reduction`` (60%) of the
heavy student's FLOPs (or, if none does, the one that removes the most). Every candidate's validation
and test figures are reported.

Each row reports test mAP (with its standard error over queries), rank-1/5, params and FLOPs of the
DEPLOYED model (merged CDD students; every other row with the same BatchNorms folded) and median CPU
latency at batch 1 and 32. Differences between rows are paired over the same queries (s.e. given).

Presets
-------
``--preset cpu``: the recipe above for the CDD rows; ResNet-50 at 64x32 on 2 CPU cores (measured here:
0.78 s per plain training step at batch 32, ~1 s per KD / CDD step, 22 s per test evaluation); 100 study /
25 validation / 400 pretraining / 200 test identities; 416 iterations per row (8 epochs of the study set),
600 for each pretraining and for the teacher; lasso grid x(0.25, 1). 64x32 (a quarter of Market-1501's
native 128x64) buys a budget of ~400 iterations per row: the whole preset, pretraining included, took 89
minutes alone on 2 cores (benchmarks/RESULTS.md, run C); the ranking, not the absolute mAP, is the result.
``--preset full``: the paper's settings on a GPU (``--device cuda``): 256x128, all 751 identities for
training minus the validation ones, full test split, 120 epochs, lasso 0.004, queue 24000.
``--preset smoke``: two minutes of plumbing (ResNet-26, 16x8 input, a few iterations); numbers mean nothing.

Determinism: on the CPU a run is a function of ``--seed``, ``--subset-seed`` and the thread count.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import math
import os
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cdd_plugin  # noqa: E402
import tradeoff_common as tc  # noqa: E402

logger = logging.getLogger("bench_tradeoff")

ROWS = ["teacher", "kd_heavy", "cdd_rggr", "cdd_rggr_all", "cdd_rggr_paper", "cdd_authors", "cdd_norm", "cdd_lasso",
        "tp", "tp_sparse", "light"]
#: rows run only when named in --rows (beyond the issue's row set; they would push the CPU preset past 2 hours)
EXTRA_ROWS = ["tp_residual"]
ABLATIONS = {"abl_feat_after": dict(feat_tap="after"), "abl_no_decay": dict(decay_compactors=False),
             "abl_no_snap": dict(snap_to_zero=False), "abl_mask_late": dict(mask_start_frac=40 / 120),
             "abl_ratio_authors": dict(ratio=0.5), "abl_sites_authors": dict(sites="paper"),
             "abl_sites_all": dict(sites="all"), "abl_live_lasso_paper": dict(lasso=0.004),
             "abl_live_lasso_p09": dict(lasso=0.004, ratio=0.9),
             "abl_live_p09_feat_after": dict(lasso=0.004, ratio=0.9, feat_tap="after"),
             "abl_live_p09_no_decay": dict(lasso=0.004, ratio=0.9, decay_compactors=False),
             "abl_one_lasso": dict(live_lasso=0.0),
             "abl_residual": dict(residual=True),
             "abl_live_p09_residual": dict(lasso=0.004, ratio=0.9, residual=True)}
LABELS = {"teacher": "teacher", "kd_heavy": "heavy student, KD", "cdd_rggr": "CDD + RGGR (authors' placement)",
          "cdd_rggr_all": "CDD + RGGR, all sites", "cdd_rggr_paper": "CDD + RGGR, the authors' placement",
          "cdd_authors": "CDD + RGGR, every setting the authors' (its own FLOPs)", "cdd_norm": "CDD + norm (ResRep)",
          "cdd_lasso": "CDD, lasso only + cut", "tp": "torch-pruning one-shot + KD",
          "tp_sparse": "torch-pruning sparse training + KD", "light": "light student, KD",
          "abl_feat_after": "ablation: feature term after the compactor",
          "abl_no_decay": "ablation: no weight decay on compactors", "abl_no_snap": "ablation: no proximal snap",
          "abl_mask_late": "ablation: masks from 1/3 of the budget",
          "abl_ratio_authors": "ablation: the authors' ratio p = 0.5",
          "abl_one_lasso": "ablation: one (schedule-scaled) lasso on every row, as the authors",
          "abl_sites_authors": "ablation: the authors' placement",
          "abl_sites_all": "ablation: every channel set (sites='all')",
          "abl_live_lasso_paper": "ablation: the paper's lasso on live rows, the scaled one on masked rows",
          "abl_live_lasso_p09": "ablation: as the row above, with p = 0.9 (masks grow faster)",
          "abl_live_p09_feat_after": "ablation: live lasso 0.004, p = 0.9, feature term after the compactor",
          "abl_live_p09_no_decay": "ablation: live lasso 0.004, p = 0.9, no weight decay on compactors",
          "abl_residual": "beyond the paper: residual streams compacted too (residual=True)",
          "tp_residual": "torch-pruning one-shot + KD, residual streams prunable too (as residual=True)",
          "abl_live_p09_residual": "beyond the paper: live lasso 0.004, p = 0.9, residual streams compacted too"}
COMPRESSING = ["cdd_rggr_all", "cdd_rggr_paper", "cdd_norm", "cdd_lasso", "tp", "tp_sparse", "light", "tp_residual"]

PRESETS: Dict[str, Dict[str, Any]] = {
    "smoke": dict(arch="resnet26", input_size=(32, 16), train_ids=8, val_ids=4, pretrain_ids=8, test_ids=8,
                  budget=12, pretrain_iters=6, teacher_iters=6, p=4, k=2, lasso_grid=(1.0,), log_every=2,
                  latency_runs=(3, 1), eval_every=6, sites="all", flops_target=0.35, ratio=0.9, live_lasso=0.004),
    # the recommended recipe (README): at 416 iterations the authors' settings remove ~22% of the FLOPs
    # (results/tradeoff_cpu_authors); this one removes 65% within 1 mAP of KD heavy on two seeds and two
    # identity splits. --authors restores every setting of theirs.
    "cpu": dict(sites="all", flops_target=0.35, ratio=0.9, live_lasso=0.004),
    "full": dict(input_size=(256, 128), train_ids=726, val_ids=25, pretrain_ids=0, test_ids=0, budget=120 * 115,
                 pretrain_iters=0, teacher_iters=120 * 115, p=16, k=6, lasso=0.004, lasso_grid=(1.0,),
                 queue_size=24000, log_every=100, device="cuda", workers=8),
}


#: the authors' settings of the CDD rows (``--authors``; the full preset keeps them)
AUTHORS = dict(sites="paper", flops_target=0.0, ratio=0.5, live_lasso=0.0)


def default_cache() -> Path:
    return Path(os.environ.get("CDD_BENCH_CACHE") or Path.home() / ".cache" / "cdd_plugin" / "tradeoff")


#: CDDConfig fields added after the study's cache was first written, at the value that changes nothing;
#: a key leaves them out at that value, so a new setting does not invalidate hours of cached rows
_KEY_NEUTRAL = {"round_to": 1, "masked_lasso": None, "queue_dtype": "float32", "residual": False,
                "cut_embedding": False}
#: fields that never change a training run (what a checkpoint holds)
_KEY_IGNORED = ("checkpoint_queues",)


def _cfg_keys(cfg: cdd_plugin.CDDConfig) -> List[dict]:
    """The config as cache keys see it: the canonical form first, then the forms rows cached by
    earlier versions were written under (each subset of the neutral fields present)."""
    full = {k: v for k, v in cfg.to_dict().items() if k not in _KEY_IGNORED}
    neutral = [k for k, v in _KEY_NEUTRAL.items() if k in full and full[k] == v]
    out = []
    for mask in range(2 ** len(neutral)):
        drop = {k for i, k in enumerate(neutral) if not mask >> i & 1}
        out.append({k: v for k, v in full.items() if k not in drop})
    out.append(cfg.to_dict())
    return out


class Cache:
    """``DIR/<key>.json`` (result, history, per-query APs) and ``DIR/<key>.pth`` (weights); the key
    hashes every setting the entry depends on, so a changed setting never reuses a stale entry."""

    def __init__(self, root: Path, enabled: bool = True):
        self.dir = root
        self.dir.mkdir(parents=True, exist_ok=True)
        self.enabled = enabled

    def load(self, name: str, key: str) -> Optional[dict]:
        path = self.dir / f"{name}-{key}.json"
        if not self.enabled or not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def save(self, name: str, key: str, rec: dict) -> None:
        tmp = self.dir / f".{name}-{key}.json.tmp"
        tmp.write_text(json.dumps(rec, indent=1, default=_json_default))
        os.replace(tmp, self.dir / f"{name}-{key}.json")

    def weights(self, name: str, key: str) -> Path:
        return self.dir / f"{name}-{key}.pth"

    def save_weights(self, name: str, key: str, model: torch.nn.Module) -> Path:
        path = self.weights(name, key)
        tmp = path.with_name("." + path.name + ".tmp")
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
        os.replace(tmp, path)
        return path


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def paired(a: List[float], b: List[float]) -> Tuple[float, float]:
    """Mean difference (in mAP points) of per-query APs a - b and its standard error."""
    d = 100.0 * (np.asarray(a) - np.asarray(b))
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")


class Runner:
    def __init__(self, S: tc.Settings, out: Path, cache: Path, progress: str, use_cache: bool):
        self.S, self.out, self.progress = S, out, progress
        self.cache = Cache(cache, use_cache)
        self.dev = torch.device(S.device)
        self.data = tc.StudyData(S)
        self.classes = self.data.num_classes["study"]
        self.results: Dict[str, dict] = {}
        self.per_query: Dict[str, list] = {}
        self.histories: Dict[str, list] = {}
        self.selection: List[dict] = []
        self.notes: List[str] = []
        self._teacher: Optional[torch.nn.Module] = None
        heavy = tc.ReIDNet(S.arch, self.classes)
        self.heavy_flops = int(cdd_plugin.profile(tc.deploy(heavy, S), tc.example_input(S, 1))["flops"])
        st = cdd_plugin.insert_dgc(tc.ReIDNet(S.arch, self.classes), tc.example_input(S), cdd_plugin.CDDConfig(
            sites=S.sites))
        self.feature_sites = [s.tap[0] for s in st.sites]
        self._handlers: List[logging.Handler] = []
        self.lasso0, self.lasso_note = S.scaled_lasso()

    # -- bookkeeping -------------------------------------------------------------------------------
    def key(self, name: str, fields, **extra) -> str:
        # the feature term of the non-CDD students reads the CDD rows' tap points: with another placement
        # (--sites all) they optimise another loss (keys of the authors' placement are unchanged)
        if "feat_weight" in fields and "sites" not in fields and self.S.sites != "paper":
            extra = {"feature_sites": self.S.sites, **extra}
        return self.S.key(*fields, extra={"name": name, **extra})

    def _begin(self, name: str) -> float:
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        h = logging.FileHandler(self.out / "logs" / f"{name}.log", mode="w", encoding="utf-8")
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        for lg in ("bench_tradeoff", "cdd_plugin"):
            logging.getLogger(lg).addHandler(h)
        self._handlers.append(h)
        logger.info("==== %s (%s) ====", name, LABELS.get(name, name))
        return time.perf_counter()

    def _end(self) -> None:
        if self._handlers:
            h = self._handlers.pop()
            for lg in ("bench_tradeoff", "cdd_plugin"):
                logging.getLogger(lg).removeHandler(h)
            h.close()

    def _seed(self, offset: int) -> None:
        s = self.S.seed * 1000 + offset
        torch.manual_seed(s)
        np.random.seed(s % (2 ** 32))
        random.seed(s)

    def _evaluate_both(self, model: torch.nn.Module) -> dict:
        model = model.to(self.dev).eval()
        val = self.data.evaluate(model, "val")
        test, ap = self.data.evaluate(model, "test", per_query=True)
        return {"val": val, "test": test, "ap": ap}

    def _record(self, name: str, deployed: torch.nn.Module, t0: float, key: str, extra: dict,
                history: Optional[list] = None, measure: bool = True) -> dict:
        ev = self._evaluate_both(deployed)
        prof = tc.measure(copy.deepcopy(deployed), self.S) if measure else {
            "params": int(cdd_plugin.profile(deployed.cpu(), tc.example_input(self.S, 1))["params"]),
            "flops": int(cdd_plugin.profile(deployed.cpu(), tc.example_input(self.S, 1))["flops"]), "latency_ms": {}}
        res = {"row": name, "label": LABELS.get(name, name), **ev["test"],
               "val_mAP": ev["val"]["mAP"], "val_rank1": ev["val"]["rank1"], **prof,
               "flops_vs_heavy": prof["flops"] / self.heavy_flops, "wall_s": round(time.perf_counter() - t0, 1),
               **extra}
        if history is not None:
            history.append({"kind": "eval", "iteration": self.S.budget, "mAP": ev["val"]["mAP"],
                            "rank1": ev["val"]["rank1"], "merged": True, "flops_merged": prof["flops"],
                            "flops_planned": prof["flops"], "flops_dense": self.heavy_flops})
        self.cache.save(name, key, {"result": res, "history": history or [], "per_query_ap": ev["ap"]})
        lat = ", ".join(f"b{b} {v:.1f} ms" for b, v in prof["latency_ms"].items())
        logger.info("%s: test mAP %.2f (s.e. %.2f)  rank-1 %.2f  validation mAP %.2f  params %.2fM  FLOPs %.1fM "
                    "(%.1f%% of the heavy student)  %s  [%.0f s]", name, res["mAP"], res["mAP_se"], res["rank1"],
                    res["val_mAP"], prof["params"] / 1e6, prof["flops"] / 1e6, 100 * res["flops_vs_heavy"], lat,
                    res["wall_s"])
        return {"result": res, "history": history or [], "per_query_ap": ev["ap"]}

    def _use(self, name: str, rec: dict) -> None:
        self.results[name] = rec["result"]
        self.per_query[name] = rec["per_query_ap"]
        if rec.get("history"):
            self.histories[name] = rec["history"]

    # -- stages ------------------------------------------------------------------------------------
    def pretrained(self, width: int = 64) -> Dict[str, torch.Tensor]:
        """The pretraining stage's weights of the heavy (width 64) or light architecture (cached)."""
        S = self.S
        name = "pretrain" if width == 64 else f"pretrain_w{width}"
        key = self.key(name, S.PRETRAIN_FIELDS, width=width)
        path = self.cache.weights(name, key)
        if self.cache.enabled and path.is_file():
            logger.info("%s: pretrained weights from the cache (%s)", name, path)
            return torch.load(path, map_location="cpu", weights_only=True)
        model = tc.ReIDNet(S.arch, self.data.num_classes["pretrain"], width).to(self.dev)
        if S.pretrain_iters <= 0:
            return {k: v.cpu() for k, v in model.state_dict().items()}
        t0 = self._begin(name)
        try:
            self._seed(10 + width)
            model = tc.ReIDNet(S.arch, self.data.num_classes["pretrain"], width).to(self.dev)
            tc.train(name, model, self.data, S, which="pretrain", total=S.pretrain_iters, base_lr=S.pretrain_lr,
                     progress=self.progress)
            self.cache.save_weights(name, key, model)
            logger.info("%s: %d iterations on %d identities in %.0f s", name, S.pretrain_iters,
                        self.data.num_classes["pretrain"], time.perf_counter() - t0)
        finally:
            self._end()
        return torch.load(path, map_location="cpu", weights_only=True)

    def student(self, width: int = 64) -> torch.nn.Module:
        """A study network from the pretraining stage's weights, with a fresh classifier for the study's ids."""
        sd = {k: v for k, v in self.pretrained(width).items() if not k.startswith("classifier.")}
        self._seed(1)
        m = tc.ReIDNet(self.S.arch, self.classes, width)
        missing, unexpected = m.load_state_dict(sd, strict=False)
        assert not unexpected and all(k.startswith("classifier.") for k in missing), (missing, unexpected)
        return m.to(self.dev)

    def teacher(self) -> torch.nn.Module:
        if self._teacher is not None:
            return self._teacher
        S = self.S
        key = self.key("teacher", S.TRAIN_FIELDS)
        rec, path = self.cache.load("teacher", key), self.cache.weights("teacher", key)
        model = tc.ReIDNet(S.arch, self.classes)
        if rec is not None and path.is_file():
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            logger.info("teacher: from the cache (%s), test mAP %.2f", path, rec["result"]["mAP"])
        else:
            t0 = self._begin("teacher")
            try:
                model = self.student()
                tc.train("teacher", model, self.data, S, total=S.teacher_iters, progress=self.progress)
                self.cache.save_weights("teacher", key, model)
                rec = self._record("teacher", tc.deploy(model, S), t0, key, {"iterations": S.teacher_iters},
                                   measure=False)
            finally:
                self._end()
        self._use("teacher", rec)
        self._teacher = model.to(self.dev).eval()
        for p in self._teacher.parameters():
            p.requires_grad_(False)
        return self._teacher

    def kd_heavy(self) -> None:
        S = self.S
        key = self.key("kd_heavy", S.STUDENT_FIELDS, teacher=self.key("teacher", S.TRAIN_FIELDS))
        rec = self.cache.load("kd_heavy", key)
        if rec is None or not self.cache.weights("kd_heavy_at_mask_start", key).is_file():
            teacher = self.teacher()
            t0 = self._begin("kd_heavy")
            try:
                model = self.student()
                opt = tc.optimizer_for(model, S, S.lr)
                tc.train("kd_heavy", model, self.data, S, stop=S.mask_start, teacher=teacher, optimizer=opt,
                         feature_sites=self.feature_sites, progress=self.progress)
                self.cache.save_weights("kd_heavy_at_mask_start", key, model)
                tc.train("kd_heavy", model, self.data, S, start=S.mask_start, teacher=teacher, optimizer=opt,
                         feature_sites=self.feature_sites, progress=self.progress)
                rec = self._record("kd_heavy", tc.deploy(model, S), t0, key, {"iterations": S.budget})
            finally:
                self._end()
        self._use("kd_heavy", rec)
        self._kd_key = key

    def _cdd_cfg(self, lasso: float, criterion: str = "rggr", flops_target: Optional[float] = None,
                 **over) -> cdd_plugin.CDDConfig:
        """``lasso`` is the schedule-scaled (chosen) lasso; with ``live_lasso`` set (the recipe) it acts on
        masked rows only and the rows that still learn get ``live_lasso``."""
        S = self.S
        live = over.pop("live_lasso", S.live_lasso)
        steps = self.data.steps_per_epoch()
        queue = S.queue_size or min(24000, 2 * steps * S.p * S.k)
        kw = dict(lasso=lasso, threshold=S.threshold, criterion=criterion, k=S.rggr_k, ratio=S.ratio,
                  queue_size=int(queue), metric=S.metric, mask_start=S.mask_start, mask_interval=S.mask_interval,
                  flops_target=flops_target, sites=S.sites, decay_compactors=S.decay_compactors,
                  snap_to_zero=S.snap_to_zero)
        if live and criterion != "none":  # a lasso-only row has no masked rows: one lasso there
            kw.update(lasso=live, masked_lasso=lasso)
        mask_frac = over.pop("mask_start_frac", None)
        if mask_frac is not None:
            kw["mask_start"] = int(round(mask_frac * S.budget))
        kw.update(over)
        return cdd_plugin.CDDConfig(**kw)

    def run_cdd(self, name: str, cfg: cdd_plugin.CDDConfig, *, settings: Optional[tc.Settings] = None,
                end_cut: Optional[float] = None, cut_masked: bool = False,
                key_extra: Optional[dict] = None) -> dict:
        """Train one CDD student from the heavy pretraining with ``cfg``, merge, evaluate (cached)."""
        S = settings or self.S
        teacher_key = self.key("teacher", self.S.TRAIN_FIELDS)
        extra_key = dict(key_extra or {}, **({"cut_masked": True} if cut_masked else {}))
        keys = [self.key(name, S.CDD_FIELDS, teacher=teacher_key, cfg=c, end_cut=end_cut, **extra_key)
                for c in _cfg_keys(cfg)]
        key = keys[0]
        for k in keys:
            rec = self.cache.load(name, k)
            if rec is not None:
                logger.info("%s: from the cache: test mAP %.2f, validation mAP %.2f, FLOPs %.1f%%", name,
                            rec["result"]["mAP"], rec["result"]["val_mAP"], 100 * rec["result"]["flops_vs_heavy"])
                return rec
        teacher = self.teacher()
        t0 = self._begin(name)
        try:
            student = self.student()
            state = cdd_plugin.insert_dgc(student, tc.example_input(S, 2, S.device), cfg)
            logger.info("%s", state.report())
            logger.info("CDD config: %s", json.dumps(cfg.to_dict()))
            hist = tc.train(name, student, self.data, S, teacher=teacher, state=state, progress=self.progress,
                            evaluate=lambda m: self.data.evaluate(m, "val"))
            summ = state.summary()
            stats = tc.masked_row_stats(state)
            extra: Dict[str, Any] = {"criterion": cfg.criterion, "cdd_config": cfg.to_dict(),
                                     "dgc_sites": len(state.sites), "channels_total": summ["channels_total"],
                                     "channels_masked": summ["channels_total"] - summ["channels_active"],
                                     "channels_kept": summ["channels_kept"], "masked_rows": stats,
                                     "flops_planned": summ["flops_planned"], "iterations": S.budget}
            logger.info("%s: masked %d/%d channels (%d below the threshold), %d unmasked rows below the threshold; "
                        "merged FLOPs now %.1f%%", name, stats["masked"], summ["channels_total"],
                        stats["masked_below_threshold"], stats["unmasked_below_threshold"],
                        100 * summ["flops_ratio"])
            if end_cut is not None:
                extra["end_cut"] = tc.cut_to_flops(state, end_cut)
            if cut_masked:
                extra["end_cut"] = tc.cut_masked(state)
            predicted = state.predicted_flops()
            merged = cdd_plugin.merge(student)
            extra["flops_predicted"] = int(predicted)
            path = self.cache.weights(name + "_merged", key)
            cdd_plugin.save_merged(merged.cpu(), str(path),
                                   meta={"arch": S.arch, "classes": self.classes, "input": list(S.input_size)})
            extra["merged_path"] = str(path)
            rec = self._record(name, merged, t0, key, extra, hist)
            if rec["result"]["flops"] != predicted:
                logger.warning("%s: state.predicted_flops() = %d but profile(merge(model)) = %d", name, predicted,
                               rec["result"]["flops"])
        finally:
            self._end()
        return rec

    def cdd_rggr(self) -> None:
        """The lasso chosen on the validation split (module docstring), then the cdd_rggr row."""
        S = self.S
        cands = []
        target = S.flops_target or None
        for mult in S.lasso_grid:
            lam = self.lasso0 * mult
            rec = self.run_cdd(f"cdd_rggr_lasso{lam:.4g}", self._cdd_cfg(lam, flops_target=target))
            r = rec["result"]
            cands.append({"lasso": lam, "multiplier": mult, "val_mAP": r["val_mAP"], "test_mAP": r["mAP"],
                          "reduction": 1 - r["flops_vs_heavy"], "rec": rec})
        ok = [c for c in cands if c["reduction"] >= S.min_reduction]
        best = max(ok, key=lambda c: c["val_mAP"]) if ok else max(cands, key=lambda c: c["reduction"])
        why = (f"best validation mAP among the lassos removing >= {100 * S.min_reduction:.0f}% of the FLOPs" if ok
               else f"no lasso removed {100 * S.min_reduction:.0f}% of the FLOPs: the one that removed the most")
        for c in cands:
            self.selection.append({k: v for k, v in c.items() if k != "rec"} | {"chosen": c is best})
        logger.info("lasso chosen on the validation split: %.4g (%s); candidates: %s", best["lasso"], why,
                    ", ".join(f"{c['lasso']:.4g}: val mAP {c['val_mAP']:.2f}, -{100 * c['reduction']:.1f}% FLOPs"
                              for c in cands))
        self.lasso = best["lasso"]
        self.lasso_why = why
        rec = copy.deepcopy(best["rec"])
        parts = ["authors' placement" if S.sites == "paper" else "all sites"]
        if S.flops_target:
            parts.append(f"masks to {100 * S.flops_target:.0f}% FLOPs")
        if S.live_lasso:
            parts.append(f"p = {S.ratio:g}, lasso {S.live_lasso:g} live / {self.lasso:.3g} masked")
        LABELS["cdd_rggr"] = f"CDD + RGGR ({', '.join(parts)})"
        rec["result"].update(row="cdd_rggr", label=LABELS["cdd_rggr"], lasso_choice=why)
        self._use("cdd_rggr", rec)

    def ref(self) -> Tuple[int, str]:
        r = self.results.get("cdd_rggr")
        if r is not None and r["flops"] < 0.98 * self.heavy_flops:
            return int(r["flops"]), "CDD + RGGR's merged model"
        return int(0.35 * self.heavy_flops), "35% of the heavy student (CDD + RGGR compressed nothing)"

    def compressing_row(self, row: str) -> None:
        S = self.S
        ref, src = self.ref()
        frac = ref / self.heavy_flops
        lam = getattr(self, "lasso", self.lasso0)
        if row == "cdd_rggr_all":
            if S.sites == "all":
                logger.info("cdd_rggr_all: the main row already compacts every set (--sites all); skipped")
                return
            rec = self.run_cdd(row, self._cdd_cfg(lam, flops_target=frac, sites="all"))
        elif row == "cdd_rggr_paper":
            if S.sites == "paper":
                logger.info("cdd_rggr_paper: the main row already has the authors' placement; skipped")
                return
            rec = self.run_cdd(row, self._cdd_cfg(lam, flops_target=frac, sites="paper"))
        elif row == "cdd_authors":  # where the authors' settings get in this budget: no FLOPs target, not matched
            au = {k: v for k, v in AUTHORS.items() if k != "flops_target"}
            if all(getattr(S, k) == v for k, v in AUTHORS.items()):
                logger.info("cdd_authors: the main row has the authors' settings already (--authors); skipped")
                return
            rec = self.run_cdd(row, self._cdd_cfg(lam, **au))
        elif row == "cdd_norm":
            cfg = self._cdd_cfg(lam, "norm", flops_target=frac)
            cfg.norm_step = self._norm_step(cfg, ref)
            rec = self.run_cdd(row, cfg, cut_masked=True)
        elif row == "cdd_lasso":
            rec = self.run_cdd(row, self._cdd_cfg(lam, "none"), end_cut=ref)
        elif row in ABLATIONS:
            over = dict(ABLATIONS[row])
            live = over.pop("lasso", lam)
            if row.startswith("abl_live"):  # only masked rows get the schedule-scaled pull
                over["masked_lasso"] = lam
            S2 = copy.deepcopy(S)
            if "feat_tap" in over:
                S2.feat_tap = over.pop("feat_tap")
            rec = self.run_cdd(row, self._cdd_cfg(live, flops_target=S.flops_target or None, **over), settings=S2)
        elif row == "tp":
            rec = self.tp(ref)
        elif row == "tp_residual":
            rec = self.tp(ref, residual=True)
        elif row == "tp_sparse":
            rec = self.tp_sparse(ref)
        elif row == "light":
            rec = self.light(ref)
        else:
            raise ValueError(row)
        rec = copy.deepcopy(rec)
        rec["result"].update(row=row, label=LABELS[row])
        if row in COMPRESSING:
            rec["result"]["matched_to"] = src
        self._use(row, rec)

    def _norm_step(self, cfg: cdd_plugin.CDDConfig, ref: int) -> int:
        """Channels per refresh so that ResRep's rule reaches ``ref`` by the middle of the budget."""
        st = cdd_plugin.insert_dgc(tc.ReIDNet(self.S.arch, self.classes), tc.example_input(self.S), cfg)
        lo, hi = 0.0, 1.0
        for _ in range(40):
            f = 0.5 * (lo + hi)
            kept = {s.name: max(1, int(math.ceil((1 - f) * s.channels))) for s in st.sites}
            if st.predicted_flops(kept) <= ref:
                hi = f
            else:
                lo = f
        need = sum(s.channels - max(1, int(math.ceil((1 - hi) * s.channels))) for s in st.sites)
        window = max(1, (self.S.budget // 2 - cfg.mask_start) // cfg.mask_interval)
        return max(1, math.ceil(need / window))

    def _finetune(self, name: str, model, start: int, key: str, t0: float, extra: dict) -> dict:
        tc.train(name, model, self.data, self.S, start=start, teacher=self.teacher(),
                 feature_sites=self.feature_sites, progress=self.progress)
        return self._record(name, tc.deploy(model, self.S), t0, key, extra)

    def tp(self, ref: int, residual: bool = False) -> dict:
        S = self.S
        name = "tp_residual" if residual else "tp"
        key = self.key(name, S.STUDENT_FIELDS + ("tp_global",), kd=self._kd_key, ref=ref)
        rec = self.cache.load(name, key)
        if rec is not None:
            return rec
        t0 = self._begin(name)
        try:
            model = tc.ReIDNet(S.arch, self.classes)
            model.load_state_dict(torch.load(self.cache.weights("kd_heavy_at_mask_start", self._kd_key),
                                             map_location="cpu", weights_only=True))
            pruned, info = tc.tp_prune(model, S, ref, residual=residual)
            logger.info("%s: pruned at iteration %d with ratio %.4f", name, S.mask_start, info["pruning_ratio"])
            return self._finetune(name, pruned.to(self.dev), S.mask_start, key, t0,
                                  {**info, "pruned_at": S.mask_start, "iterations": S.budget})
        finally:
            self._end()

    def tp_sparse(self, ref: int) -> dict:
        import torch_pruning as tp

        S = self.S
        key = self.key("tp_sparse", S.STUDENT_FIELDS + ("tp_global", "tp_reg", "tp_sparse_frac"),
                       teacher=self.key("teacher", S.TRAIN_FIELDS), ref=ref)
        rec = self.cache.load("tp_sparse", key)
        if rec is not None:
            return rec
        teacher = self.teacher()
        t0 = self._begin("tp_sparse")
        try:
            model = self.student()
            sparse = tc.SparseTrainer(model, S)
            at = int(round(S.tp_sparse_frac * S.budget))
            tc.train("tp_sparse", model, self.data, S, stop=at, teacher=teacher, after_backward=sparse.regularize,
                     feature_sites=self.feature_sites, progress=self.progress)
            pruned, info = tc.tp_prune(model, S, ref, importance=tp.importance.GroupMagnitudeImportance(p=2))
            logger.info("tp_sparse: sparse training until iteration %d (reg %g), pruned with ratio %.4f", at,
                        S.tp_reg, info["pruning_ratio"])
            return self._finetune("tp_sparse", pruned.to(self.dev), at, key, t0,
                                  {**info, "sparse_until": at, "reg": S.tp_reg, "iterations": S.budget})
        finally:
            self._end()

    def light(self, ref: int) -> dict:
        S = self.S
        width, wflops = tc.light_width(S, self.classes, ref)
        key = self.key("light", S.STUDENT_FIELDS, teacher=self.key("teacher", S.TRAIN_FIELDS), width=width)
        rec = self.cache.load("light", key)
        if rec is not None:
            return rec
        teacher = self.teacher()
        model = self.student(width)
        t0 = self._begin("light")
        try:
            tc.train("light", model, self.data, S, teacher=teacher, feature_sites=self.feature_sites,
                     progress=self.progress)
            return self._record("light", tc.deploy(model, S), t0, key, {"width_per_group": width,
                                                                        "iterations": S.budget})
        finally:
            self._end()

    def run(self, rows: List[str]) -> None:
        self.pretrained()
        self.teacher()
        if any(r in rows for r in ["kd_heavy", "tp", "tp_residual"]):
            self.kd_heavy()
        if any(r != "teacher" and r != "kd_heavy" for r in rows):
            self.cdd_rggr()
        for row in rows:
            if row in COMPRESSING or row in ABLATIONS or row == "cdd_authors":
                self.compressing_row(row)
        if "cdd_rggr" in self.results and "kd_heavy" in self.results:
            self.speed = self.speed_check()

    def speed_check(self) -> Optional[dict]:
        S = self.S
        path = Path(self.results["cdd_rggr"].get("merged_path", ""))
        if not path.is_file():
            return None
        merged = cdd_plugin.load_merged(str(path), tc.ReIDNet(S.arch, self.classes))
        heavy = tc.deploy(tc.ReIDNet(S.arch, self.classes), S)
        lat = tc.interleaved_latency({"kd_heavy": heavy, "cdd_rggr": merged}, S)
        factor = self.heavy_flops / self.results["cdd_rggr"]["flops"]
        sp = {b: lat["kd_heavy"][b] / lat["cdd_rggr"][b] for b in lat["kd_heavy"]}
        return {"latency_ms": lat, "speedup": sp, "flops_factor": factor}


# ---------------------------------------------------------------------------------------------- results


def targets(runner: Runner) -> List[dict]:
    R, pq = runner.results, runner.per_query
    out = []
    if "cdd_rggr" in R and "kd_heavy" in R:
        c, k = R["cdd_rggr"], R["kd_heavy"]
        d, se = paired(pq["cdd_rggr"], pq["kd_heavy"])
        red = 1 - c["flops_vs_heavy"]
        ok = red >= 0.60 and d >= -1.0
        out.append({"target": "CDD + RGGR removes >= 60% of the heavy student's FLOPs with test mAP >= KD heavy - 1.0",
                    "measured": f"-{100 * red:.1f}% FLOPs; mAP {c['mAP']:.2f} vs {k['mAP']:.2f}: {d:+.2f} "
                                f"(paired s.e. {se:.2f})", "status": "met" if ok else "MISSED"})
    if "cdd_rggr" in R:
        parts, all_ok = [], True
        for row in COMPRESSING:
            if row not in R:
                continue
            d, se = paired(pq["cdd_rggr"], pq[row])
            all_ok &= d > 0
            parts.append(f"vs {LABELS[row]} {d:+.2f} (s.e. {se:.2f}, its FLOPs x{R[row]['flops'] / R['cdd_rggr']['flops']:.3f})")
        if parts:
            out.append({"target": "at equal FLOPs CDD + RGGR beats every other compression row and the light student",
                        "measured": "; ".join(parts), "status": "met" if all_ok else "MISSED"})
    return out


def write_results(runner: Runner, t_start: float) -> None:
    S, out = runner.S, runner.out
    order = ROWS + EXTRA_ROWS + list(ABLATIONS)
    rows = [runner.results[r] for r in order if r in runner.results]
    summary = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
        "machine": tc.machine(), "settings": S.to_dict(), "data": runner.data.describe(),
        "heavy_student_flops": runner.heavy_flops, "lasso_scaling": runner.lasso_note,
        "lasso_selection": runner.selection, "wall_s": round(time.perf_counter() - t_start, 1),
        "rows": rows, "targets": targets(runner), "speed_check": getattr(runner, "speed", None),
        "paired_vs_cdd_rggr": {r["row"]: paired(runner.per_query["cdd_rggr"], runner.per_query[r["row"]])
                               for r in rows if "cdd_rggr" in runner.per_query and r["row"] != "cdd_rggr"},
        # every pair of rows: (row a - row b, s.e.) in mAP points over the same test queries
        "paired": {a["row"]: {b["row"]: paired(runner.per_query[a["row"]], runner.per_query[b["row"]])
                              for b in rows if b["row"] != a["row"] and b["row"] in runner.per_query}
                   for a in rows if a["row"] in runner.per_query},
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=_json_default))
    if rows:
        tc.plot_tradeoff(rows, out / "tradeoff.png", runner.heavy_flops)
    hists = {r: h for r, h in runner.histories.items() if r.startswith(("cdd", "abl"))}
    if hists:
        tc.plot_training(hists, LABELS, out / "cdd_training.png")
    (out / "results.md").write_text(markdown(summary, S))


def markdown(s: dict, S: tc.Settings) -> str:
    bs = [str(b) for b in S.latency_batches]
    m = s["machine"]
    L = [f"# CDD trade-off study on Market-1501 ({S.preset} preset)", "",
         f"- date: {s['date']}; wall time {s['wall_s'] / 60:.1f} min", f"- command: `{s['command']}`",
         f"- machine: {m.get('cpu_model', m['processor'])}, {m['cpu_count']} cores, torch {m['torch']}, "
         f"torch-pruning {m.get('torch_pruning', '?')}, device {S.device}, load average at start "
         f"{m.get('load_average_at_start')}",
         f"- data: {s['data']}",
         f"- network: {S.arch} (teacher, heavy student), input {S.input_size[0]}x{S.input_size[1]}; pretraining "
         f"{S.pretrain_iters} iterations, teacher {S.teacher_iters}, every row {S.budget} (masks / pruning from "
         f"{S.mask_start})",
         f"- {s['lasso_scaling']}", "", "## Results (test identities)", "",
         "| row | mAP (s.e.) | vs CDD + RGGR (paired s.e.) | vs KD heavy (paired s.e.) | rank-1 | val mAP | "
         "params (M) | MFLOPs | FLOPs vs heavy | " + " | ".join(f"ms b{b}" for b in bs) + " | notes |",
         "|---|---|---|---|---|---|---|---|---|" + "---|" * len(bs) + "---|"]
    for r in s["rows"]:
        pv = s["paired_vs_cdd_rggr"].get(r["row"])
        pvs = f"{-pv[0]:+.2f} ({pv[1]:.2f})" if pv else "-"
        pk = s.get("paired", {}).get(r["row"], {}).get("kd_heavy")
        pks = f"{pk[0]:+.2f} ({pk[1]:.2f})" if pk else "-"
        note = []
        if "channels_masked" in r:
            mr = r["masked_rows"]
            note.append(f"{r['dgc_sites']} sites; masked {r['channels_masked']}/{r['channels_total']} "
                        f"({mr['masked_below_threshold']} at 0), {mr['unmasked_below_threshold']} unmasked rows at 0")
        if "end_cut" in r:
            note.append(f"end cut {r['end_cut']['rows_cut']} rows (largest {r['end_cut']['largest_cut_norm']:.1e})")
        if "pruning_ratio" in r:
            note.append(f"ratio {r['pruning_ratio']}")
        if "width_per_group" in r:
            note.append(f"width_per_group {r['width_per_group']}")
        if "matched_to" in r:
            note.append(f"matched to {r['matched_to']}")
        L.append(f"| {r['label']} | {r['mAP']:.2f} ({r['mAP_se']:.2f}) | {pvs} | {pks} | {r['rank1']:.2f} | "
                 f"{r['val_mAP']:.2f} | {r['params'] / 1e6:.2f} | {r['flops'] / 1e6:.1f} | "
                 f"{100 * r['flops_vs_heavy']:.1f}% | "
                 + " | ".join(f"{r['latency_ms'][b]:.1f}" if b in r.get("latency_ms", {}) else "-" for b in bs)
                 + f" | {'; '.join(note)} |")
    L += ["", "Paired differences are (row - CDD + RGGR) and (row - KD heavy) in mAP points over the same test "
          "queries (every pair in results.json under 'paired').", "",
          "## Lasso chosen on the validation split", "",
          "| lasso | x scaled | val mAP | FLOPs removed | test mAP | chosen |", "|---|---|---|---|---|---|"]
    for c in s["lasso_selection"]:
        L.append(f"| {c['lasso']:.4g} | {c['multiplier']:g} | {c['val_mAP']:.2f} | {100 * c['reduction']:.1f}% | "
                 f"{c['test_mAP']:.2f} | {'yes' if c['chosen'] else ''} |")
    L += ["", "## Targets", "", "| target | measured | status |", "|---|---|---|"]
    for t in s["targets"]:
        L.append(f"| {t['target']} | {t['measured']} | {t['status']} |")
    sc = s.get("speed_check")
    if sc:
        L += ["", "## Speed (heavy student vs merged CDD + RGGR, measured in alternation)", "",
              "| batch | heavy (ms) | merged (ms) | speed-up | FLOPs factor |", "|---|---|---|---|---|"]
        for b, sp in sc["speedup"].items():
            L.append(f"| {b} | {sc['latency_ms']['kd_heavy'][b]:.1f} | {sc['latency_ms']['cdd_rggr'][b]:.1f} | "
                     f"x{sp:.2f} | x{sc['flops_factor']:.2f} |")
    L += ["", "Files: results.json (every figure and setting), tradeoff.png, cdd_training.png, run.log, logs/.", ""]
    return "\n".join(L)


# ---------------------------------------------------------------------------------------------- main


def build_settings(args) -> tc.Settings:
    S = tc.Settings(preset=args.preset, **PRESETS[args.preset])
    if args.authors:
        for k, v in AUTHORS.items():
            setattr(S, k, v)
    for k in ("seed", "subset_seed", "device", "budget", "lasso", "threads", "workers", "arch", "ratio", "sites",
              "flops_target", "live_lasso"):
        v = getattr(args, k)
        if v is not None:
            setattr(S, k, v)
    if args.input:
        S.input_size = tuple(int(v) for v in args.input.lower().split("x"))
    if args.lasso_grid:
        S.lasso_grid = tuple(float(v) for v in args.lasso_grid.split(","))
    S.data_root = args.data or os.environ.get("CDD_MARKET1501", "") or str(cdd_plugin.datasets.default_market1501_root())
    if S.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {S.device} (the {S.preset} preset's default) needs CUDA and torch sees none here; "
                         "run on a GPU machine or pass --device cpu")
    if not os.path.isdir(S.data_root):
        raise SystemExit(f"Market-1501 not found at {S.data_root}; pass --data or set CDD_MARKET1501")
    return S


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--rows", default="all", help=f"comma-separated rows of {','.join(ROWS + EXTRA_ROWS)} or "
                    f"ablations {','.join(ABLATIONS)} (default: {','.join(ROWS)})")
    ap.add_argument("--out", default=None, help="output folder (default runs/tradeoff/<preset>)")
    ap.add_argument("--cache", default=None, help="cache folder (default $CDD_BENCH_CACHE or ~/.cache/cdd_plugin/"
                    "tradeoff); pretraining, teacher and rows are reused while their settings match")
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--subset-seed", type=int, help="another choice of pretraining / study / validation / test ids")
    ap.add_argument("--device")
    ap.add_argument("--budget", type=int, help="training iterations of every row")
    ap.add_argument("--lasso", type=float, help="fixed lasso (default: the paper's scaled to the schedule)")
    ap.add_argument("--authors", action="store_true", help="the CDD rows with every setting the authors' (their "
                    "placement, p = 0.5, one lasso on every row, no FLOPs target); the cpu preset's default is the "
                    "recommended recipe")
    ap.add_argument("--live-lasso", type=float, help="the lasso of the rows that still learn, the chosen one on "
                    "masked rows only (cpu preset: 0.004, the paper's; 0 = one lasso on every row, the authors')")
    ap.add_argument("--ratio", type=float, help="RGGR candidate ratio p (cpu preset: 0.9; --authors: 0.5)")
    ap.add_argument("--lasso-grid", help="comma-separated multipliers of the scaled lasso to choose from on the "
                    "validation split (default 0.25,1)")
    ap.add_argument("--sites", choices=["paper", "all"], help="placement of the CDD rows (cpu preset: 'all'; "
                    "--authors: 'paper'); the cdd_rggr_all / cdd_rggr_paper rows run the other one")
    ap.add_argument("--flops-target", type=float, help="cdd_rggr stops masking once the merged model keeps this "
                    "fraction of the FLOPs (ours; cpu preset 0.35; 0 = none, the authors')")
    ap.add_argument("--arch", choices=sorted(tc.ARCH_LAYERS))
    ap.add_argument("--input", help="HxW")
    ap.add_argument("--data", help="Market-1501 folder (default $CDD_MARKET1501 or ../shared/data/...)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--workers", type=int)
    ap.add_argument("--progress", choices=["auto", "always", "never"], default="auto")
    args = ap.parse_args(argv)

    S = build_settings(args)
    rows = ROWS if args.rows == "all" else [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS + EXTRA_ROWS and r not in ABLATIONS]
    if bad:
        raise SystemExit(f"unknown row(s) {bad}; choose from {', '.join(ROWS + EXTRA_ROWS + list(ABLATIONS))}")
    out = Path(args.out or f"runs/tradeoff/{S.preset}")
    out.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    for h in (logging.StreamHandler(sys.stderr), logging.FileHandler(out / "run.log", mode="a", encoding="utf-8")):
        h.setFormatter(fmt)
        for name in ("bench_tradeoff", "cdd_plugin"):
            lg = logging.getLogger(name)
            lg.setLevel(logging.INFO)
            lg.addHandler(h)
            lg.propagate = False
    torch.set_num_threads(S.threads or min(4, os.cpu_count() or 1))
    t_start = time.perf_counter()
    cache = Path(args.cache) if args.cache else default_cache() / S.preset
    logger.info("bench_tradeoff: preset %s, rows %s, out %s, cache %s, %d thread(s)", S.preset, ",".join(rows), out,
                cache, torch.get_num_threads())
    runner = Runner(S, out, cache, args.progress, not args.no_cache)
    logger.info("data: %s", runner.data.describe())
    logger.info("%s; lasso grid x%s, masks from iteration %d of %d", runner.lasso_note,
                ",".join(f"{g:g}" for g in S.lasso_grid), S.mask_start, S.budget)
    try:
        runner.run(rows)
    finally:
        write_results(runner, t_start)
        logger.info("wrote %s", out / "results.md")
    for t in targets(runner):
        logger.info("target: %s -> %s [%s]", t["target"], t["measured"], t["status"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
