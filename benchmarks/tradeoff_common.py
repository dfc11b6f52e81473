"""Building blocks of ``bench_tradeoff.py``: network, data, the one training loop, evaluation,
deployment (BN folding / merge), profiling, the torch-pruning baseline, width matching, plots.

Everything here is shared by every row of the trade-off table, so that the rows differ
only in the model they train and in how it is compressed.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DataLoader
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
    BNNeck head), like ``benchmarks/bench_speed.py``'s ReIDNet. ``width_per_group=64``
    is the standard network; smaller values give the narrow ("light") student.
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


# --------------------------------------------------------------------------------------------- settings


@dataclass
class Settings:
    """Every setting of a run (written to results.json). See bench_tradeoff.py for the presets."""

    preset: str = "cpu"
    arch: str = "resnet50"
    input_size: Tuple[int, int] = (128, 64)
    train_ids: int = 100            # 0 = every training identity
    test_ids: int = 200             # 0 = the full query / gallery split (distractors included)
    subset_seed: int = 0            # which identities: fixed, independent of --seed
    epochs: int = 8
    lr: float = 0.05
    warmup_epochs: float = 1.0
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
    triplet_margin: float = 0.3
    temperature: float = 2.0
    kd_weight: float = 1.0
    feat_weight: float = 0.0
    # CDD
    lasso: float = 0.05
    threshold: float = 1e-5
    rggr_k: int = 2
    ratio: float = 0.5
    queue_size: int = 0             # 0 = two epochs of training images (at most 24000)
    metric: str = "cosine"
    mask_start_epoch: float = 2.0
    mask_interval: int = 1
    flops_target: float = 0.35
    norm_done_frac: float = 0.5     # the norm criterion reaches the target by this fraction of training
    # logging / evaluation / profiling
    eval_every: int = 2             # epochs between evaluations of the CDD runs (and always the last)
    log_every: int = 10             # iterations between FLOPs records of the CDD runs
    latency_batches: Tuple[int, ...] = (1, 32)
    latency_runs: Tuple[int, ...] = (20, 5)
    tp_global: bool = False
    data_root: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("input_size", "latency_batches", "latency_runs"):
            d[key] = list(d[key])
        return d

    def key(self, *fields_: str, extra: Optional[dict] = None) -> str:
        """A short hash of the named settings (all when none named) plus ``extra``."""
        d = self.to_dict()
        d.pop("device", None), d.pop("threads", None), d.pop("workers", None)
        if fields_:
            d = {k: d[k] for k in fields_}
        d["_extra"] = extra or {}
        return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    # which settings decide how a model is trained (the cache key of every row and of the teacher)
    TRAIN_FIELDS = ("arch", "input_size", "train_ids", "test_ids", "subset_seed", "epochs", "lr", "warmup_epochs",
                    "momentum", "weight_decay", "p", "k", "seed", "label_smoothing", "triplet_margin", "data_root")
    STUDENT_FIELDS = TRAIN_FIELDS + ("temperature", "kd_weight", "feat_weight")
    CDD_FIELDS = STUDENT_FIELDS + ("lasso", "threshold", "rggr_k", "ratio", "queue_size", "metric",
                                   "mask_start_epoch", "mask_interval", "flops_target", "norm_done_frac")


# --------------------------------------------------------------------------------------------- data


class MarketData:
    """A Market-1501 subset: ``train_ids`` training identities, ``test_ids`` test identities
    (their query and gallery images), standard re-ID protocol."""

    def __init__(self, S: Settings):
        root = S.data_root or str(ds.default_market1501_root())
        splits = ds.parse_market1501(root)
        train = splits if S.train_ids <= 0 else ds.subset_by_identities(splits, S.train_ids, seed=S.subset_seed)
        test = splits if S.test_ids <= 0 else ds.subset_by_identities(splits, S.test_ids, seed=S.subset_seed)
        self.root = root
        self.train_samples, self.query_samples, self.gallery_samples = train.train, test.query, test.gallery
        self.num_classes = len({s.pid for s in self.train_samples})
        self.size = tuple(S.input_size)
        self.train = ds.ImageDataset(self.train_samples, ds.build_transforms(self.size, train=True))
        self.query = ds.ImageDataset(self.query_samples, ds.build_transforms(self.size, train=False))
        self.gallery = ds.ImageDataset(self.gallery_samples, ds.build_transforms(self.size, train=False))
        self.pids = [s.pid for s in self.train_samples]
        self.S = S
        self.sampler = ds.PKSampler(self.pids, p=min(S.p, self.num_classes), k=S.k, seed=S.seed)

    def describe(self) -> str:
        def ids(ss):
            return len({s.pid for s in ss})
        return (f"Market-1501 at {self.root}: train {ids(self.train_samples)} ids / {len(self.train_samples)} images; "
                f"query {ids(self.query_samples)} ids / {len(self.query_samples)} images; gallery "
                f"{ids(self.gallery_samples)} ids / {len(self.gallery_samples)} images; input "
                f"{self.size[0]}x{self.size[1]}")

    @property
    def steps_per_epoch(self) -> int:
        return len(self.sampler)

    def batches(self, epoch: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """The batches of ``epoch``: the same for every row (PK order from (seed, epoch), random
        transforms from a torch seed set from (seed, epoch))."""
        self.sampler.set_epoch(epoch)
        torch.manual_seed(self.S.seed * 100003 + epoch + 1)
        loader = DataLoader(self.train, batch_sampler=self.sampler, num_workers=self.S.workers,
                            persistent_workers=False, pin_memory=self.S.device.startswith("cuda"))
        for images, pids, _ in loader:
            yield images, pids

    @torch.no_grad()
    def evaluate(self, model: nn.Module, per_query: bool = False):
        """mAP / rank-1 / rank-5 in % (``cdd_plugin.evaluation.evaluate_reid``, cosine distance) and
        the standard error of mAP over the queries; with ``per_query`` also the list of per-query APs."""
        dev = self.S.device
        kw = dict(batch_size=128, num_workers=self.S.workers)
        qf, qp, qc = extract_features(model, DataLoader(self.query, **kw), device=dev)
        gf, gp, gc = extract_features(model, DataLoader(self.gallery, **kw), device=dev)
        res = evaluate_reid(compute_distmat(qf, gf, "cosine"), qp, gp, qc, gc, progress=False)
        ap = np.asarray(res["all_AP"], dtype=np.float64)
        se = float(100.0 * ap.std(ddof=1) / math.sqrt(len(ap))) if len(ap) > 1 else float("nan")
        cmc = res["cmc"]
        m = {"mAP": 100.0 * float(res["mAP"]), "rank1": 100.0 * float(cmc[0]),
             "rank5": 100.0 * float(cmc[min(4, len(cmc) - 1)]), "mAP_se": se,
             "queries": int(res["num_valid_queries"])}
        return (m, [round(float(a), 6) for a in ap]) if per_query else m


# --------------------------------------------------------------------------------------------- training


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up over ``warmup`` iterations, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def _pool(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).mean(-1) if x.dim() > 2 else x


class FeaturePairs:
    """FitNet-style feature term for students without DGCs, at the same modules (and with the
    same pooling and distance) as CDDDistiller uses for the CDD rows; a module is paired only
    when the student's and the teacher's widths agree (the light and pruned students have no
    width-matched partner at the compacted sites)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, names: Sequence[str]):
        s_mods, t_mods = dict(student.named_modules()), dict(teacher.named_modules())
        self.s, self.t, self.handles = {}, {}, []
        self.names = []
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


def kd_losses(student: nn.Module, teacher: nn.Module, images, labels, S: Settings,
              feats: Optional[FeaturePairs]) -> Dict[str, torch.Tensor]:
    """The student loss of every non-CDD student row: exactly CDDDistiller's terms (the core's
    cross-entropy with label smoothing, ``triplet_loss``, ``kd_loss``, and the feature term)."""
    with torch.no_grad():
        t_logits, _ = teacher(images)
    s_logits, s_emb = student(images)
    out = {"loss_id": F.cross_entropy(s_logits.float(), labels, label_smoothing=S.label_smoothing),
           "loss_triplet": triplet_loss(s_emb, labels, S.triplet_margin)}
    if S.kd_weight > 0:
        out["loss_kd"] = S.kd_weight * kd_loss(s_logits, t_logits, S.temperature)
    if feats is not None and S.feat_weight > 0:
        f = feats.loss()
        if f is not None:
            out["loss_feat"] = S.feat_weight * f
    return out


def base_losses(model: nn.Module, images, labels, S: Settings) -> Dict[str, torch.Tensor]:
    """The teacher's loss: identity (cross-entropy, label smoothing) + batch-hard triplet."""
    logits, emb = model(images)
    return {"loss_id": F.cross_entropy(logits.float(), labels, label_smoothing=S.label_smoothing),
            "loss_triplet": triplet_loss(emb, labels, S.triplet_margin)}


def loss_config(S: Settings) -> LossConfig:
    return LossConfig(ce_weight=1.0, label_smoothing=S.label_smoothing, triplet_weight=1.0,
                      triplet_margin=S.triplet_margin, kd_weight=S.kd_weight, temperature=S.temperature,
                      feat_weight=S.feat_weight)


def masked_row_stats(state) -> dict:
    """How far the masked DGC rows are from the merge threshold (the diagnosis of the lasso schedule)."""
    thr = state.cfg.threshold
    masked_norms, unmasked_below = [], 0
    for d in state.compactors.values():
        norms = d.channel_norms().float().cpu()
        m = d.mask.bool().cpu()
        masked_norms.append(norms[~m])
        unmasked_below += int((norms[m] < thr).sum())
    mn = torch.cat(masked_norms) if masked_norms else torch.zeros(0)
    return {"masked": int(mn.numel()), "masked_below_threshold": int((mn < thr).sum()),
            "masked_max_norm": float(mn.max()) if mn.numel() else 0.0,
            "masked_median_norm": float(mn.median()) if mn.numel() else 0.0,
            "unmasked_below_threshold": unmasked_below}


def train(row: str, model: nn.Module, data: MarketData, S: Settings, *, teacher: Optional[nn.Module] = None,
          state=None, feature_sites: Sequence[str] = (), progress: str = "auto",
          evaluate: Optional[Callable[[nn.Module], Dict[str, float]]] = None) -> List[dict]:
    """THE training loop of every row: same batches, same SGD, same warm-up + cosine schedule.

    ``teacher=None``: the teacher (CE + triplet). ``state=None``: a KD student (CE + triplet +
    KD, and the feature term when enabled). With a CDD ``state``: CDDDistiller + RGGROptimizer.
    Returns the history: one record every ``log_every`` iterations (CDD runs) and one per
    evaluation (CDD runs, every ``eval_every`` epochs except the last: the caller evaluates the
    merged model after training and appends it).
    """
    dev = torch.device(S.device)
    steps = data.steps_per_epoch
    total = steps * S.epochs
    warmup = int(round(S.warmup_epochs * steps))
    groups = cdd_plugin.param_groups(model, S.lr, S.weight_decay)
    sgd = torch.optim.SGD(groups, lr=S.lr, momentum=S.momentum)
    distiller, feats = None, None
    if state is not None:
        distiller = CDDDistiller(model, teacher, state, loss_config(S)).to(dev).train()
        opt = cdd_plugin.RGGROptimizer(sgd, state)
        total_ch = sum(s.channels for s in state.sites)
        dense = state.dense_flops()
    else:
        opt = sgd
        if teacher is not None and S.feat_weight > 0:
            feats = FeaturePairs(model, teacher, feature_sites)
    model.train()
    if teacher is not None:
        teacher.eval()
    history: List[dict] = []
    disable = {"auto": None, "always": False, "never": True}[progress]
    bar = tqdm(total=total, desc=row, unit="it", disable=disable, dynamic_ncols=True, file=sys.stderr)
    step, t0 = 0, time.perf_counter()
    try:
        for epoch in range(S.epochs):
            sums: Dict[str, float] = {}
            n = 0
            for images, labels in data.batches(epoch):
                images, labels = images.to(dev, non_blocking=True), labels.to(dev, non_blocking=True)
                lr = lr_at(step, total, warmup, S.lr)
                for g in opt.param_groups:
                    g["lr"] = lr
                if distiller is not None:
                    losses = distiller(images, labels)
                elif teacher is not None:
                    losses = kd_losses(model, teacher, images, labels, S, feats)
                else:
                    losses = base_losses(model, images, labels, S)
                loss = total_loss(losses)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{row}: non-finite loss at iteration {step} ({ {k: float(v) for k, v in losses.items()} }); "
                                             "lower --lr or --lasso")
                opt.zero_grad(set_to_none=True)
                loss.backward()
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
                    if step % S.log_every == 0 or step == total or step == 1:
                        history.append({"kind": "flops", "iteration": step, "epoch": step / steps, "lr": lr,
                                        "loss": float(loss.detach()),
                                        "flops_merged": summ["flops_merged"], "flops_planned": summ["flops_planned"],
                                        "flops_dense": dense, "channels_active": summ["channels_active"],
                                        "channels_kept": summ["channels_kept"], "channels_total": total_ch,
                                        "sparsity": summ["sparsity"]})
                bar.set_postfix(post, refresh=False)
                bar.update()
            mean = {k: v / max(1, n) for k, v in sums.items()}
            line = "  ".join(f"{k.replace('loss_', '')} {v:.3f}" for k, v in mean.items() if k.startswith("loss"))
            msg = f"{row}: epoch {epoch + 1}/{S.epochs}  it {step}  lr {lr:.4f}  {line}"
            if state is not None:
                summ = state.summary()
                msg += (f"  masked {total_ch - summ['channels_active']}/{total_ch}  below-threshold "
                        f"{total_ch - summ['channels_kept']}  merged FLOPs now {100 * summ['flops_ratio']:.1f}% "
                        f"(planned {100 * summ['flops_planned'] / dense:.1f}%)")
            last = epoch + 1 == S.epochs
            if evaluate is not None and state is not None and (epoch + 1) % max(1, S.eval_every) == 0 and not last:
                m = evaluate(model)
                summ = state.summary()
                history.append({"kind": "eval", "iteration": step, "epoch": epoch + 1, "mAP": m["mAP"],
                                "rank1": m["rank1"], "flops_merged": summ["flops_merged"],
                                "flops_planned": summ["flops_planned"], "flops_dense": dense,
                                "elapsed_s": time.perf_counter() - t0})
                msg += f"  | mAP {m['mAP']:.2f}  rank-1 {m['rank1']:.2f} (unmerged)"
            logger.info(msg)
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
    (``insert_dgc`` + ``merge(threshold=0)``: no channel removed, same function), so that every row
    is counted and timed in the same form as the merged CDD students.

    Surgery runs on a freshly initialised copy and the trained weights are loaded afterwards:
    ``insert_dgc``'s zero-channel probe can overflow on trained weights of large scale and then
    drop sites (see the report of this benchmark), and the sites are a property of the
    architecture, not of the weights.
    """
    trained = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    work = _fresh_like(model).eval()
    cdd_plugin.insert_dgc(work, example_input(S), cdd_plugin.CDDConfig())
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


def light_width(S: Settings, classes: int, target_plain_flops: float) -> Tuple[int, int]:
    """The integer ``width_per_group`` whose plain FLOPs are closest to ``target_plain_flops``."""
    cache: Dict[int, int] = {}

    def f(w: int) -> int:
        if w not in cache:
            cache[w] = plain_flops(ReIDNet(S.arch, classes, w), S)
        return cache[w]

    lo, hi = 1, 64
    while hi - lo > 1:  # FLOPs grow with the width
        mid = (lo + hi) // 2
        if f(mid) <= target_plain_flops:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda w: abs(f(w) - target_plain_flops))
    return best, f(best)


def cdd_producers(model: nn.Module, S: Settings) -> List[str]:
    """Names of the convolutions whose output channels CDD compacts (surgery on a copy)."""
    st = cdd_plugin.insert_dgc(_fresh_like(model), example_input(S), cdd_plugin.CDDConfig())
    return [s.producer for s in st.sites]


def tp_prune(model: nn.Module, S: Settings, target_plain_flops: float) -> Tuple[nn.Module, dict]:
    """One-shot magnitude pruning with torch-pruning (``MagnitudeImportance(p=2)`` + ``BasePruner``)
    to ``target_plain_flops``: the pruning ratio is found by bisection.

    Only the channel sets CDD compacts may be pruned (every other conv / linear is in
    ``ignored_layers``, so residual-coupled channels are never pruned); per-layer
    (uniform ratio) unless ``S.tp_global``.
    """
    import torch_pruning as tp

    model = model.cpu().eval()
    producers = set(cdd_producers(model, S))
    ignored = [m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in producers]
    x = example_input(S)

    def prune(ratio: float) -> nn.Module:
        work = copy.deepcopy(model)
        ign = [dict(work.named_modules())[n] for n, m in model.named_modules() if m in ignored_set]
        pruner = tp.pruner.BasePruner(work, x, importance=tp.importance.MagnitudeImportance(p=2),
                                      pruning_ratio=ratio, global_pruning=S.tp_global, ignored_layers=ign,
                                      max_pruning_ratio=0.98)
        pruner.step()
        return work.eval()

    ignored_set = set(ignored)
    lo, hi = 0.0, 0.97
    best = (None, None, float("inf"))
    for _ in range(12):
        mid = 0.5 * (lo + hi)
        pruned = prune(mid)
        fl = plain_flops(pruned, S)
        if abs(fl - target_plain_flops) < best[2]:
            best = (mid, pruned, abs(fl - target_plain_flops))
        if fl > target_plain_flops:
            lo = mid
        else:
            hi = mid
        if abs(fl - target_plain_flops) / target_plain_flops < 0.005:
            break
    ratio, pruned, _ = best
    return pruned, {"pruning_ratio": round(ratio, 4), "global_pruning": bool(S.tp_global),
                    "importance": "MagnitudeImportance(p=2) (group L2 norm, mean over the group)",
                    "prunable": f"{len(producers)} channel sets (the ones CDD compacts; residual channels kept)"}


# --------------------------------------------------------------------------------------------- misc


def machine() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "threads": torch.get_num_threads()}
    try:
        import torch_pruning as tp
        info["torch_pruning"] = getattr(tp, "__version__", "?")
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

    fig, ax = plt.subplots(figsize=(7.5, 5))
    markers = {"teacher": "s", "kd_heavy": "D", "cdd_rggr": "*", "cdd_norm": "o", "cdd_lasso": "v",
               "light": "^", "tp": "P"}
    for r in rows:
        g = r["flops"] / 1e9
        ax.scatter([g], [r["mAP"]], s=160 if r["row"] == "cdd_rggr" else 70, marker=markers.get(r["row"], "o"),
                   label=f"{r['label']} ({r['mAP']:.1f})", zorder=3)
        ax.annotate(r["label"], (g, r["mAP"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    if heavy_flops:
        ax.axvline(heavy_flops / 1e9, color="#999", lw=0.8, ls=":")
    ax.set_xlabel("GFLOPs (MACs, deployed model, eval input, batch 1)")
    ax.set_ylabel("mAP (%)")
    ax.set_title("Market-1501 subset: mAP vs FLOPs")
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
        color = f"C{i}"
        fl = [h for h in hist if h["kind"] == "flops"]
        if fl:
            it = [h["iteration"] for h in fl]
            a1.plot(it, [100 * h["flops_merged"] / h["flops_dense"] for h in fl], color=color,
                    label=f"{labels[row]}: merged now")
            a1.plot(it, [100 * h["flops_planned"] / h["flops_dense"] for h in fl], color=color, ls="--",
                    label=f"{labels[row]}: planned (masked)")
        ev = [h for h in hist if h["kind"] == "eval"]
        if ev:
            a2.plot([h["iteration"] for h in ev], [h["mAP"] for h in ev], "-", color=color, label=labels[row])
            a2.plot([h["iteration"] for h in ev if not h.get("merged")], [h["mAP"] for h in ev if not h.get("merged")],
                    "o", color=color)
            a2.plot([h["iteration"] for h in ev if h.get("merged")], [h["mAP"] for h in ev if h.get("merged")],
                    "*", color=color, ms=12)
    a1.set_xlabel("iteration")
    a1.set_ylabel("merged FLOPs (% of the heavy student)")
    a1.set_title("state.predicted_flops() during training")
    a1.grid(alpha=0.3)
    a1.legend(fontsize=7)
    a2.set_xlabel("iteration")
    a2.set_ylabel("mAP (%): o unmerged, * merged (final)")
    a2.set_title("mAP during training")
    a2.grid(alpha=0.3)
    a2.legend(fontsize=7)
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


def mask_done_iteration(history: List[dict], target_fraction: float) -> Optional[int]:
    """First logged iteration at which the masked (planned) FLOPs met the target."""
    for h in history:
        if h["kind"] == "flops" and h["flops_planned"] <= target_fraction * h["flops_dense"] * 1.0005:
            return int(h["iteration"])
    return None
