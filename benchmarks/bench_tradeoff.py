"""Accuracy / efficiency trade-off of CDD + RGGR against its baselines on Market-1501.

    python benchmarks/bench_tradeoff.py [--preset cpu|smoke|full] [--rows ROW,...] [--out DIR]
                                        [--seed N] [--device cpu|cuda] [--epochs N] [--flops-target F]

Every row is trained by ONE training loop (``tradeoff_common.train``) with one schedule
(SGD momentum 0.9, weight decay 5e-4 (none on DGCs), linear warm-up then cosine decay to 0),
one seed policy (the same PK batches and the same random augmentations at every iteration
for every row; teachers are initialised from ``--seed``, students from ``--seed + 1``) and
one evaluation (``cdd_plugin.evaluation.evaluate_reid`` on the subset's query / gallery,
cosine distance, re-ID protocol: same identity and camera removed; mAP and rank-1):

=============  ===========================================================================
row            what
=============  ===========================================================================
teacher        the heavy architecture trained with CE (label smoothing 0.1) + triplet;
               cached in ``OUT/cache/teacher.pth`` and reused while the settings match
kd_heavy       heavy student (the teacher's architecture), CE + triplet + logit KD
               (the core's ``triplet_loss`` / ``kd_loss``), not compressed
cdd_rggr       ``insert_dgc`` + ``CDDDistiller`` + ``RGGROptimizer``, criterion "rggr",
               ``flops_target`` (default 0.35: ~65% fewer FLOPs, as in the paper)
cdd_norm       the same with ResRep's rule (criterion "norm"), at the FLOPs of cdd_rggr
cdd_lasso      criterion "none" (group lasso, no gradient resetting); at the end the
               smallest-norm DGC rows (global ranking) are cut to the FLOPs of cdd_rggr, so the
               rows compare at equal FLOPs (cutting rows that are not zero changes the function;
               that is the cost of compressing without masks)
light          a fixed narrow network: the same ResNet with the integer ``width_per_group`` whose
               FLOPs are closest to the cdd_rggr merged model (``width_per_group`` scales exactly
               the bottleneck widths CDD compacts), KD from scratch
tp             torch-pruning one-shot magnitude pruning (``MagnitudeImportance(p=2)`` +
               ``BasePruner``) of the trained kd_heavy to the same FLOPs, then KD fine-tuning for
               the same number of epochs. Only the channel sets CDD compacts are prunable (every
               other conv / linear is in ``ignored_layers``: residual channels are NOT pruned);
               per-layer uniform ratio (``--tp-global`` for global ranking); ratio by bisection
=============  ===========================================================================

"At equal FLOPs" means the merged FLOPs of cdd_rggr in this run (or the cached cdd_rggr of
the same settings). If cdd_rggr is neither run nor cached, or compressed nothing, the
baselines use ``--flops-target`` x the heavy student's FLOPs instead (said in the results).
With ``--feat-weight > 0`` the FitNet feature term (METHOD.md section 3) is added at the
compacted sites wherever the student's width there equals the teacher's (every site for
kd_heavy and the CDD rows, only the stem for the light student, none of the pruned ones for
tp). It is 0 by default so that every student row optimises exactly the same loss:
CE + triplet + logit KD (at weight 0.5 the term also dwarfs the others here: ~100 vs ~15).

Each row reports mAP, rank-1 (and rank-5), params and FLOPs (``cdd_plugin.profile``: MACs,
batch 1, eval input) of the DEPLOYED model (merged CDD students; every other row with the
same BatchNorms folded by ``insert_dgc`` + ``merge(threshold=0)`` on a copy: same function,
counted and timed in the same form) and the median CPU latency at batch 1 and 32
(``cdd_plugin.profile(..., latency=True)``). Outputs in ``--out`` (default runs/tradeoff/,
git-ignored): results.json, results.md (table, targets, machine, command, date, notes),
tradeoff.png (mAP vs FLOPs), cdd_training.png (predicted merged FLOPs every ``log_every``
iterations and mAP every ``eval_every`` epochs for the CDD rows), run.log and
logs/<row>.log, cache/ (teacher and per-row results; rows not asked for with ``--rows``
are taken from there when their settings match).

Presets
-------
``--preset cpu`` (default; aims at <= 90 minutes on this 2-core CPU when nobody else uses it).
Costs (the lead's unshared measurements on this machine): ResNet-50 fwd+bwd at 256x128,
batch 16, ~2.4 s/it; ResNet-18 ~0.9 s/it; cost ~linear in pixels x batch; a forward pass
~1/3 of a training step. My own measurements were taken while other engineers ran tests
(load average ~6 on 2 cores) and are ~5-10x slower, so they only confirm the ratios:
ResNet-50 128x64 batch 32 fwd+bwd 14 s/it, its width-24 light version 4-6 s/it (about its
FLOPs ratio), a KD step ~ a plain step + the teacher's forward. Choices:

* ResNet-50 teacher and heavy student (the paper's R50 setting; a bottleneck ResNet so that
  the light student is the same network with a smaller ``width_per_group``);
* input 128x64, Market-1501's native resolution (256x128 only upsamples): 1/4 of the pixels,
  ~1.2 s per training iteration at batch 32 (8 identities x 4 images);
* 100 training identities (1,695 images, 52 iterations per epoch) and 200 test identities
  (892 queries, 3,383 gallery images; more test than training identities because evaluation
  noise limits what a 1-mAP target can resolve; the standard error of mAP is reported);
* 8 epochs = 416 iterations per row. Estimate (printed at start, ``--estimate-only``):
  teacher 9 min, heavy KD 12, three CDD rows 15 each (with 3 in-training evaluations),
  light and pruned students 6 each, surgery / merging / pruning search / latency ~3:
  ~82 minutes.

Training from scratch (no internet, no ImageNet weights) needs two departures that apply to
EVERY row alike: ``zero_init_residual=True`` (the last BN of each bottleneck starts at 0) and
base LR 0.02 instead of 0.05. Without them a from-scratch ResNet-50 diverged in the first 16
iterations of my test (loss 17 -> 140, conv weight norm 203 -> 1,400, and DGC rows grew to
norm 45, far beyond what the lasso can bring back to 0); with them it trained stably.

``--preset full``: the paper's settings on a GPU (``--device cuda`` is its default; without
CUDA it stops with an error): full Market-1501 (751 / 750 identities, distractors in the
gallery), 256x128, ResNet-50 (``--arch resnet101`` for R101), 120 epochs, base LR 0.01,
cosine, 10 warm-up epochs, masks from epoch 20, lasso 0.004, queue 24000, K=2, ratio 0.5;
batches of 10 identities x 6 instances (the authors' 6 instances; 10 = FastReID's 64 // 6).
The paper fine-tunes ImageNet weights; here everything trains from scratch.

``--preset smoke``: about two minutes end to end on an idle machine (ResNet-26 bottleneck
network, 8 identities, 64x32 input, 1 epoch = 7 iterations per row) to check the plumbing;
its numbers mean nothing (RGGR cannot compress in 7 iterations, so the baselines are matched
to ``--flops-target`` instead, which the results say).

Lasso, LR, warm-up, mask start and RGGR ratio (the CPU preset vs the paper)
---------------------------------------------------------------------------
The schedule is the paper's, compressed: warm-up over the first 10/120 of the iterations
(35 of 416), masks from 20/120 (iteration 69), cosine decay to 0.

Lasso. A masked DGC row only feels the lasso and, with SGD momentum 0.9, moves by
~lr x lasso / (1 - 0.9) per iteration. With the paper's lr 0.01 and lasso 0.004 that is
4e-4: a row of norm ~1 needs ~2,500 full-LR iterations, which the paper's ~26,000 iterations
provide and 416 do not. The CPU preset uses lasso 0.08 with lr 0.02 (1.6e-2 per full-LR
iteration): a row masked by 40% of the schedule still has ~72 full-LR-equivalent iterations
of the cosine left, i.e. can travel a norm of ~1.1, and the rows are smaller than 1 by then
(the lasso shrinks every row from the start: in my test at lasso 0.1 the median DGC row norm
fell from 1.0 to 0.45 in the first 38 iterations). lasso x lr x iterations is ~0.65x the
paper's 0.004 x 0.01 x 25,800, so the total pull of the lasso over training is of the paper's
order. Once a masked row is within one step of zero the core's proximal snap (``CDDConfig.
snap_to_zero``, on by default) sets it exactly to zero, so it ends below the merge threshold
1e-5 instead of oscillating around zero until the LR has decayed.

RGGR ratio 0.9 (paper 0.5). A channel becomes a candidate only if it is among the ``ratio``
least contributing channels for EVERY (query, neighbour) pair of the batch (64 pairs at
batch 32). Measured on this task (ResNet-50, 64x32, batch 32, a teacher after 60 iterations,
the CDD student's first 38 iterations): ratio 0.5 gave 0-17 candidates per iteration out of
7,616 channels, 0.7 gave 24-114, 0.9 gave 650-1,100. The paper's ~21,000 iterations after the
mask start accumulate enough candidates at 0.5; the ~140 iterations this schedule can afford
before the middle of training would not reach the 35% FLOPs target (the demo uses 0.9 for the
same reason). The masks stay retrieval-guided: a channel among the top 10% contributors of
any pair is never masked, and among the candidates the core masks the smallest norms first.
``--ratio 0.5`` runs the paper's value. Checked at this schedule's length on the smoke network
(``--preset smoke --epochs 60 --mask-start-epoch 10``: 420 iterations, masks from iteration 70):
RGGR met the 35% target at iteration 72, every masked row was exactly zero by iteration 140,
and the merged model kept 34.8% of the FLOPs (``state.predicted_flops()`` = profiled).

The norm criterion adds ``norm_step`` channels per iteration, sized so that it meets the
target at the iteration at which RGGR met it (the same masking window; half of the schedule
when RGGR is not available). results.md reports, for every CDD row, when the masks met the
target and how many masked rows actually ended below the threshold.

Determinism: on the CPU a run is a function of ``--seed`` and the thread count (``--threads``).
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
from typing import Any, Dict, List, Optional

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cdd_plugin  # noqa: E402
import tradeoff_common as tc  # noqa: E402

logger = logging.getLogger("bench_tradeoff")

ROWS = ["teacher", "kd_heavy", "cdd_rggr", "cdd_norm", "cdd_lasso", "light", "tp"]
LABELS = {"teacher": "teacher", "kd_heavy": "heavy student, KD", "cdd_rggr": "CDD + RGGR",
          "cdd_norm": "CDD + norm (ResRep)", "cdd_lasso": "CDD, lasso only + cut", "light": "light student, KD",
          "tp": "torch-pruning + KD"}
CRITERION = {"cdd_rggr": "rggr", "cdd_norm": "norm", "cdd_lasso": "none"}

PRESETS: Dict[str, Dict[str, Any]] = {
    "smoke": dict(arch="resnet26", input_size=(64, 32), train_ids=8, test_ids=8, epochs=1, lr=0.02,
                  warmup_epochs=0.2, p=4, k=4, lasso=0.1, ratio=0.9, mask_start_epoch=0.25, eval_every=1,
                  log_every=1, latency_batches=(1, 32), latency_runs=(3, 1), norm_done_frac=0.6),
    "cpu": dict(arch="resnet50", input_size=(128, 64), train_ids=100, test_ids=200, epochs=8, lr=0.02,
                warmup_epochs=8 * 10 / 120, p=8, k=4, lasso=0.08, ratio=0.9, mask_start_epoch=8 * 20 / 120,
                eval_every=2, log_every=8, latency_batches=(1, 32), latency_runs=(21, 6), norm_done_frac=0.5),
    "full": dict(arch="resnet50", input_size=(256, 128), train_ids=0, test_ids=0, epochs=120, lr=0.01,
                 warmup_epochs=10.0, p=10, k=6, lasso=0.004, ratio=0.5, queue_size=24000, mask_start_epoch=20.0,
                 eval_every=10, log_every=50, latency_batches=(1, 32), latency_runs=(21, 6), norm_done_frac=0.5,
                 device="cuda", workers=8),
}

# ---------------------------------------------------------------------------------------------- costs

# the lead's unshared measurement on this 2-core machine: ResNet-50, 256x128, batch 16, fwd+bwd
REF_STEP_S, REF_BATCH = 2.4, 16
CDD_OVERHEAD = 1.10      # bench_speed.py's target for the CDD step vs the KD step


def estimate(S: tc.Settings, data: tc.MarketData, heavy_plain: int, ref_fraction: float) -> Dict[str, float]:
    """Estimated CPU seconds per phase, from the reference per-iteration cost (see docstring)."""
    r50 = tc.plain_flops(tc.ReIDNet("resnet50", 100), tc.Settings(input_size=(256, 128)))
    per_mac_img = REF_STEP_S / (REF_BATCH * r50)          # seconds per MAC and image, fwd + bwd
    B = S.p * S.k
    its = data.steps_per_epoch * S.epochs
    step = lambda f: per_mac_img * f * B                   # noqa: E731
    fwd = lambda f: per_mac_img * f * B / 3.0              # noqa: E731
    light = heavy_plain * ref_fraction
    eval_imgs = len(data.query) + len(data.gallery)
    n_evals = (S.epochs - 1) // max(1, S.eval_every)   # in-loop evaluations (the last epoch: the merged model)
    ev = lambda f: per_mac_img * f * eval_imgs / 3.0       # noqa: E731
    out = {
        "teacher": its * step(heavy_plain) + ev(heavy_plain),
        "kd_heavy": its * (step(heavy_plain) + fwd(heavy_plain)) + ev(heavy_plain),
        "cdd_rggr": its * (CDD_OVERHEAD * step(heavy_plain) + fwd(heavy_plain)) + (n_evals + 1) * ev(heavy_plain),
        "light": its * (step(light) + fwd(heavy_plain)) + ev(light),
        "tp": its * (step(light) + fwd(heavy_plain)) + ev(light),
        "fixed (surgery, merge, pruning search, latency)": 180.0 * (S.input_size[0] * S.input_size[1] / (128 * 64)) ** 0.5,
    }
    out["cdd_norm"] = out["cdd_lasso"] = out["cdd_rggr"]
    out["total"] = sum(out.values())
    out["iterations_per_row"] = its
    return out


# ---------------------------------------------------------------------------------------------- caching


class Cache:
    """``OUT/cache/<row>.json`` (key, result, history, per-query APs) and ``<row>.pth`` (weights)."""

    def __init__(self, out: Path, enabled: bool = True):
        self.dir = out / "cache"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.enabled = enabled

    def load(self, row: str, key: str) -> Optional[dict]:
        path = self.dir / f"{row}.json"
        if not self.enabled or not path.is_file():
            return None
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return rec if rec.get("key") == key else None

    def save(self, row: str, rec: dict) -> None:
        tmp = self.dir / f".{row}.json.tmp"
        tmp.write_text(json.dumps(rec, indent=1, default=_json_default))
        os.replace(tmp, self.dir / f"{row}.json")

    def weights(self, row: str) -> Path:
        return self.dir / f"{row}.pth"


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ---------------------------------------------------------------------------------------------- runner


class Runner:
    def __init__(self, S: tc.Settings, out: Path, progress: str, use_cache: bool):
        self.S, self.out, self.progress = S, out, progress
        self.cache = Cache(out, use_cache)
        self.dev = torch.device(S.device)
        self.data = tc.MarketData(S)
        self.classes = self.data.num_classes
        self.results: Dict[str, dict] = {}
        self.histories: Dict[str, list] = {}
        self.per_query: Dict[str, list] = {}
        self.teacher: Optional[torch.nn.Module] = None
        self.kd_heavy: Optional[torch.nn.Module] = None
        self.notes: List[str] = []
        heavy = tc.ReIDNet(S.arch, self.classes)
        self.heavy_plain = tc.plain_flops(heavy, S)
        self.heavy_deployed = int(cdd_plugin.profile(tc.deploy(heavy, S), tc.example_input(S, 1))["flops"])
        self.feature_sites: List[str] = []
        self._row_handler: Optional[logging.Handler] = None

    # -- keys ------------------------------------------------------------------------------------
    def key(self, row: str, extra: Optional[dict] = None) -> str:
        S = self.S
        fields = {"teacher": S.TRAIN_FIELDS, "kd_heavy": S.STUDENT_FIELDS, "light": S.STUDENT_FIELDS,
                  "tp": S.STUDENT_FIELDS + ("tp_global",)}.get(row, S.CDD_FIELDS)
        e = {"row": row, **(extra or {})}
        if row != "teacher":
            e["teacher"] = self.key("teacher")
        return S.key(*fields, extra=e)

    def ref_flops(self) -> tuple:
        """(FLOPs every baseline is matched to, where it comes from)."""
        r = self.results.get("cdd_rggr")
        if r is not None and r["flops"] < 0.98 * self.heavy_deployed:
            return int(r["flops"]), "cdd_rggr merged model"
        why = "cdd_rggr not run or cached" if r is None else "cdd_rggr compressed nothing"
        return int(self.S.flops_target * self.heavy_deployed), f"--flops-target x heavy student ({why})"

    # -- logging per row ---------------------------------------------------------------------------
    def _begin(self, row: str) -> float:
        (self.out / "logs").mkdir(exist_ok=True)
        h = logging.FileHandler(self.out / "logs" / f"{row}.log", mode="w", encoding="utf-8")
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        for name in ("bench_tradeoff", "cdd_plugin"):
            logging.getLogger(name).addHandler(h)
        self._row_handler = h
        logger.info("==== %s (%s) ====", row, LABELS[row])
        return time.perf_counter()

    def _end(self) -> None:
        h = self._row_handler
        if h is not None:
            for name in ("bench_tradeoff", "cdd_plugin"):
                logging.getLogger(name).removeHandler(h)
            h.close()
        self._row_handler = None

    def _seed(self, offset: int) -> None:
        s = self.S.seed + offset
        torch.manual_seed(s)
        np.random.seed(s % (2 ** 32))
        random.seed(s)

    # -- finishing a row ---------------------------------------------------------------------------
    def _finish(self, row: str, deployed: torch.nn.Module, t0: float, key: str, extra: dict,
                history: Optional[list] = None) -> dict:
        deployed = deployed.to(self.dev).eval()
        metrics, ap = self._evaluate(deployed)
        prof = tc.measure(copy.deepcopy(deployed), self.S)
        res = {"row": row, "label": LABELS[row], **metrics, **prof, "wall_s": round(time.perf_counter() - t0, 1),
               "iterations": self.data.steps_per_epoch * self.S.epochs, **extra}
        self.results[row] = res
        self.per_query[row] = ap
        if history is not None:
            history.append({"kind": "eval", "iteration": res["iterations"], "epoch": self.S.epochs, "mAP": res["mAP"],
                            "rank1": res["rank1"], "merged": True, "flops_merged": res["flops"],
                            "flops_planned": res.get("flops_planned", res["flops"]),
                            "flops_dense": self.heavy_deployed})
            self.histories[row] = history
        self.cache.save(row, {"key": key, "result": res, "history": history or [], "per_query_ap": ap})
        lat = ", ".join(f"b{b} {v:.1f} ms" for b, v in prof["latency_ms"].items())
        logger.info("%s: mAP %.2f  rank-1 %.2f  params %.2fM  FLOPs %.3fG (%.1f%% of the heavy student)  latency %s"
                    "  [%.0f s]", row, res["mAP"], res["rank1"], prof["params"] / 1e6, prof["flops"] / 1e9,
                    100 * prof["flops"] / self.heavy_deployed, lat, res["wall_s"])
        return res

    def _evaluate(self, model) -> tuple:
        return self.data.evaluate(model, per_query=True)

    def _from_cache(self, row: str, key: str) -> bool:
        rec = self.cache.load(row, key)
        if rec is None:
            return False
        self.results[row] = rec["result"]
        self.per_query[row] = rec.get("per_query_ap", [])
        if rec.get("history"):
            self.histories[row] = rec["history"]
        logger.info("%s: taken from the cache (same settings): mAP %.2f, FLOPs %.3fG", row, rec["result"]["mAP"],
                    rec["result"]["flops"] / 1e9)
        return True

    # -- rows -------------------------------------------------------------------------------------
    def get_teacher(self) -> torch.nn.Module:
        if self.teacher is not None:
            return self.teacher
        key = self.key("teacher")
        path = self.cache.weights("teacher")
        rec = self.cache.load("teacher", key)
        model = tc.ReIDNet(self.S.arch, self.classes)
        if rec is not None and path.is_file():
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            self.results["teacher"] = rec["result"]
            self.per_query["teacher"] = rec.get("per_query_ap", [])
            logger.info("teacher: loaded from %s (same settings, key %s): mAP %.2f", path, key, rec["result"]["mAP"])
        else:
            t0 = self._begin("teacher")
            try:
                self._seed(0)
                model = tc.ReIDNet(self.S.arch, self.classes).to(self.dev)
                tc.train("teacher", model, self.data, self.S, progress=self.progress)
                tmp = path.with_suffix(".tmp")
                torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp)
                os.replace(tmp, path)
                self._finish("teacher", tc.deploy(model, self.S), t0, key, {"weights": str(path)})
            finally:
                self._end()
        self.teacher = model.to(self.dev).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        return self.teacher

    def run_kd_heavy(self, force: bool) -> None:
        key = self.key("kd_heavy")
        path = self.cache.weights("kd_heavy")
        if not force and self._from_cache("kd_heavy", key) and path.is_file():
            return
        teacher = self.get_teacher()
        t0 = self._begin("kd_heavy")
        try:
            self._seed(1)
            model = tc.ReIDNet(self.S.arch, self.classes).to(self.dev)
            tc.train("kd_heavy", model, self.data, self.S, teacher=teacher, feature_sites=self._sites(),
                     progress=self.progress)
            torch.save({k: v.cpu() for k, v in model.state_dict().items()}, path)
            self.kd_heavy = model
            self._finish("kd_heavy", tc.deploy(model, self.S), t0, key, {"weights": str(path)})
        finally:
            self._end()

    def _sites(self) -> List[str]:
        if not self.feature_sites:
            st = cdd_plugin.insert_dgc(tc.ReIDNet(self.S.arch, self.classes), tc.example_input(self.S),
                                       cdd_plugin.CDDConfig())
            self.feature_sites = [s.tap[0] for s in st.sites]
        return self.feature_sites

    def get_kd_heavy(self) -> torch.nn.Module:
        if self.kd_heavy is None:
            path = self.cache.weights("kd_heavy")
            if self.cache.load("kd_heavy", self.key("kd_heavy")) is None or not path.is_file():
                self.run_kd_heavy(force=True)
            else:
                m = tc.ReIDNet(self.S.arch, self.classes)
                m.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
                self.kd_heavy = m.to(self.dev)
        return self.kd_heavy

    def _cdd_config(self, row: str, target: float) -> cdd_plugin.CDDConfig:
        S = self.S
        steps = self.data.steps_per_epoch
        queue = S.queue_size or min(24000, 2 * steps * S.p * S.k)
        return cdd_plugin.CDDConfig(lasso=S.lasso, threshold=S.threshold, criterion=CRITERION[row], k=S.rggr_k,
                                    ratio=S.ratio, queue_size=int(queue), metric=S.metric,
                                    mask_start=int(round(S.mask_start_epoch * steps)), mask_interval=S.mask_interval,
                                    flops_target=None if row == "cdd_lasso" else float(target))

    def norm_window(self) -> tuple:
        """(last iteration by which the norm criterion should meet the target, where it comes from):
        the iteration at which cdd_rggr's masks met the target, so both criteria mask over the same
        window; ``norm_done_frac`` of the schedule when cdd_rggr is not available or never met it."""
        r = self.results.get("cdd_rggr")
        if r is not None and r.get("mask_done_iteration"):
            return int(r["mask_done_iteration"]), "the iteration at which cdd_rggr's masks met the target"
        total = self.data.steps_per_epoch * self.S.epochs
        return int(self.S.norm_done_frac * total), f"{self.S.norm_done_frac:g} of the schedule"

    def _norm_step(self, state, target_flops: float, mask_start: int) -> tuple:
        """Channels per refresh for the norm criterion: the uniform cut that meets the target,
        spread over the refreshes between mask start and ``norm_window()``."""
        lo, hi = 0.0, 1.0
        for _ in range(40):
            f = 0.5 * (lo + hi)
            kept = {s.name: max(1, int(math.ceil((1 - f) * s.channels))) for s in state.sites}
            if state.predicted_flops(kept) <= target_flops:
                hi = f
            else:
                lo = f
        need = sum(s.channels - max(1, int(math.ceil((1 - hi) * s.channels))) for s in state.sites)
        done, _ = self.norm_window()
        window = max(1, (done - mask_start) // self.S.mask_interval)
        return max(1, math.ceil(need / window)), need, window

    def _extra_key(self, row: str) -> dict:
        """What a row's result depends on besides the settings (the cdd_rggr result it is matched to)."""
        if row == "cdd_rggr":
            return {}
        ref, _ = self.ref_flops()
        extra = {"ref_flops": ref}
        if row == "cdd_norm":
            extra["norm_window"] = self.norm_window()[0]
        if row == "tp":
            extra["kd_heavy"] = self.key("kd_heavy")
        return extra

    def run_cdd(self, row: str, force: bool) -> None:
        S = self.S
        ref, ref_src = self.ref_flops()
        target = S.flops_target if row == "cdd_rggr" else ref / self.heavy_deployed
        key = self.key(row, self._extra_key(row))
        if not force and self._from_cache(row, key):
            return
        teacher = self.get_teacher()
        t0 = self._begin(row)
        try:
            self._seed(1)
            student = tc.ReIDNet(S.arch, self.classes).to(self.dev)
            cfg = self._cdd_config(row, target)
            state = cdd_plugin.insert_dgc(student, tc.example_input(S, 2, S.device), cfg)
            extra: Dict[str, Any] = {"criterion": cfg.criterion, "cdd_config": cfg.to_dict(),
                                     "dgc_sites": len(state.sites),
                                     "prunable_channels": sum(s.channels for s in state.sites)}
            if row == "cdd_norm":
                step, need, window = self._norm_step(state, ref, cfg.mask_start)
                cfg.norm_step = step
                extra.update(norm_step=step, norm_channels_needed=need, norm_refreshes=window,
                             norm_window_from=self.norm_window()[1])
                logger.info("norm criterion: ~%d channels to mask for the target, %d refreshes (until %s) -> "
                            "norm_step %d", need, window, self.norm_window()[1], step)
            if row != "cdd_rggr":
                extra.update(matched_to=ref_src, matched_flops=ref)
            logger.info("%s", state.report())
            logger.info("CDD config: %s", json.dumps(cfg.to_dict()))
            evaluate = lambda m: self.data.evaluate(m)  # noqa: E731
            hist = tc.train(row, student, self.data, S, teacher=teacher, state=state, progress=self.progress,
                            evaluate=evaluate)
            summ = state.summary()
            stats = tc.masked_row_stats(state)
            extra.update(channels_total=summ["channels_total"], channels_masked=summ["channels_total"] -
                         summ["channels_active"], flops_planned=summ["flops_planned"],
                         flops_predicted_before_cut=summ["flops_merged"], masked_rows=stats)
            if cfg.flops_target is not None:
                extra["mask_done_iteration"] = tc.mask_done_iteration(hist, cfg.flops_target)
                logger.info("%s: masks met the FLOPs target at iteration %s of %d", row,
                            extra["mask_done_iteration"], self.data.steps_per_epoch * S.epochs)
            logger.info("%s: masked rows %d, of which %d below the threshold %.0e (largest masked norm %.2e); "
                        "unmasked rows below the threshold %d", row, stats["masked"], stats["masked_below_threshold"],
                        S.threshold, stats["masked_max_norm"], stats["unmasked_below_threshold"])
            if row == "cdd_lasso":
                cut = tc.cut_to_flops(state, ref)
                extra["end_cut"] = cut
                logger.info("lasso only: cut %d rows (largest norm %.3e) to reach %.3fG FLOPs", cut["rows_cut"],
                            cut["largest_cut_norm"], ref / 1e9)
            predicted = state.predicted_flops()
            merged = cdd_plugin.merge(student)
            extra["flops_predicted"] = int(predicted)
            if row == "cdd_rggr":
                cdd_plugin.save_merged(merged.cpu(), str(self.cache.weights(row)),
                                       meta={"arch": S.arch, "classes": self.classes, "input": list(S.input_size)})
            res = self._finish(row, merged, t0, key, extra, hist)
            if res["flops"] != predicted:
                msg = (f"{row}: state.predicted_flops() = {predicted} but profile(merge(model)) = {res['flops']}; "
                       "report this to the core")
                logger.warning(msg)
                self.notes.append(msg)
        finally:
            self._end()

    def run_light(self, force: bool) -> None:
        S = self.S
        ref, ref_src = self.ref_flops()
        target_plain = ref * self.heavy_plain / self.heavy_deployed
        key = self.key("light", self._extra_key("light"))
        if not force and self._from_cache("light", key):
            return
        teacher = self.get_teacher()
        t0 = self._begin("light")
        try:
            width, _ = tc.light_width(S, self.classes, target_plain)
            logger.info("light student: width_per_group %d (target %.3fG plain FLOPs, from %s)", width,
                        target_plain / 1e9, ref_src)
            self._seed(1)
            model = tc.ReIDNet(S.arch, self.classes, width).to(self.dev)
            tc.train("light", model, self.data, S, teacher=teacher, feature_sites=self._sites(),
                     progress=self.progress)
            self._finish("light", tc.deploy(model, S), t0, key,
                         {"width_per_group": width, "matched_to": ref_src, "matched_flops": ref})
        finally:
            self._end()

    def run_tp(self, force: bool) -> None:
        S = self.S
        ref, ref_src = self.ref_flops()
        target_plain = ref * self.heavy_plain / self.heavy_deployed
        key = self.key("tp", self._extra_key("tp"))
        if not force and self._from_cache("tp", key):
            return
        teacher = self.get_teacher()
        heavy = self.get_kd_heavy()
        t0 = self._begin("tp")
        try:
            pruned, info = tc.tp_prune(heavy, S, target_plain)
            pruned = pruned.to(self.dev)
            logger.info("torch-pruning: %s; plain FLOPs %.3fG (target %.3fG, from %s)", json.dumps(info),
                        tc.plain_flops(pruned, S) / 1e9, target_plain / 1e9, ref_src)
            m0, _ = self._evaluate(tc.deploy(pruned, S).to(self.dev))
            info["mAP_after_pruning_before_finetune"] = m0["mAP"]
            logger.info("tp: mAP right after pruning (before fine-tuning) %.2f", m0["mAP"])
            tc.train("tp", pruned, self.data, S, teacher=teacher, feature_sites=self._sites(),
                     progress=self.progress)
            self._finish("tp", tc.deploy(pruned, S), t0, key, {**info, "matched_to": ref_src, "matched_flops": ref})
        finally:
            self._end()

    def run(self, rows: List[str]) -> None:
        for row in ROWS:
            force = row in rows
            if row == "teacher":
                if force or any(r in rows for r in ROWS[1:]):
                    self.get_teacher()
                else:
                    self._from_cache("teacher", self.key("teacher"))
            elif not force:
                self._from_cache(row, self.key(row, self._extra_key(row)))
            elif row == "kd_heavy":
                self.run_kd_heavy(True)
            elif row in CRITERION:
                self.run_cdd(row, True)
            elif row == "light":
                self.run_light(True)
            elif row == "tp":
                self.run_tp(True)
        self.speed_check()

    def speed_check(self) -> None:
        """Latency of the deployed heavy KD student and the merged CDD + RGGR student, measured in
        alternation (the speed-up target uses these; the table's per-row latencies were measured at
        different times)."""
        self.speed = None
        kd, rg = self.results.get("kd_heavy"), self.results.get("cdd_rggr")
        kd_path, rg_path = self.cache.weights("kd_heavy"), self.cache.weights("cdd_rggr")
        if not (kd and rg and kd_path.is_file() and rg_path.is_file()):
            return
        heavy = tc.ReIDNet(self.S.arch, self.classes)
        heavy.load_state_dict(torch.load(kd_path, map_location="cpu", weights_only=True))
        merged = cdd_plugin.load_merged(str(rg_path), tc.ReIDNet(self.S.arch, self.classes))
        logger.info("speed check: latency of the heavy KD student and the merged CDD + RGGR student, in alternation")
        lat = tc.interleaved_latency({"kd_heavy": tc.deploy(heavy, self.S), "cdd_rggr": merged}, self.S)
        self.speed = {"latency_ms": lat, "flops_factor": kd["flops"] / rg["flops"],
                      "speedup": {b: lat["kd_heavy"][b] / lat["cdd_rggr"][b] for b in lat["cdd_rggr"]}}
        logger.info("speed check: %s", json.dumps(self.speed))


# ---------------------------------------------------------------------------------------------- report


def _paired(runner: Runner, a: str, b: str) -> Optional[tuple]:
    """(mean AP difference a - b in points, its standard error) over the same queries."""
    pa, pb = runner.per_query.get(a), runner.per_query.get(b)
    if not pa or not pb or len(pa) != len(pb):
        return None
    d = 100.0 * (np.asarray(pa) - np.asarray(pb))
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")


def targets(runner: Runner) -> List[dict]:
    R = runner.results
    out = []
    rg, kd = R.get("cdd_rggr"), R.get("kd_heavy")
    if rg and kd:
        red = 1.0 - rg["flops"] / kd["flops"]
        gap = kd["mAP"] - rg["mAP"]
        pr = _paired(runner, "cdd_rggr", "kd_heavy")
        ok = red >= 0.60 and gap <= 1.0
        diag = []
        if red < 0.60:
            mr = rg.get("masked_rows", {})
            planned = rg.get("flops_planned", rg["flops"]) / runner.heavy_deployed
            if planned > runner.S.flops_target + 0.02:
                diag.append(f"RGGR masked too few channels: planned FLOPs {100 * planned:.1f}% > target "
                            f"{100 * runner.S.flops_target:.0f}% (criterion: a channel must be among the "
                            f"ratio={runner.S.ratio} least contributing for EVERY (query, neighbour) pair of a "
                            f"{runner.S.p * runner.S.k}-image batch; raise --ratio, or mask earlier / longer)")
            if mr.get("masked", 0) > mr.get("masked_below_threshold", 0):
                diag.append(f"{mr['masked'] - mr['masked_below_threshold']} of {mr['masked']} masked rows did not "
                            f"reach the merge threshold (largest norm {mr.get('masked_max_norm', 0):.2e}): the lasso "
                            "x LR budget after the masks were set was too small (raise --lasso or mask earlier)")
        if gap > 1.0:
            diag.append(f"accuracy cost of compression within {rg['iterations']} iterations (short schedule, lasso "
                        f"{runner.S.lasso} also pulls unmasked rows); mAP standard error ~{rg.get('mAP_se', float('nan')):.1f}")
        out.append({"target": "CDD + RGGR removes >= 60% of the heavy student's FLOPs with mAP >= KD student - 1.0",
                    "measured": f"FLOPs -{100 * red:.1f}%, mAP {rg['mAP']:.2f} vs {kd['mAP']:.2f} (gap {gap:+.2f}"
                                + (f"; paired difference {pr[0]:+.2f} +- {pr[1]:.2f} s.e." if pr else "") + ")",
                    "status": "PASS" if ok else "MISS", "diagnosis": "; ".join(diag)})
    if rg:
        comps = [r for r in ("light", "tp", "cdd_norm", "cdd_lasso") if r in R]
        if comps:
            parts, ok, diag = [], True, []
            for r in comps:
                d = rg["mAP"] - R[r]["mAP"]
                pr = _paired(runner, "cdd_rggr", r)
                fl = R[r]["flops"] / rg["flops"]
                parts.append(f"{LABELS[r]} {R[r]['mAP']:.2f} ({d:+.2f}" + (f" +- {pr[1]:.2f}" if pr else "")
                             + f", FLOPs x{fl:.3f})")
                if d <= 0:
                    ok = False
                    diag.append(f"{LABELS[r]} is not worse")
                if abs(fl - 1) > 0.05:
                    diag.append(f"{LABELS[r]}'s FLOPs differ from CDD + RGGR's by {100 * (fl - 1):+.1f}%")
            status = ("PASS" if ok else "MISS") + ("" if len(comps) == 4 else " (partial: rows missing)")
            if rg["flops"] >= 0.98 * runner.heavy_deployed:
                status = "n/a"
                diag = ["CDD + RGGR compressed nothing, so there is no equal-FLOPs comparison (the baselines were "
                        "matched to --flops-target instead)"]
            out.append({"target": "at equal FLOPs CDD + RGGR beats light, torch-pruning, CDD + norm, lasso-only on mAP",
                        "measured": f"CDD + RGGR {rg['mAP']:.2f} vs " + "; ".join(parts),
                        "status": status, "diagnosis": "; ".join(diag)})
    if rg and kd:
        factor = kd["flops"] / rg["flops"]
        speed = getattr(runner, "speed", None)
        lat_kd = speed["latency_ms"]["kd_heavy"] if speed else kd["latency_ms"]
        lat_rg = speed["latency_ms"]["cdd_rggr"] if speed else rg["latency_ms"]
        parts, ok = [], True
        for b, lat in lat_rg.items():
            kl = lat_kd.get(b)
            if not kl:
                continue
            sp = kl / lat
            parts.append(f"batch {b}: x{sp:.2f} = {sp / factor:.2f} of x{factor:.2f}")
            ok = ok and sp >= 0.8 * factor
        src = "measured in alternation" if speed else "from the table's latencies"
        if factor < 1.05:
            status, diag = "n/a", "CDD + RGGR removed no FLOPs"
        else:
            status = "PASS" if ok else "MISS"
            diag = "" if ok else ("narrow layers use the CPU less efficiently than wide ones; on a shared machine "
                                  "latency is noisy")
        out.append({"target": "merged model's CPU speed-up >= 0.8 x its FLOPs reduction factor",
                    "measured": "; ".join(parts) + f" ({src})", "status": status, "diagnosis": diag})
    return out


def write_results(runner: Runner, args, t_start: float, est: dict) -> None:
    S, out = runner.S, runner.out
    rows = [runner.results[r] for r in ROWS if r in runner.results]
    kd = runner.results.get("kd_heavy")
    base_flops = kd["flops"] if kd else runner.heavy_deployed
    for r in rows:
        r["flops_vs_heavy"] = r["flops"] / base_flops
        if kd:
            r["speedup_vs_heavy"] = {b: kd["latency_ms"][b] / v for b, v in r["latency_ms"].items()
                                     if b in kd["latency_ms"] and v}
    tg = targets(runner)
    ref, ref_src = runner.ref_flops()
    summary = {
        "schema": "cdd_tradeoff/v1",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
        "machine": tc.machine(),
        "settings": S.to_dict(),
        "data": runner.data.describe(),
        "iterations_per_epoch": runner.data.steps_per_epoch,
        "heavy_student_flops_deployed": runner.heavy_deployed,
        "equal_flops_reference": {"flops": ref, "source": ref_src},
        "estimate_s": est,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "rows": rows,
        "targets": tg,
        "speed_check": getattr(runner, "speed", None),
        "notes": runner.notes + notes(S, runner),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=_json_default))
    if rows:
        tc.plot_tradeoff(rows, out / "tradeoff.png", base_flops)
    hists = {r: runner.histories[r] for r in CRITERION if r in runner.histories}
    if hists:
        tc.plot_training(hists, LABELS, out / "cdd_training.png")
    (out / "results.md").write_text(markdown(summary, runner))


def notes(S: tc.Settings, runner: Runner) -> List[str]:
    steps = runner.data.steps_per_epoch
    total = steps * S.epochs
    ms = int(round(S.mask_start_epoch * steps))
    return [
        f"Schedule: {S.epochs} epochs x {steps} iterations = {total} per row, batch {S.p} ids x {S.k} images, base LR "
        f"{S.lr} (linear warm-up {S.warmup_epochs:g} epochs, then cosine to 0), SGD momentum {S.momentum}, weight "
        f"decay {S.weight_decay} (none on DGCs). Every row sees the same batches and augmentations.",
        f"Lasso {S.lasso} (paper 0.004), masks from iteration {ms} ({S.mask_start_epoch:g} epochs), refreshed every "
        f"{S.mask_interval} iteration(s): a masked row moves ~lr x lasso x 10 = {S.lr * S.lasso * 10:.1e} per "
        f"full-LR iteration (momentum 0.9), so it can travel a norm of ~1 within "
        f"{1 / max(1e-12, S.lr * S.lasso * 10):.0f} full-LR iterations; within one step of zero the core's proximal "
        f"snap sets it to exactly 0, below the threshold {S.threshold:g}. The notes column says how many masked rows "
        "got there and when the masks met the FLOPs target.",
        f"RGGR: K={S.rggr_k}, ratio={S.ratio}, metric {S.metric}, queue "
        f"{S.queue_size or min(24000, 2 * steps * S.p * S.k)} teacher features per site (two epochs of images when "
        "not set), FLOPs target " + f"{S.flops_target:g}.",
        "Deployed form: CDD rows are merged (BN + DGC folded, zero rows cut); every other row has the same BatchNorms "
        "folded (insert_dgc + merge(threshold=0) on a copy), so params / FLOPs / latency compare like with like.",
        "Latency: median of " + ", ".join(f"{r} runs at batch {b}" for b, r in zip(S.latency_batches, S.latency_runs))
        + f" (after 3 warm-up runs) of an eval forward on the CPU with {S.threads or min(4, os.cpu_count() or 1)} "
        "thread(s); on a shared machine it is noisy, so the speed-up target uses the speed check (the heavy and the "
        "merged student measured in alternation).",
        "Every ResNet is built with zero_init_residual=True and trained from scratch (no ImageNet weights here).",
    ]


def _fmt_lat(r: dict, b: str) -> str:
    v = r["latency_ms"].get(b)
    return "-" if v is None else f"{v:.1f}"


def markdown(s: dict, runner: Runner) -> str:
    S = runner.S
    bs = [str(b) for b in S.latency_batches]
    L = [f"# CDD trade-off benchmark on Market-1501 ({S.preset} preset)", "",
         f"- date: {s['date']}", f"- command: `{s['command']}`",
         f"- machine: {s['machine'].get('cpu_model', s['machine']['processor'])}, {s['machine']['cpu_count']} cores, "
         f"torch {s['machine']['torch']}, torchvision {s['machine']['torchvision']}, torch-pruning "
         f"{s['machine'].get('torch_pruning', '?')}, device {S.device}"
         + (f" ({s['machine']['cuda_device']})" if s["machine"].get("cuda_device") else "")
         + (f", load average at start {s['machine']['load_average_at_start']}" if s["machine"].get(
             "load_average_at_start") else ""),
         f"- data: {s['data']}; protocol: evaluate_reid (same identity and camera removed), cosine distance",
         f"- network: {S.arch} teacher and heavy student, input {S.input_size[0]}x{S.input_size[1]}, trained from "
         "scratch",
         f"- wall time: {s['wall_s'] / 60:.1f} min" + (f" (estimate before the run: {s['estimate_s']['total'] / 60:.0f} "
                                                       "min on an unshared 2-core CPU)" if s["estimate_s"] else ""),
         f"- equal-FLOPs reference: {s['equal_flops_reference']['flops'] / 1e9:.3f} GFLOPs "
         f"({s['equal_flops_reference']['source']})", "",
         "## Results", "",
         "| row | mAP (s.e.) | rank-1 | params (M) | GFLOPs | FLOPs vs heavy | " + " | ".join(
             f"latency b{b} (ms)" for b in bs) + " | " + " | ".join(f"speed-up b{b}" for b in bs) + " | notes |",
         "|---|---|---|---|---|---|" + "---|" * (2 * len(bs)) + "---|"]
    for r in s["rows"]:
        note = []
        if r.get("criterion") == "none":
            note.append("no masks (lasso only)")
        elif "masked_rows" in r:
            mr = r["masked_rows"]
            note.append(f"masked {mr['masked']}/{r.get('channels_total', '?')}, {mr['masked_below_threshold']} reached "
                        f"< {S.threshold:g} (max masked norm {mr['masked_max_norm']:.1e})")
            if "mAP_unmerged" in r:
                note.append(f"unmerged mAP {r['mAP_unmerged']:.2f}")
        if "mask_done_iteration" in r:
            note.append(f"target met by the masks at it. {r['mask_done_iteration']}" if r["mask_done_iteration"]
                        else "masks never met the target")
        if "norm_step" in r:
            note.append(f"norm_step {r['norm_step']}")
        if "end_cut" in r:
            note.append(f"end cut {r['end_cut']['rows_cut']} rows (largest norm {r['end_cut']['largest_cut_norm']:.1e})")
        if "width_per_group" in r:
            note.append(f"width_per_group {r['width_per_group']}")
        if "pruning_ratio" in r:
            note.append(f"ratio {r['pruning_ratio']} per-layer" if not r.get("global_pruning") else
                        f"ratio {r['pruning_ratio']} global")
            if "mAP_after_pruning_before_finetune" in r:
                note.append(f"mAP before fine-tuning {r['mAP_after_pruning_before_finetune']:.2f}")
        sp = r.get("speedup_vs_heavy", {})
        L.append(f"| {r['label']} | {r['mAP']:.2f} ({r.get('mAP_se', float('nan')):.1f}) | {r['rank1']:.2f} | "
                 f"{r['params'] / 1e6:.2f} | {r['flops'] / 1e9:.3f} | {100 * r['flops_vs_heavy']:.1f}% | "
                 + " | ".join(_fmt_lat(r, b) for b in bs) + " | "
                 + " | ".join(f"x{sp[b]:.2f}" if b in sp else "-" for b in bs) + f" | {'; '.join(note)} |")
    L += ["", "s.e.: standard error of mAP over the queries (per-query AP std / sqrt(queries)); differences between "
          "rows on the same queries are paired and their s.e. is given in the targets.", "",
          "## Targets", "", "| target | measured | status | diagnosis |", "|---|---|---|---|"]
    for t in s["targets"]:
        L.append(f"| {t['target']} | {t['measured']} | {t['status']} | {t['diagnosis'] or '-'} |")
    if not s["targets"]:
        L.append("| (needs the kd_heavy and cdd_rggr rows) | - | n/a | - |")
    sc = s.get("speed_check")
    if sc:
        L += ["", "## Speed check (heavy KD student vs merged CDD + RGGR, measured in alternation)", "",
              "| batch | heavy KD (ms) | CDD + RGGR merged (ms) | speed-up | FLOPs reduction factor | ratio |",
              "|---|---|---|---|---|---|"]
        for b, sp in sc["speedup"].items():
            L.append(f"| {b} | {sc['latency_ms']['kd_heavy'][b]:.1f} | {sc['latency_ms']['cdd_rggr'][b]:.1f} | "
                     f"x{sp:.2f} | x{sc['flops_factor']:.2f} | {sp / sc['flops_factor']:.2f} |")
    L += ["", "## Notes", ""] + [f"- {n}" for n in s["notes"]]
    L += ["", "## Files", "", "- results.json: every figure above and the settings", "- tradeoff.png: mAP vs FLOPs",
          "- cdd_training.png: predicted merged FLOPs (every log_every iterations) and mAP (every eval_every "
          "epochs) of the CDD runs", "- run.log, logs/<row>.log: the logs; cache/: teacher weights, per-row results",
          ""]
    return "\n".join(L)


# ---------------------------------------------------------------------------------------------- main


def build_settings(args) -> tc.Settings:
    S = tc.Settings(preset=args.preset, **PRESETS[args.preset])
    over = {"seed": args.seed, "device": args.device, "epochs": args.epochs, "flops_target": args.flops_target,
            "lasso": args.lasso, "lr": args.lr, "ratio": args.ratio, "threads": args.threads,
            "workers": args.workers, "train_ids": args.ids, "test_ids": args.test_ids, "arch": args.arch,
            "feat_weight": args.feat_weight, "mask_start_epoch": args.mask_start_epoch,
            "eval_every": args.eval_every}
    for k, v in over.items():
        if v is not None:
            setattr(S, k, v)
    if args.input:
        h, w = (int(v) for v in args.input.lower().split("x"))
        S.input_size = (h, w)
    if args.tp_global:
        S.tp_global = True
    S.data_root = args.data or os.environ.get("CDD_MARKET1501", "") or str(cdd_plugin.datasets.default_market1501_root())
    if not (0.0 < S.flops_target < 1.0):
        raise SystemExit(f"--flops-target {S.flops_target} must lie in (0, 1): the kept fraction of the FLOPs")
    if S.epochs < 1:
        raise SystemExit("--epochs must be >= 1")
    if not (0 <= S.mask_start_epoch < S.epochs):
        raise SystemExit(f"masks start at epoch {S.mask_start_epoch:g}, which is not before the last epoch "
                         f"({S.epochs}); pass more --epochs or a smaller --mask-start-epoch")
    if S.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {S.device} (the {S.preset} preset's default) needs CUDA, and torch "
                         f"{torch.__version__} sees no CUDA device here. Run on a GPU machine, or pass --device cpu "
                         "(the full preset on a CPU takes weeks).")
    return S


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--rows", default="all", help=f"comma-separated subset of {','.join(ROWS)} (default all); rows "
                    "not listed are taken from OUT/cache when their settings match")
    ap.add_argument("--out", default=None, help="output folder (default runs/tradeoff/<preset>)")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--device", help="cpu or cuda (default: the preset's)")
    ap.add_argument("--epochs", type=int, help="epochs of every row")
    ap.add_argument("--flops-target", type=float, help="kept fraction of the heavy student's FLOPs (default 0.35)")
    ap.add_argument("--lasso", type=float)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--ratio", type=float, help="RGGR candidate ratio")
    ap.add_argument("--mask-start-epoch", type=float)
    ap.add_argument("--eval-every", type=int, help="epochs between evaluations of the CDD runs during training")
    ap.add_argument("--feat-weight", type=float, help="FitNet feature term (0 by default, see the docstring)")
    ap.add_argument("--arch", choices=sorted(tc.ARCH_LAYERS))
    ap.add_argument("--input", help="HxW, e.g. 256x128")
    ap.add_argument("--ids", type=int, help="training identities (0 = all)")
    ap.add_argument("--test-ids", type=int, help="test identities (0 = the full query/gallery)")
    ap.add_argument("--data", help="Market-1501 folder (default $CDD_MARKET1501 or ../shared/data/...)")
    ap.add_argument("--threads", type=int, help="CPU threads (default min(4, cores))")
    ap.add_argument("--workers", type=int, help="data loader workers")
    ap.add_argument("--tp-global", action="store_true", help="torch-pruning: global instead of per-layer ranking")
    ap.add_argument("--no-cache", action="store_true", help="retrain the teacher and ignore cached rows")
    ap.add_argument("--progress", choices=["auto", "always", "never"], default="auto",
                    help="tqdm bars (auto: only on a terminal)")
    ap.add_argument("--estimate-only", action="store_true", help="print the time estimate and stop")
    args = ap.parse_args(argv)

    S = build_settings(args)
    rows = ROWS if args.rows == "all" else [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        raise SystemExit(f"unknown row(s) {bad}; choose from {', '.join(ROWS)}")
    out = Path(args.out or f"runs/tradeoff/{S.preset}")
    out.mkdir(parents=True, exist_ok=True)

    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    runlog = logging.FileHandler(out / "run.log", mode="a", encoding="utf-8")
    runlog.setFormatter(fmt)
    for name in ("bench_tradeoff", "cdd_plugin"):
        lg = logging.getLogger(name)
        lg.setLevel(logging.INFO)
        lg.addHandler(console)
        lg.addHandler(runlog)
        lg.propagate = False

    threads = S.threads or min(4, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    t_start = time.perf_counter()
    logger.info("bench_tradeoff: preset %s, rows %s, out %s, %d thread(s), device %s", S.preset, ",".join(rows), out,
                threads, S.device)
    logger.info("command: %s", " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv))
    runner = Runner(S, out, args.progress, not args.no_cache)
    logger.info("data: %s; %d iterations per epoch", runner.data.describe(), runner.data.steps_per_epoch)
    est = None
    if S.device == "cpu":
        est = estimate(S, runner.data, runner.heavy_plain, S.flops_target)
        logger.info("estimated time on an unshared 2-core CPU (from ResNet-50 256x128 batch 16 = %.1f s/it): %s",
                    REF_STEP_S, ", ".join(f"{k} {v / 60:.1f} min" for k, v in est.items() if k != "iterations_per_row")
                    + f"; {est['iterations_per_row']} iterations per row")
    if args.estimate_only:
        return 0
    try:
        runner.run(rows)
    finally:
        write_results(runner, args, t_start, est)
        logger.info("wrote %s", ", ".join(str(out / f) for f in ("results.json", "results.md", "tradeoff.png",
                                                                 "cdd_training.png") if (out / f).exists()))
    for t in targets(runner):
        logger.info("target: %s -> %s [%s] %s", t["target"], t["measured"], t["status"], t["diagnosis"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
