"""The one object that owns the CDD training state: DGCs, masks, queues, schedule."""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .config import CDDConfig
from .dgc import DGC, _mean_over_calls, _pool, site_kept
from .flops import FlopsModel
from .criteria import build_criterion
from .rggr import MemoryQueue
from .placement import DGCSite, Skipped

logger = logging.getLogger("cdd_plugin")

STATE_VERSION = 1


def _gather(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows, concatenated in rank order (identity outside torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    top = int(max(s.item() for s in sizes))
    pad = torch.zeros((top - x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    parts = [torch.zeros((top,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device) for _ in range(world)]
    dist.all_gather(parts, torch.cat([x, pad]).contiguous())
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


class CDDState:
    """DGC sites, masks, teacher memory queues and the mask schedule of one student.

    Masks, queues, criteria and FLOPs work on UNITS: a unit is one site, or the members of a
    residual group (``CDDConfig(residual=True)``), which share one mask, one queue (read at the
    group's output) and one group lasso over their stacked rows. Without residual groups every
    unit is a site of the same name. ``compactors`` holds every DGC module (members included).

    ``state_dict()`` / ``load_state_dict()`` carry everything needed to resume exactly
    (the DGC weights and masks also live in the model's own state dict).
    """

    def __init__(self, model: nn.Module, sites: List[DGCSite], skipped: List[Skipped], cfg: CDDConfig,
                 flops_model: FlopsModel):
        self.cfg = cfg
        self.sites = sites
        self.skipped = skipped
        self.compactors: Dict[str, DGC] = {s.name: model.get_submodule(s.name) for s in sites}
        self.units: Dict[str, List[str]] = {}      # unit -> its compactors (one, or a residual group's members)
        self._unit_site: Dict[str, DGCSite] = {}   # unit -> its first site (channels, tap, groups)
        for s in sites:
            self.units.setdefault(s.tie or s.name, []).append(s.name)
            self._unit_site.setdefault(s.tie or s.name, s)
        # a residual group's student feature: the pooled input of its tap module, kept while capturing
        self._group_taps = {u: (model.get_submodule(s.tap[0]), s.tap[1]) for u, s in self._unit_site.items() if s.tie}
        self._group_pooled: Dict[str, Tuple[torch.Tensor, int]] = {}
        self._group_hooks: list = []
        self.flops_model = flops_model
        self.iteration = 0
        self.queues: Dict[str, MemoryQueue] = {u: MemoryQueue(cfg.queue_size, s.channels, cfg.queue_dtype)
                                               for u, s in self._unit_site.items()}
        self._pending: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.last_update: Dict[str, int] = {}
        self.history: List[dict] = []
        self.criterion = build_criterion(cfg.criterion)

    # -- introspection -------------------------------------------------------------------
    def tap_points(self) -> Dict[str, Tuple[str, str]]:
        """Unit -> (module, "input" | "output") where its feature is read (teacher and student)."""
        return {u: tuple(s.tap) for u, s in self._unit_site.items()}

    def tied(self, unit: str) -> bool:
        """Whether ``unit`` is a residual group (several tied compactors)."""
        return self._unit_site[unit].tie is not None

    def unit_channels(self, unit: str) -> int:
        return self._unit_site[unit].channels

    def unit_site(self, unit: str) -> DGCSite:
        """The unit's site (a residual group's first member: channels, tap, ``embedding``)."""
        return self._unit_site[unit]

    def unit_mask(self, unit: str) -> torch.Tensor:
        """The unit's mask (every member of a residual group holds the same one)."""
        return self.compactors[self.units[unit][0]].mask

    def unit_norms(self, unit: str) -> torch.Tensor:
        """One group norm per channel of the unit; a residual group's over the stacked rows of its members."""
        members = [self.compactors[n] for n in self.units[unit]]
        if len(members) == 1:
            return members[0].channel_norms()
        return torch.stack([d.channel_norms() for d in members]).pow(2).sum(0).sqrt()

    def unit_scores(self, unit: str) -> torch.Tensor:
        """Per channel, the norm that criteria rank and the proximal snap tests: a residual group's
        stacked norm over the square root of its member count (its members' root-mean-square row
        norm). The group lasso is weighted by that square root (the usual sqrt(group size) of the
        group lasso), so this score falls by lr x lasso per step for a group's channel as for a
        single row, and neither kind is ranked behind the other for its size."""
        return self.unit_norms(unit) / len(self.units[unit]) ** 0.5

    def masks(self) -> Dict[str, torch.Tensor]:
        return {u: self.unit_mask(u) for u in self.units}

    def active_channels(self) -> Dict[str, int]:
        """Channels whose mask is still 1 (the task gradient reaches them), per unit."""
        return {u: int(self.unit_mask(u).sum().item()) for u in self.units}

    def kept_channels(self) -> Dict[str, int]:
        """Channels merge would keep now per unit (group norm not below the threshold; at least ``min_channels``).
        A NaN norm counts as kept, as merge counts it (and merge refuses non-finite compactors)."""
        return {u: self._kept(u, ~(self.unit_norms(u) < self.cfg.threshold)) for u in self.units}

    def _kept(self, unit: str, alive: torch.Tensor) -> int:
        """Channels merge keeps at ``unit`` when ``alive`` (bool per channel) survive the cut."""
        return site_kept(alive.cpu(), self._unit_site[unit].groups, self.cfg.min_channels, self.cfg.round_to)

    def predicted_flops(self, kept: Optional[Dict[str, int]] = None) -> int:
        """FLOPs (torch-pruning's count) of the model ``merge`` would produce now."""
        kept = kept or self.kept_channels()
        return self.flops_model([kept[u] for u in self.flops_model.names])

    def planned_flops(self) -> int:
        """FLOPs once every masked channel has reached zero."""
        return self.predicted_flops(self._planned_kept())

    def _planned_kept(self) -> Dict[str, int]:
        return {u: self._kept(u, self.unit_mask(u).bool()) for u in self.units}

    def dense_flops(self) -> int:
        return self.flops_model.dense()

    def lasso_value(self) -> float:
        """The group-lasso term: lasso x sum of group norms (a residual group's stacked norm weighted by
        the square root of its member count)."""
        return float(sum(self.cfg.lasso * len(m) ** 0.5 * self.unit_norms(u).sum() for u, m in self.units.items()))

    def summary(self) -> dict:
        dense = self.dense_flops()
        now = self.predicted_flops()
        total = sum(s.channels for s in self._unit_site.values())
        return {
            "iteration": self.iteration,
            "channels_total": total,
            "channels_active": sum(self.active_channels().values()),
            "channels_kept": sum(self.kept_channels().values()),
            "flops_dense": dense,
            "flops_merged": now,
            "flops_planned": self.planned_flops(),
            "flops_ratio": now / dense if dense else 1.0,
            "sparsity": self.lasso_value(),
        }

    def queue_bytes(self) -> int:
        """Bytes the memory queues take once full (rows in ``queue_dtype`` plus float32 norms)."""
        per = getattr(torch, self.cfg.queue_dtype).itemsize
        return sum(self.cfg.queue_size * (s.channels * per + 4) for s in self._unit_site.values())

    def report(self) -> str:
        width = sum(s.channels for s in self._unit_site.values())
        ties = {u: m for u, m in self.units.items() if self.tied(u)}
        lines = [f"CDD surgery: {len(self.sites)} DGC site(s), {width} prunable channels"
                 + (f" ({len(ties)} residual group(s) of tied compactors)" if ties else "")
                 + f"; criterion={self.cfg.criterion}, lasso={self.cfg.lasso}, threshold={self.cfg.threshold}",
                 f"  memory queues: {self.cfg.queue_size} x {width} {self.cfg.queue_dtype} "
                 f"= {self.queue_bytes() / 2 ** 20:.0f} MiB when full"
                 + ("" if self.cfg.checkpoint_queues else " (left out of checkpoints)")]
        w = max([len(s.name) for s in self.sites] + [10])
        lines.append(f"  {'site'.ljust(w)}  kind  channels  folds into / tap")
        for s in self.sites:
            into = s.consumers[0] if s.kind == "in" else (s.depthwise or s.producer)
            grouped = (f"  ({s.groups} groups kept balanced" + (", block-diagonal" if s.blocks > 1 else "") + ")"
                       if s.groups > 1 else "")
            tie = f"  (tied: {s.tie})" if s.tie else ""
            lines.append(f"  {s.name.ljust(w)}  {s.kind:<4}  {s.channels:>8}  {into} / {s.tap[0]}:{s.tap[1]}{grouped}{tie}")
        for u, members in ties.items():
            lines.append(f"  {u}: {len(members)} tied compactors over {self.unit_channels(u)} channels "
                         f"(one mask, one lasso over the stacked rows), scored at {self._unit_site[u].tap[0]}:input")
        if self.skipped:
            lines.append(f"  skipped ({len(self.skipped)}):")
            for sk in self.skipped:
                more = f" (+{len(sk.layers) - 1} coupled)" if len(sk.layers) > 1 else ""
                lines.append(f"    {sk.layers[0]}{more}: {sk.reason}")
        return "\n".join(lines)

    def apply_weight_decay_policy(self, optimizer: torch.optim.Optimizer) -> int:
        """Make ``optimizer`` follow ``cfg.decay_compactors``: with False, every compactor whose
        group has weight decay is moved to a group of its own with the same settings and
        ``weight_decay=0``; with True (the authors') nothing changes. Returns how many
        compactor parameters were moved. Both optimizer wrappers call it once."""
        if self.cfg.decay_compactors:
            return 0
        dgc = {id(d.weight) for d in self.compactors.values()}
        moved = 0
        for group in list(optimizer.param_groups):
            if not group.get("weight_decay", 0.0):
                continue
            mine = [p for p in group["params"] if id(p) in dgc]
            if not mine:
                continue
            group["params"] = [p for p in group["params"] if id(p) not in dgc]
            new = {k: v for k, v in group.items() if k != "params"}
            new.update(params=mine, weight_decay=0.0)
            if not group["params"]:
                group.update(new)
            else:
                optimizer.add_param_group(new)
            moved += len(mine)
        return moved

    # -- per-step hooks ------------------------------------------------------------------
    def capture(self, on: bool = True) -> None:
        """``capture(True)`` before a forward: every DGC keeps its pooled output of that forward (the
        student feature of RGGR; a compactor called several times in it keeps the mean over its
        calls); ``capture(False)`` stops and forgets."""
        for d in self.compactors.values():
            d.capture = on
            d.last_pooled = None
        for h in self._group_hooks:
            h.remove()
        self._group_hooks, self._group_pooled = [], {}
        if on:
            for u, (mod, where) in self._group_taps.items():
                if where == "input":
                    h = mod.register_forward_pre_hook(lambda m, i, _u=u: self._keep_group(_u, m, i[0]), prepend=True)
                else:  # appended: after the module's own compactor, if it hosts one
                    h = mod.register_forward_hook(lambda m, i, out, _u=u: self._keep_group(_u, m, out))
                self._group_hooks.append(h)

    def _keep_group(self, unit: str, module: nn.Module, x: torch.Tensor) -> None:
        pooled = _pool(x.detach(), isinstance(module, nn.Linear)).float()
        prev, calls = self._group_pooled.get(unit, (None, 0))
        self._group_pooled[unit] = _mean_over_calls(prev, calls, pooled)

    def group_features(self) -> Dict[str, torch.Tensor]:
        """The pooled output of every residual group in the forward pass under ``capture(True)``."""
        return {u: v[0] for u, v in self._group_pooled.items()}

    @torch.no_grad()
    def observe(self, student_feats: Optional[Dict[str, torch.Tensor]] = None,
                teacher_feats: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """Give RGGR this step's pooled features ([B, C] per site); teacher ones enter the queues.

        Sites without a teacher feature use the student's own features as the memory
        (self-retrieval), the documented fallback. Under torch.distributed the features of
        the whole global batch are gathered, so every rank holds the same queues and masks.
        """
        student_feats = dict(student_feats or {})
        teacher_feats = teacher_feats or {}
        ready = []
        for name, members in self.units.items():
            s = student_feats.get(name)
            if s is None:
                s = self._group_pooled.get(name, (None,))[0] if self.tied(name) \
                    else self.compactors[members[0]].last_pooled
            if s is None:
                continue
            t = teacher_feats.get(name)
            t = s if t is None else t
            if t.shape != s.shape:
                raise ValueError(f"teacher feature for {name} has shape {tuple(t.shape)}, the student's is "
                                 f"{tuple(s.shape)}; pair layers with the same channel count")
            if not (torch.isfinite(s).all() and torch.isfinite(t).all()):
                logger.warning("non-finite features at %s; this batch is not used for RGGR", name)
                continue
            s, t = _gather(s.detach().float()), _gather(t.detach().float())
            self.queues[name].check(t)
            ready.append((name, s, t))
        for name, s, t in ready:   # every site checked first: a refusal leaves every queue as it was
            self.queues[name].push(t)
            self._pending[name] = (s, t)

    def _due(self) -> bool:
        c = self.cfg
        return (c.criterion != "none" and self.iteration >= c.mask_start
                and (self.iteration - c.mask_start) % c.mask_interval == 0)

    def pending(self) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """This step's pooled (student, teacher) features per site, as ``observe`` received them."""
        return dict(self._pending)

    @torch.no_grad()
    def on_step(self) -> None:
        """Advance the schedule by one optimizer step, refreshing masks when due."""
        if self._due() and not self._flops_met(self._planned_kept()):
            proposals = self.criterion.propose(self)
            if proposals:
                n = self._apply(proposals)
                if n:
                    logger.debug("%s masked %d channel(s) at iteration %d", self.criterion.name, n, self.iteration)
        self._pending.clear()
        self.iteration += 1

    def nonfinite_gradients(self) -> List[str]:
        """Names of the compactors whose gradient holds a NaN or an infinity."""
        return [n for n, d in self.compactors.items()
                if d.weight.grad is not None and not bool(torch.isfinite(d.weight.grad).all())]

    def step(self, optimizer: torch.optim.Optimizer, inner_step, *, overflow: Optional[bool] = None):
        """THE step protocol of CDD, called by every optimizer wrapper between backward and the
        parameter update: refresh the masks when the schedule says so, apply the RGGR gradient
        edit, run ``inner_step()`` (the wrapped optimizer's or the loss scaler's step), then the
        proximal snap. One policy for non-finite gradients:

        * ``overflow=True`` (a loss scaler found infinities after unscaling): CDD does nothing;
          ``inner_step()`` runs so the scaler can skip the update and lower its scale. Masks,
          queues, compactors and the schedule stay as they were.
        * otherwise, if any compactor gradient is not finite, ``FloatingPointError`` is raised
          before anything changes (no scaler is there to skip the step).
        """
        if overflow:
            self._pending.clear()
            return inner_step()
        bad = self.nonfinite_gradients()
        if bad:
            raise FloatingPointError(
                f"non-finite gradients at iteration {self.iteration} (first at {bad[0]}); the step was not taken, "
                "so weights and masks are unchanged. Fix: lower the learning rate, check the inputs for NaNs, or "
                "train with a loss scaler (torch.amp.GradScaler, mmengine's AmpOptimWrapper), which skips such steps")
        self.on_step()
        self.reset_gradients(check_finite=False)
        out = inner_step()
        self.after_step(optimizer)
        return out

    @torch.no_grad()
    def reset_gradients(self, check_finite: bool = True) -> None:
        """RGGR gradient edit: grad = mask * grad_task + lasso * Q_group / ||Q_group||.

        A DGC whose gradient is not finite is left alone (an AMP scaler skips that step)."""
        lam, lam_masked = self.cfg.lasso, self.cfg.masked_lasso
        for u, members in self.units.items():
            # a residual group: lasso x sqrt(members) over the stacked rows, i.e. its rows over unit_scores
            norms = self.unit_scores(u) if len(members) > 1 else None
            for n in members:
                d = self.compactors[n]
                if check_finite and d.weight.grad is not None and not torch.isfinite(d.weight.grad).all():
                    continue
                d.reset_grad_(lam, lam_masked, norms)

    @torch.no_grad()
    def after_step(self, optimizer: torch.optim.Optimizer) -> int:
        """Proximal step of the group lasso (``snap_to_zero``): set masked groups that lie
        within one optimizer step of zero exactly to zero, with their optimizer state.
        Call right after the inner optimizer's ``step()``; returns how many groups snapped."""
        if not self.cfg.snap_to_zero or max(self.cfg.lasso, self.cfg.masked_lasso or 0.0) <= 0:
            return 0
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        snapped = 0
        for u, members in self.units.items():
            first = self.compactors[members[0]]
            g = group_of.get(id(first.weight))
            if g is None:
                continue
            if "betas" in g:  # Adam-like: steps of about lr whatever the gradient scale
                reach = g["lr"]
            else:
                lam = self.cfg.lasso if self.cfg.masked_lasso is None else self.cfg.masked_lasso
                reach = g["lr"] * lam / max(1e-8, 1.0 - g.get("momentum", 0.0))
            masked = first.mask == 0
            if not masked.any():
                continue
            norms = self.unit_scores(u)  # a residual group snaps a channel in every member at once
            idx = (masked & (norms <= reach) & (norms > 0)).nonzero().flatten()
            if idx.numel() == 0:
                continue
            for n in members:
                d = self.compactors[n]
                d.zero_(idx.tolist())
                for buf in optimizer.state.get(d.weight, {}).values():
                    if isinstance(buf, torch.Tensor) and buf.shape == d.weight.shape:
                        if d.kind == "in":
                            buf[:, idx] = 0
                        else:
                            buf[idx] = 0
            snapped += int(idx.numel())
        return snapped

    # -- mask criteria -------------------------------------------------------------------
    def _flops_met(self, kept: Dict[str, int]) -> bool:
        target = self.cfg.flops_target
        if target is None:
            return False
        return self.predicted_flops(kept) <= target * self.dense_flops()

    def _apply(self, proposals: List[Tuple[float, str, int]]) -> int:
        """Mask proposed (score, unit, channel) in ascending score order, within the budget (a grouped
        site's budget counts the widest group: merge keeps that many channels in every group; a
        residual group's channel is masked in every member)."""
        alive = {u: self.unit_mask(u).bool().cpu() for u in self.units}  # one copy, no sync per proposal
        kept = {u: self._kept(u, alive[u]) for u in self.units}
        if self._flops_met(kept):
            return 0
        added = 0
        for _, name, c in sorted(proposals):
            if not alive[name][c] or int(alive[name].sum()) <= self.cfg.min_channels:
                continue
            for member in self.units[name]:
                self.compactors[member].mask[c] = 0.0
            alive[name][c] = False
            kept[name] = self._kept(name, alive[name])
            added += 1
            if self._flops_met(kept):
                break
        return added

    # -- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "config": self.cfg.to_dict(),
            "iteration": self.iteration,
            "sites": [(s.name, s.kind, s.channels) for s in self.sites],
            "masks": {n: d.mask.detach().cpu().clone() for n, d in self.compactors.items()},
            "queues": {n: q.state_dict(with_data=self.cfg.checkpoint_queues) for n, q in self.queues.items()},
        }

    def check_state_dict(self, sd: Any) -> None:
        """Raise ValueError (naming the fix) if ``sd`` cannot be loaded into this state; change nothing."""
        if not isinstance(sd, dict) or sd.get("version") != STATE_VERSION:
            raise ValueError("not a cdd_plugin CDD state (missing or unknown 'version'); pass the 'cdd' entry "
                             "that CDDState.state_dict() produced")
        for key in ("iteration", "sites", "masks", "queues"):
            if key not in sd:
                raise ValueError(f"the CDD state lacks {key!r}; it is truncated or was not written by CDDState")
        mine = [(s.name, s.kind, s.channels) for s in self.sites]
        theirs = [tuple(x) for x in sd["sites"]]
        if mine != theirs:
            diff = sorted(set(mine) ^ set(theirs))[:4]
            raise ValueError(f"the checkpoint's DGC sites differ from this model's (e.g. {diff}); resume with the "
                             "same student architecture, example input size and surgery settings")
        for n, d in self.compactors.items():
            m = sd["masks"].get(n)
            if not isinstance(m, torch.Tensor) or m.shape != d.mask.shape:
                raise ValueError(f"the checkpoint's mask of {n} is missing or has another shape; it does not belong "
                                 "to this model")
        for u, members in self.units.items():
            if len(members) > 1 and not all(torch.equal(sd["masks"][m], sd["masks"][members[0]]) for m in members):
                raise ValueError(f"the checkpoint's masks of the residual group {u} differ between its members, which "
                                 "share one mask; the checkpoint was edited or written by another program. Fix: resume from an unedited "
                                 "checkpoint of this run (or start the run again)")
        for n, q in self.queues.items():
            qs = sd["queues"].get(n)
            if not isinstance(qs, dict) or int(qs.get("size", -1)) != q.size:
                raise ValueError(f"the checkpoint's memory queue of {n} holds {qs.get('size') if isinstance(qs, dict) else '?'} "
                                 f"slots, this run is configured for {q.size}; resume with the same queue_size")
            data = qs.get("data")
            if data is not None and (data.dim() != 2 or data.shape[1] != q.channels or data.shape[0] > q.size):
                raise ValueError(f"the checkpoint's memory queue of {n} has shape {tuple(data.shape)}, expected at "
                                 f"most [{q.size}, {q.channels}]")

    def load_state_dict(self, sd: dict) -> None:
        """Restore masks, queues and the schedule position; everything is checked before anything changes."""
        self.check_state_dict(sd)
        self.iteration = int(sd["iteration"])
        for n, m in sd["masks"].items():
            self.compactors[n].mask.copy_(m.to(self.compactors[n].mask.device))
        dev = next(iter(self.compactors.values())).weight.device
        for n, q in sd["queues"].items():
            self.queues[n].load_state_dict(q, device=dev)
