"""Building blocks of ``bench_tradeoff.py``: network, identity splits, the one training loop,
evaluation, deployment (BN folding / merge), profiling, the torch-pruning baselines, width
matching, plots.

Everything here is shared by every row of the trade-off table, so that the rows differ
only in the model they start from, the loss terms their form allows, and how they compress.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.models.resnet import Bottleneck, ResNet
from tqdm.auto import tqdm

import cdd_plugin
from cdd_plugin import datasets as ds
from cdd_plugin.distill import CDDDistiller, LossConfig, kd_loss, total_loss, triplet_loss
from cdd_plugin.evaluation import compute_distmat, evaluate_reid, extract_features

logger = logging.getLogger("bench_tradeoff")

# --------------------------------------------------------------------------------------------- network

#: bottleneck ResNets only: ``width_per_group`` (the light student) scales exactly the inner
#: widths of a bottleneck (conv1 / conv2 outputs), i.e. the channel sets CDD compacts.
ARCH_LAYERS = {"resnet26": [2, 2, 2, 2], "resnet50": [3, 4, 6, 3], "resnet101": [3, 4, 23, 3],
               "resnet152": [3, 8, 36, 3]}


class ReIDNet(nn.Module):
    """torchvision bottleneck ResNet as a re-ID network: ``(logits, embedding)``.

    The embedding is the globally pooled last-stage feature (triplet loss, retrieval);
    the logits come from a BatchNorm neck and a bias-free linear classifier (FastReID's
    BNNeck head). ``width_per_group=64`` is the standard network; smaller values give the
    narrow ("light") student.
    """

    def __init__(self, arch: str, classes: int, width_per_group: int = 64):
        super().__init__()
        if arch not in ARCH_LAYERS:
            raise ValueError(f"unknown --arch {arch!r}; use one of {', '.join(ARCH_LAYERS)} (bottleneck ResNets: "
                             "the light student is the same network with a smaller width_per_group)")
        base = ResNet(Bottleneck, ARCH_LAYERS[arch], width_per_group=int(width_per_group), zero_init_residual=True)
        dim = base.fc.in_features
        base.fc = nn.Identity()
        self.backbone = base
        self.neck = nn.BatchNorm1d(dim)
        self.classifier = nn.Linear(dim, classes, bias=False)

    def forward(self, x):
        emb = self.backbone(x)
        return self.classifier(self.neck(emb)), emb

    def new_head(self, classes: int) -> "ReIDNet":
        """Replace the classifier for another set of identities (pretraining -> study)."""
        self.classifier = nn.Linear(self.classifier.in_features, classes, bias=False).to(
            self.classifier.weight.device)
        return self


# --------------------------------------------------------------------------------------------- settings


@dataclass
class Settings:
    """Every setting of a run (written to results.json). See bench_tradeoff.py for the presets."""

    preset: str = "cpu"
    arch: str = "resnet50"
    input_size: Tuple[int, int] = (64, 32)
    # identities (Market-1501's 751 training identities are split three ways, by subset_seed)
    train_ids: int = 100            # the study's training identities (every row trains on these)
    val_ids: int = 25               # held-out training identities: the validation split for settings
    pretrain_ids: int = 400         # the pretraining stage's identities (never seen by the study)
    test_ids: int = 200             # test identities (0 = the full query/gallery split, distractors included)
    subset_seed: int = 0            # which identities go where; another value = another choice of identities
    # schedules (iterations)
    budget: int = 416               # training iterations of every row (the equal budget)
    pretrain_iters: int = 600       # the pretraining stage (outside the rows' budgets, cached)
    teacher_iters: int = 600        # the teacher: pretrained heavy trained on the study's identities (cached)
    lr: float = 0.01                # rows and teacher (the authors' base LR)
    pretrain_lr: float = 0.02
    heads_lr_factor: float = 1.5    # classifier LR x this (the authors' FC_LR_TIMES)
    warmup_frac: float = 10 / 120   # the authors' shape: warm-up 10, flat until 40, cosine to 120 (of 120 epochs)
    delay_frac: float = 40 / 120
    momentum: float = 0.9
    weight_decay: float = 5e-4
    p: int = 8                      # identities per batch
    k: int = 4                      # images per identity
    seed: int = 0
    device: str = "cpu"
    threads: int = 0                # 0 = min(4, cores)
    workers: int = 0
    # losses (METHOD.md section 3)
    label_smoothing: float = 0.1
    triplet_margin: float = 0.35
    temperature: float = 2.0
    kd_weight: float = 1.0
    feat_weight: float = 0.5
    feat_tap: str = "before"
    # CDD (the recipe; the lasso is chosen on the validation split from lasso x lasso_grid)
    sites: str = "paper"
    flops_target: float = 0.0       # 0 = none (the authors'); else cdd_rggr stops masking at this FLOPs fraction (ours)
    lasso: float = 0.0              # 0 = the paper's 0.004 scaled to the schedule (METHOD.md section 6)
    live_lasso: float = 0.0         # 0 = one lasso on every row (the authors'); else the lasso of the rows that
                                    # still learn, the chosen (scaled) lasso only on masked rows (ours)
    lasso_grid: Tuple[float, ...] = (0.25, 1.0)
    threshold: float = 1e-5
    rggr_k: int = 2
    ratio: float = 0.5
    queue_size: int = 0             # 0 = two epochs of training images (at most 24000)
    metric: str = "cosine"
    mask_start_frac: float = 20 / 120
    mask_interval: int = 1
    decay_compactors: bool = True
    snap_to_zero: bool = True
    min_reduction: float = 0.60     # validation choice: the best val mAP among lassos removing >= this of the FLOPs
    # torch-pruning sparse training (GroupNormPruner) baseline
    tp_reg: float = 5e-3
    tp_sparse_frac: float = 0.5     # sparse training for this fraction of the budget, then prune and fine-tune
    # logging / evaluation / profiling
    eval_every: int = 0             # iterations between evaluations of the CDD runs (0 = budget // 4)
    log_every: int = 8              # iterations between FLOPs records of the CDD runs
    latency_batches: Tuple[int, ...] = (1, 32)
    latency_runs: Tuple[int, ...] = (21, 6)
    tp_global: bool = False
    data_root: str = ""
    # paper reference for the lasso scaling (VeRi-776, the headline: 37,778 images / 96 per batch, 100 epochs
    # after the mask start)
    paper_iters_after_mask: int = 39350

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("input_size", "latency_batches", "latency_runs", "lasso_grid"):
            d[key] = list(d[key])
        return d

    def key(self, *fields_: str, extra: Optional[dict] = None) -> str:
        """A short hash of the named settings (all when none named) plus ``extra``."""
        d = self.to_dict()
        if fields_:
            d = {k: d[k] for k in fields_}
        for k in ("device", "threads", "workers"):
            d.pop(k, None)
        d["_extra"] = extra or {}
        return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    DATA_FIELDS = ("input_size", "train_ids", "val_ids", "pretrain_ids", "test_ids", "subset_seed", "p", "k",
                   "data_root")
    PRETRAIN_FIELDS = DATA_FIELDS + ("arch", "pretrain_iters", "pretrain_lr", "warmup_frac", "momentum",
                                     "weight_decay", "seed", "label_smoothing", "triplet_margin")
    TRAIN_FIELDS = PRETRAIN_FIELDS + ("budget", "lr", "heads_lr_factor", "delay_frac", "teacher_iters")
    STUDENT_FIELDS = TRAIN_FIELDS + ("temperature", "kd_weight", "feat_weight", "feat_tap")
    CDD_FIELDS = STUDENT_FIELDS + ("sites", "threshold", "rggr_k", "ratio", "queue_size", "metric",
                                   "mask_start_frac", "mask_interval", "decay_compactors", "snap_to_zero")

    @property
    def mask_start(self) -> int:
        return int(round(self.mask_start_frac * self.budget))

    def scaled_lasso(self) -> Tuple[float, str]:
        """The paper's lasso scaled to this schedule (METHOD.md section 6): the lasso's total travel is
        (iterations after the mask start) x LR x lambda, so lambda grows by the ratio of those iterations
        (the LR schedule has the same shape and base LR as the authors')."""
        if self.lasso > 0:
            return self.lasso, f"lasso {self.lasso:g} (given)"
        after = max(1, self.budget - self.mask_start)
        scale = self.paper_iters_after_mask / after
        return 0.004 * scale, (f"lasso 0.004 x {self.paper_iters_after_mask} / {after} (the paper's iterations after "
                               f"the mask start over ours) = {0.004 * scale:.3g}")


# --------------------------------------------------------------------------------------------- data


class MemoryImages(Dataset):
    """``(image, pid, camid)`` with the decoded images kept in memory (Market-1501 crops are 128x64,
    a few hundred MB for every image a study touches); ``transform`` runs on every access."""

    def __init__(self, samples: Sequence[ds.Sample], transform: Callable, store: Dict[str, Image.Image]):
        self.samples, self.transform, self.store = list(samples), transform, store

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.samples[i]
        img = self.store.get(s.path)
        if img is None:
            with Image.open(s.path) as im:
                img = im.convert("RGB")
            img.load()
            self.store[s.path] = img
        return self.transform(img), s.pid, s.camid


def _relabel(samples: List[ds.Sample]) -> List[ds.Sample]:
    ids = {p: i for i, p in enumerate(sorted({s.pid for s in samples}))}
    return [ds.Sample(s.path, ids[s.pid], s.camid) for s in samples]


def _val_split(samples: List[ds.Sample], seed: int) -> Tuple[List[ds.Sample], List[ds.Sample]]:
    """Query / gallery from training images of held-out identities: per identity one query image per
    camera (at most two cameras), the rest gallery; queries whose identity has no gallery image from
    another camera are dropped (the re-ID protocol removes same-camera matches)."""
    rng = random.Random(f"val:{seed}")
    by_id: Dict[int, List[ds.Sample]] = {}
    for s in samples:
        by_id.setdefault(s.pid, []).append(s)
    query, gallery = [], []
    for pid in sorted(by_id):
        items = sorted(by_id[pid], key=lambda s: s.path)
        cams = sorted({s.camid for s in items})
        rng.shuffle(cams)
        q = []
        for c in cams[:2]:
            q.append(rng.choice([s for s in items if s.camid == c]))
        g = [s for s in items if s not in q]
        query += [s for s in q if any(x.camid != s.camid for x in g)]
        gallery += g
    return query, gallery


class StudyData:
    """Market-1501 split for the study (Settings docstring): pretraining, study-train, validation and
    test identities, with PK batches that depend only on (seed, epoch)."""

    def __init__(self, S: Settings):
        root = S.data_root or str(ds.default_market1501_root())
        splits = ds.parse_market1501(root)
        rng = random.Random(f"study-ids:{S.subset_seed}")
        ids = sorted({s.pid for s in splits.train})
        rng.shuffle(ids)
        need = S.train_ids + S.val_ids + S.pretrain_ids
        if need > len(ids):
            raise SystemExit(f"the study asks for {need} training identities (train {S.train_ids} + val {S.val_ids} + "
                             f"pretrain {S.pretrain_ids}) but Market-1501 has {len(ids)}")
        train_set = set(ids[:S.train_ids])
        val_set = set(ids[S.train_ids:S.train_ids + S.val_ids])
        pre_set = set(ids[S.train_ids + S.val_ids:need])
        self.train_samples = _relabel([s for s in splits.train if s.pid in train_set])
        self.pretrain_samples = _relabel([s for s in splits.train if s.pid in pre_set])
        self.val_query, self.val_gallery = _val_split([s for s in splits.train if s.pid in val_set], S.subset_seed)
        if S.test_ids > 0:
            test = ds.subset_by_identities(splits, S.test_ids, seed=S.subset_seed)
            self.test_query, self.test_gallery = test.query, test.gallery
        else:
            self.test_query, self.test_gallery = splits.query, splits.gallery
        self.root, self.S, self.size = root, S, tuple(S.input_size)
        self.store: Dict[str, Image.Image] = {}
        train_tf, test_tf = ds.build_transforms(self.size, train=True), ds.build_transforms(self.size, train=False)
        self.sets = {"study": MemoryImages(self.train_samples, train_tf, self.store)}
        if self.pretrain_samples:
            self.sets["pretrain"] = MemoryImages(self.pretrain_samples, train_tf, self.store)
        self.eval_sets = {
            "val": (MemoryImages(self.val_query, test_tf, self.store), MemoryImages(self.val_gallery, test_tf, self.store)),
            "test": (MemoryImages(self.test_query, test_tf, self.store),
                     MemoryImages(self.test_gallery, test_tf, self.store)),
        }
        self.num_classes = {"study": len({s.pid for s in self.train_samples}),
                            "pretrain": len({s.pid for s in self.pretrain_samples})}
        self.samplers = {k: ds.PKSampler([s.pid for s in v.samples], p=S.p, k=S.k, seed=S.seed)
                         for k, v in self.sets.items()}

    def describe(self) -> str:
        def ids(ss):
            return len({s.pid for s in ss})
        return (f"Market-1501 at {self.root}: pretraining {ids(self.pretrain_samples)} ids / "
                f"{len(self.pretrain_samples)} images; study train {ids(self.train_samples)} ids / "
                f"{len(self.train_samples)} images; validation (held-out training ids) {ids(self.val_gallery)} ids, "
                f"{len(self.val_query)} queries / {len(self.val_gallery)} gallery; test {ids(self.test_query)} ids, "
                f"{len(self.test_query)} queries / {len(self.test_gallery)} gallery; input {self.size[0]}x{self.size[1]}")

    def steps_per_epoch(self, which: str = "study") -> int:
        return len(self.samplers[which])

    def stream(self, which: str, start: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Batches from iteration ``start`` on: epoch e is a function of (seed, e) only (PK order and the
        random augmentations), so every row sees the same batch at the same iteration."""
        steps = self.steps_per_epoch(which)
        epoch, skip = divmod(start, steps)
        while True:
            sampler = self.samplers[which]
            sampler.set_epoch(epoch)
            batches = list(iter(sampler))
            torch.manual_seed(self.S.seed * 100003 + epoch + 1 + (7919 if which == "pretrain" else 0))
            for i, idx in enumerate(batches):
                if i < skip:  # replay the transforms' random draws so the kept batches are unchanged
                    for j in idx:
                        self.sets[which][j]
                    continue
                items = [self.sets[which][j] for j in idx]
                yield torch.stack([x[0] for x in items]), torch.tensor([x[1] for x in items])
            skip = 0
            epoch += 1

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str = "test", per_query: bool = False):
        """mAP / rank-1 / rank-5 in % (``evaluate_reid``, cosine distance, same identity and camera removed)
        and the standard error of mAP over the queries; with ``per_query`` also the per-query APs."""
        dev = self.S.device
        q, g = self.eval_sets[split]
        kw = dict(batch_size=128, num_workers=self.S.workers)
        qf, qp, qc = extract_features(model, DataLoader(q, **kw), device=dev)
        gf, gp, gc = extract_features(model, DataLoader(g, **kw), device=dev)
        res = evaluate_reid(compute_distmat(qf, gf, "cosine"), qp, gp, qc, gc, progress=False)
        ap = np.asarray(res["all_AP"], dtype=np.float64)
        se = float(100.0 * ap.std(ddof=1) / math.sqrt(len(ap))) if len(ap) > 1 else float("nan")
        cmc = res["cmc"]
        m = {"mAP": 100.0 * float(res["mAP"]), "rank1": 100.0 * float(cmc[0]),
             "rank5": 100.0 * float(cmc[min(4, len(cmc) - 1)]), "mAP_se": se,
             "queries": int(res["num_valid_queries"])}
        return (m, [round(float(a), 6) for a in ap]) if per_query else m


# --------------------------------------------------------------------------------------------- training


def lr_at(step: int, total: int, base: float, warmup_frac: float, delay_frac: float) -> float:
    """The authors' schedule shape: linear warm-up from 0.1x over ``warmup_frac`` of the iterations,
    flat until ``delay_frac``, then cosine decay to 0 at ``total``."""
    warmup = int(round(warmup_frac * total))
    delay = max(warmup, int(round(delay_frac * total)))
    if step < warmup:
        return base * (0.1 + 0.9 * step / max(1, warmup))
    if step < delay:
        return base
    t = (step - delay) / max(1, total - delay)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def _pool(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).mean(-1) if x.dim() > 2 else x


class FeaturePairs:
    """The FitNet feature term for students without DGCs, at the same modules (and with the same
    pooling and distance) as CDDDistiller; a module is paired only where the student's and the
    teacher's widths agree (the light and pruned students have no partner at the compacted sites)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, names: Sequence[str]):
        s_mods, t_mods = dict(student.named_modules()), dict(teacher.named_modules())
        self.s, self.t, self.handles, self.names = {}, {}, [], []
        for n in names:
            sm, tm = s_mods.get(n), t_mods.get(n)
            if sm is None or tm is None or getattr(sm, "num_features", -1) != getattr(tm, "num_features", -2):
                continue
            self.names.append(n)
            self.handles.append(sm.register_forward_hook(self._store(self.s, n)))
            self.handles.append(tm.register_forward_hook(self._store(self.t, n)))

    @staticmethod
    def _store(store, name):
        def hook(m, inputs, output):
            store[name] = _pool(output)
        return hook

    def loss(self) -> Optional[torch.Tensor]:
        terms = [(self.s[n].float() - self.t[n].float()).norm(dim=1).mean() for n in self.names
                 if n in self.s and n in self.t]
        self.s.clear(), self.t.clear()
        return torch.stack(terms).sum() if terms else None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def loss_config(S: Settings) -> LossConfig:
    return LossConfig(ce_weight=1.0, label_smoothing=S.label_smoothing, triplet_weight=1.0,
                      triplet_margin=S.triplet_margin, kd_weight=S.kd_weight, temperature=S.temperature,
                      feat_weight=S.feat_weight, feat_tap=S.feat_tap)


def _losses(model, teacher, images, labels, S: Settings, feats: Optional[FeaturePairs]) -> Dict[str, torch.Tensor]:
    """CE (label smoothing) + batch-hard triplet; with a teacher also logit KD and the feature term:
    exactly CDDDistiller's terms (the core's ``triplet_loss`` / ``kd_loss``)."""
    t_logits = None
    if teacher is not None:
        with torch.no_grad():
            t_logits, _ = teacher(images)
    logits, emb = model(images)
    out = {"loss_id": F.cross_entropy(logits.float(), labels, label_smoothing=S.label_smoothing),
           "loss_triplet": triplet_loss(emb, labels, S.triplet_margin)}
    if teacher is not None and S.kd_weight > 0:
        out["loss_kd"] = S.kd_weight * kd_loss(logits, t_logits, S.temperature)
    if feats is not None and S.feat_weight > 0:
        f = feats.loss()
        if f is not None:
            out["loss_feat"] = S.feat_weight * f
    return out


def optimizer_for(model: nn.Module, S: Settings, lr: float, state=None) -> torch.optim.Optimizer:
    """SGD (momentum) with weight decay on every parameter (compactors by ``decay_compactors``) and the
    classifier at ``heads_lr_factor`` x the LR, as the authors' optimizer."""
    head = {id(p) for n, p in model.named_parameters() if n.startswith("classifier.")}
    groups = cdd_plugin.param_groups(model, lr, S.weight_decay)
    out = []
    for g in groups:
        body = [p for p in g["params"] if id(p) not in head]
        heads = [p for p in g["params"] if id(p) in head]
        if body:
            out.append(dict(g, params=body, lr_factor=1.0))
        if heads:
            out.append(dict(g, params=heads, lr_factor=S.heads_lr_factor))
    opt = torch.optim.SGD(out, lr=lr, momentum=S.momentum)
    return cdd_plugin.RGGROptimizer(opt, state) if state is not None else opt


def masked_row_stats(state) -> dict:
    """How far the masked DGC rows are from the merge threshold (the diagnosis of the lasso schedule)."""
    thr = state.cfg.threshold
    masked_norms, unmasked_below = [], 0
    for unit in state.units:  # a residual group counts each channel once (its members share the mask)
        norms = state.unit_scores(unit).float().cpu()
        m = state.unit_mask(unit).bool().cpu()
        masked_norms.append(norms[~m])
        unmasked_below += int((norms[m] < thr).sum())
    mn = torch.cat(masked_norms) if masked_norms else torch.zeros(0)
    return {"masked": int(mn.numel()), "masked_below_threshold": int((mn < thr).sum()),
            "masked_max_norm": float(mn.max()) if mn.numel() else 0.0,
            "unmasked_below_threshold": unmasked_below}


def train(row: str, model: nn.Module, data: StudyData, S: Settings, *, which: str = "study",
          total: Optional[int] = None, start: int = 0, stop: Optional[int] = None, base_lr: Optional[float] = None,
          teacher: Optional[nn.Module] = None, state=None, feature_sites: Sequence[str] = (),
          optimizer: Optional[torch.optim.Optimizer] = None, after_backward: Optional[Callable[[], None]] = None,
          evaluate: Optional[Callable[[nn.Module], Dict[str, float]]] = None, progress: str = "auto") -> List[dict]:
    """THE training loop of every row: same batches, same SGD, same schedule shape.

    Runs iterations ``start .. stop`` of a ``total``-iteration schedule (default: the whole budget),
    so a row can train, prune and continue on the same batch stream and LR curve. ``teacher=None``:
    CE + triplet. With a teacher: + KD (and the feature term where widths agree). With a CDD
    ``state``: CDDDistiller + RGGROptimizer. ``after_backward`` runs between backward and step
    (torch-pruning's sparse-training regulariser). Returns the history (CDD runs: a record every
    ``log_every`` iterations and an evaluation every ``eval_every``)."""
    dev = torch.device(S.device)
    total = total or S.budget
    stop = total if stop is None else stop
    base_lr = S.lr if base_lr is None else base_lr
    distiller, feats = None, None
    if state is not None:
        distiller = CDDDistiller(model, teacher, state, loss_config(S)).to(dev).train()
        total_ch = sum(state.unit_channels(u) for u in state.units)
        dense = state.dense_flops()
    elif teacher is not None and S.feat_weight > 0:
        feats = FeaturePairs(model, teacher, feature_sites)
    opt = optimizer or optimizer_for(model, S, base_lr, state)
    model.train()
    if teacher is not None:
        teacher.eval()
    history: List[dict] = []
    eval_every = S.eval_every or max(1, S.budget // 4)
    disable = {"auto": None, "always": False, "never": True}[progress]
    bar = tqdm(total=stop - start, desc=row, unit="it", disable=disable, dynamic_ncols=True, file=sys.stderr)
    t0 = time.perf_counter()
    sums: Dict[str, float] = {}
    n = 0
    step = start
    stream = data.stream(which, start)
    try:
        while step < stop:
            images, labels = next(stream)
            images, labels = images.to(dev), labels.to(dev)
            lr = lr_at(step, total, base_lr, S.warmup_frac, S.delay_frac)
            for g in opt.param_groups:
                g["lr"] = lr * g.get("lr_factor", 1.0)
            losses = distiller(images, labels) if distiller is not None else _losses(model, teacher, images, labels,
                                                                                      S, feats)
            loss = total_loss(losses)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{row}: non-finite loss at iteration {step} "
                                         f"({ {k: float(v) for k, v in losses.items()} }); lower the LR or the lasso")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if after_backward is not None:
                after_backward()
            opt.step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            n += 1
            step += 1
            post = {"loss": f"{loss.item():.3f}", "lr": f"{lr:.4f}"}
            if state is not None:
                summ = state.summary()
                post["masked"] = f"{total_ch - summ['channels_active']}/{total_ch}"
                post["flops"] = f"{100 * summ['flops_ratio']:.0f}%"
                if step % S.log_every == 0 or step == stop or step == start + 1:
                    history.append({"kind": "flops", "iteration": step, "lr": lr, "loss": float(loss.detach()),
                                    "flops_merged": summ["flops_merged"], "flops_planned": summ["flops_planned"],
                                    "flops_dense": dense, "channels_active": summ["channels_active"],
                                    "channels_kept": summ["channels_kept"], "channels_total": total_ch,
                                    "sparsity": summ["sparsity"]})
            bar.set_postfix(post, refresh=False)
            bar.update()
            log_now = step % max(1, data.steps_per_epoch(which)) == 0 or step == stop
            if log_now:
                mean = {k: v / max(1, n) for k, v in sums.items()}
                line = "  ".join(f"{k.replace('loss_', '')} {v:.3f}" for k, v in mean.items() if k.startswith("loss"))
                msg = f"{row}: it {step}/{total}  lr {lr:.4f}  {line}"
                if state is not None:
                    summ = state.summary()
                    msg += (f"  masked {total_ch - summ['channels_active']}/{total_ch}  below-threshold "
                            f"{total_ch - summ['channels_kept']}  merged FLOPs now {100 * summ['flops_ratio']:.1f}% "
                            f"(planned {100 * summ['flops_planned'] / dense:.1f}%)")
                logger.info(msg)
                sums, n = {}, 0
            if evaluate is not None and state is not None and step % eval_every == 0 and step < stop:
                m = evaluate(model)
                summ = state.summary()
                history.append({"kind": "eval", "iteration": step, "mAP": m["mAP"], "rank1": m["rank1"],
                                "flops_merged": summ["flops_merged"], "flops_planned": summ["flops_planned"],
                                "flops_dense": dense, "elapsed_s": time.perf_counter() - t0})
                logger.info("%s: it %d  validation mAP %.2f  rank-1 %.2f (unmerged)", row, step, m["mAP"], m["rank1"])
                model.train()
    finally:
        bar.close()
        if feats is not None:
            feats.remove()
    model.eval()
    return history


# --------------------------------------------------------------------------------------------- deploy / profile


def example_input(S: Settings, batch: int = 2, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(12345)
    return torch.randn(batch, 3, *S.input_size, generator=g).to(device)


def _fresh_like(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with freshly initialised parameters and statistics (same shapes)."""
    work = copy.deepcopy(model).cpu()
    for m in work.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return work


def deploy(model: nn.Module, S: Settings) -> nn.Module:
    """The deployable form of a network without DGCs: every BatchNorm that CDD would fold is folded
    (``insert_dgc(sites='all')`` + ``merge(threshold=0)``: no channel removed, same function), so
    that every row is counted and timed in the same form as the merged CDD students. Surgery runs
    on a freshly initialised copy (the sites are a property of the architecture) and the trained
    weights are loaded afterwards."""
    trained = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    work = _fresh_like(model).eval()
    cdd_plugin.insert_dgc(work, example_input(S), cdd_plugin.CDDConfig(sites="all"))
    missing, unexpected = work.load_state_dict(trained, strict=False)
    if unexpected or any("cdd_dgc" not in k for k in missing):
        raise RuntimeError(f"deploy: state dict mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return cdd_plugin.merge(work, threshold=0.0).eval()


def measure(model: nn.Module, S: Settings) -> Dict[str, Any]:
    """Params and FLOPs at the evaluation input size (batch 1) and median CPU latency per batch size."""
    model = model.cpu().eval()
    prof = cdd_plugin.profile(model, example_input(S, 1))
    out: Dict[str, Any] = {"params": int(prof["params"]), "flops": int(prof["flops"]), "latency_ms": {}}
    threads = S.threads or min(4, os.cpu_count() or 1)
    for b, runs in zip(S.latency_batches, S.latency_runs):
        x = example_input(S, b)
        out["latency_ms"][str(b)] = round(cdd_plugin.profile(model, x, latency=True, warmup=3, runs=runs,
                                                             threads=threads)["latency_ms"], 3)
    return out


def plain_flops(model: nn.Module, S: Settings) -> int:
    return int(cdd_plugin.profile(copy.deepcopy(model).cpu().eval(), example_input(S, 1))["flops"])


def cut_to_flops(state, target_flops: float) -> dict:
    """Lasso-only row: zero the smallest-norm DGC rows (global ranking over every site, as ResRep's
    norm rule ranks them) until the merged FLOPs are <= ``target_flops``."""
    thr = state.cfg.threshold
    kept = state.kept_channels()
    order = sorted((float(nv), name, c) for name, d in state.compactors.items()
                   for c, nv in enumerate(d.channel_norms().float().cpu().tolist()) if nv >= thr)
    chosen: Dict[str, List[int]] = {n: [] for n in kept}
    cut_norms = []
    for nv, name, c in order:
        if state.predicted_flops(kept) <= target_flops:
            break
        if kept[name] > state.cfg.min_channels:
            kept[name] -= 1
            chosen[name].append(c)
            cut_norms.append(nv)
    for name, chans in chosen.items():
        state.compactors[name].zero_(chans)
    return {"rows_cut": len(cut_norms), "largest_cut_norm": max(cut_norms) if cut_norms else 0.0,
            "predicted_flops_after_cut": int(state.predicted_flops())}


def cut_masked(state) -> dict:
    """ResRep's end of training: every masked row is removed, at zero or not (its masks are the plan;
    a masked row the lasso has not brought to zero yet would otherwise keep its channel)."""
    thr = state.cfg.threshold
    cut_norms = []
    for unit in state.units:
        alive = state.unit_mask(unit).bool().cpu()
        norms = state.unit_scores(unit).float().cpu()
        chans = (~alive & (norms >= thr)).nonzero().flatten().tolist()
        cut_norms += norms[chans].tolist()
        for name in state.units[unit]:
            state.compactors[name].zero_(chans)
    return {"rows_cut": len(cut_norms), "largest_cut_norm": max(cut_norms) if cut_norms else 0.0,
            "predicted_flops_after_cut": int(state.predicted_flops())}


def light_width(S: Settings, classes: int, target_flops: float) -> Tuple[int, int]:
    """The integer ``width_per_group`` whose deployed FLOPs are closest to ``target_flops``."""
    cache: Dict[int, int] = {}

    def f(w: int) -> int:
        if w not in cache:
            cache[w] = int(cdd_plugin.profile(deploy(ReIDNet(S.arch, classes, w), S), example_input(S, 1))["flops"])
        return cache[w]

    lo, hi = 1, 64
    while hi - lo > 1:  # FLOPs grow with the width
        mid = (lo + hi) // 2
        if f(mid) <= target_flops:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda w: abs(f(w) - target_flops))
    return best, f(best)


def cdd_producers(model: nn.Module, S: Settings, sites: str = "all", residual: bool = False) -> List[str]:
    """Names of the convolutions whose output channels CDD compacts with ``sites`` (and ``residual``
    groups) (surgery on a copy)."""
    st = cdd_plugin.insert_dgc(_fresh_like(model), example_input(S),
                               cdd_plugin.CDDConfig(sites=sites, residual=residual))
    return [s.producer for s in st.sites]


def _tp_ignored(model: nn.Module, S: Settings, residual: bool = False) -> List[nn.Module]:
    producers = set(cdd_producers(model, S, "all", residual))
    return [m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in producers]


def tp_prune(model: nn.Module, S: Settings, target_flops: float, importance=None,
             residual: bool = False) -> Tuple[nn.Module, dict]:
    """One-shot pruning with torch-pruning (``BasePruner``; ``MagnitudeImportance(p=2)`` unless
    ``importance`` is given) to ``target_flops`` (deployed FLOPs), ratio by bisection. The prunable
    channel sets are the ones CDD can compact (``sites='all'``: every bottleneck's inner sets and the
    stem; residual-coupled channels only with ``residual``, as CDD's residual groups); per-layer
    (uniform ratio) unless ``S.tp_global``."""
    import torch_pruning as tp

    model = model.cpu().eval()
    ignored_names = {n for n, m in model.named_modules() if m in set(_tp_ignored(model, S, residual))}
    x = example_input(S)
    imp = importance or tp.importance.MagnitudeImportance(p=2)

    def prune(ratio: float) -> nn.Module:
        work = copy.deepcopy(model)
        ign = [m for n, m in work.named_modules() if n in ignored_names]
        pruner = tp.pruner.BasePruner(work, x, importance=imp, pruning_ratio=ratio, global_pruning=S.tp_global,
                                      ignored_layers=ign, max_pruning_ratio=0.98)
        pruner.step()
        return work.eval()

    def fl(m):
        return int(cdd_plugin.profile(deploy(m, S), example_input(S, 1))["flops"])

    lo, hi = 0.0, 0.97
    best = (None, None, float("inf"))
    for _ in range(14):
        mid = 0.5 * (lo + hi)
        pruned = prune(mid)
        f = fl(pruned)
        if abs(f - target_flops) < best[2]:
            best = (mid, pruned, abs(f - target_flops))
        if f > target_flops:
            lo = mid
        else:
            hi = mid
        if abs(f - target_flops) / target_flops < 0.005:
            break
    ratio, pruned, _ = best
    return pruned, {"pruning_ratio": round(ratio, 4), "global_pruning": bool(S.tp_global),
                    "importance": type(imp).__name__,
                    "prunable": "the channel sets CDD can compact (sites='all'" + (
                        ", residual=True): residual streams too, where CDD's groups reach" if residual
                        else "); residual channels kept")}


class SparseTrainer:
    """torch-pruning's own sparse training: ``GroupNormPruner`` (``GroupMagnitudeImportance``) whose
    ``regularize`` adds its group-norm regulariser to the gradients after every backward; the same
    pruner then prunes by the group importance it shaped."""

    def __init__(self, model: nn.Module, S: Settings):
        import torch_pruning as tp

        self.S = S
        self.model = model
        ignored = _tp_ignored(model, S)
        self.importance = tp.importance.GroupMagnitudeImportance(p=2)
        self.pruner = tp.pruner.GroupNormPruner(model, example_input(S, 2, S.device), importance=self.importance,
                                                reg=S.tp_reg, ignored_layers=ignored, global_pruning=S.tp_global,
                                                max_pruning_ratio=0.98)

    def regularize(self) -> None:
        self.pruner.regularize(self.model)


# --------------------------------------------------------------------------------------------- misc


def machine() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "threads": torch.get_num_threads()}
    try:  # the installed distribution's version: torch-pruning 1.6.1's own __version__ still says 1.6.0
        from importlib.metadata import version
        info["torch_pruning"] = version("torch-pruning")
    except Exception:  # pragma: no cover
        pass
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    try:
        info["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    return info


def plot_tradeoff(rows: List[dict], path: Path, heavy_flops: Optional[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.2))
    markers = {"teacher": "s", "kd_heavy": "D", "cdd_rggr": "*", "cdd_rggr_all": "X", "cdd_norm": "o",
               "cdd_lasso": "v", "light": "^", "tp": "P", "tp_sparse": "p"}
    for r in rows:
        g = r["flops"] / 1e9
        ax.errorbar([g], [r["mAP"]], yerr=[r.get("mAP_se", 0.0)], fmt=markers.get(r["row"], "o"),
                    ms=14 if r["row"] == "cdd_rggr" else 8, capsize=3, label=f"{r['label']} ({r['mAP']:.1f})",
                    zorder=3)
    if heavy_flops:
        ax.axvline(heavy_flops / 1e9, color="#999", lw=0.8, ls=":")
    ax.set_xlabel("GFLOPs (MACs, deployed model, eval input, batch 1)")
    ax.set_ylabel("test mAP (%) +- s.e.")
    ax.set_title("Market-1501: mAP vs FLOPs at an equal training budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_training(histories: Dict[str, List[dict]], labels: Dict[str, str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (row, hist) in enumerate(histories.items()):
        color = f"C{i % 10}"
        fl = [h for h in hist if h["kind"] == "flops"]
        if fl:
            it = [h["iteration"] for h in fl]
            a1.plot(it, [100 * h["flops_merged"] / h["flops_dense"] for h in fl], color=color,
                    label=f"{labels.get(row, row)}: merged now")
            a1.plot(it, [100 * h["flops_planned"] / h["flops_dense"] for h in fl], color=color, ls="--",
                    label=f"{labels.get(row, row)}: planned (masked)")
        ev = [h for h in hist if h["kind"] == "eval"]
        if ev:
            a2.plot([h["iteration"] for h in ev], [h["mAP"] for h in ev], "o-", color=color,
                    label=labels.get(row, row))
    a1.set_xlabel("iteration")
    a1.set_ylabel("merged FLOPs (% of the heavy student)")
    a1.set_title("state.predicted_flops() during training")
    a1.grid(alpha=0.3)
    a1.legend(fontsize=6)
    a2.set_xlabel("iteration")
    a2.set_ylabel("validation mAP (%), unmerged")
    a2.set_title("validation mAP during training")
    a2.grid(alpha=0.3)
    a2.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def interleaved_latency(models: Dict[str, nn.Module], S: Settings, rounds: int = 3) -> Dict[str, Dict[str, float]]:
    """Median CPU latency (ms) per model and batch size, measured in alternation (``rounds`` rounds of
    every model in turn), so that the load of a shared machine hits every model alike."""
    threads = S.threads or min(4, os.cpu_count() or 1)
    models = {n: m.cpu().eval() for n, m in models.items()}
    out: Dict[str, Dict[str, float]] = {n: {} for n in models}
    for b, runs in zip(S.latency_batches, S.latency_runs):
        x = example_input(S, b)
        times: Dict[str, List[float]] = {n: [] for n in models}
        for r in range(rounds):
            for n, m in models.items():
                times[n].append(cdd_plugin.profile(m, x, latency=True, warmup=3 if r == 0 else 1,
                                                   runs=max(1, runs // rounds), threads=threads)["latency_ms"])
        for n in models:
            out[n][str(b)] = round(float(np.median(times[n])), 3)
    return out
