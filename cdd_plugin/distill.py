"""CDDDistiller: task + distillation losses for a heavy student with DGCs, and RGGR feeding.

The distiller taps features with forward hooks (the user's modules are not rewritten):
for every DGC site it reads the student's feature and the teacher's feature at the module
of the same name, pools them over space and uses them for feature distillation. With
``feat_tap="before"`` (the authors') the student side is read BEFORE its compactor, the same
point as the teacher's, so the fit term never pulls on the compactor's rows; ``"after"``
reads the compacted feature. RGGR always gets the pooled output AFTER the compactor (the
student feature of the simulated retrieval, as in the authors' code).

The teacher is a registered submodule, so ``.to(device)`` moves it and a checkpoint of
the distiller resumes without the teacher file; it is frozen (``requires_grad=False``)
and stays in eval mode whatever ``train()`` is called with.

Networks may return an embedding, ``(logits, embedding)``, or a dict with
``logits``/``cls_score`` and ``features``/``embedding``; pass ``student_forward`` /
``teacher_forward`` (``fn(model, images, labels) -> (logits or None, embedding)``) for
anything else.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError, build_checked, coerce_fields
from .dgc import tap_input, tap_output
from .state import CDDState

logger = logging.getLogger("cdd_plugin")

FEAT_TAPS = ("before", "after")

ForwardFn = Callable[[nn.Module, torch.Tensor, Optional[torch.Tensor]], Tuple[Optional[torch.Tensor], torch.Tensor]]


@dataclass
class LossConfig:
    """Loss weights and settings (METHOD.md section 3); a weight of 0 switches a term off."""

    ce_weight: float = 1.0
    label_smoothing: float = 0.1
    triplet_weight: float = 1.0
    triplet_margin: float = 0.35
    kd_weight: float = 1.0
    temperature: float = 2.0
    feat_weight: float = 0.5
    feat_tap: str = "before"   # student side of the feature term: "before" (authors') or "after" its compactor
    pairs: Dict[str, str] = field(default_factory=dict)  # student module -> teacher module (explicit pairing)

    def __post_init__(self) -> None:
        coerce_fields(self, "LossConfig")
        if not isinstance(self.pairs, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                          for k, v in self.pairs.items()):
            raise ConfigError(f"LossConfig.pairs={self.pairs!r} must map student module names to teacher module "
                              "names, e.g. {'layer1.0.bn2': 'layer1.0.bn2'}")
        for key in ("ce_weight", "triplet_weight", "kd_weight", "feat_weight"):
            if float(getattr(self, key)) < 0:
                raise ConfigError(f"LossConfig.{key}={getattr(self, key)} is negative; use 0 to switch the term off")
        if not (0.0 <= self.label_smoothing < 1.0):
            raise ConfigError(f"LossConfig.label_smoothing={self.label_smoothing} must lie in [0, 1); 0.1 is the default")
        if self.temperature <= 0:
            raise ConfigError(f"LossConfig.temperature={self.temperature} must be > 0; 2.0 is the default")
        if self.triplet_margin < 0:
            raise ConfigError(f"LossConfig.triplet_margin={self.triplet_margin} must be >= 0; 0.35 is the default")
        if self.feat_tap not in FEAT_TAPS:
            raise ConfigError(f"LossConfig.feat_tap={self.feat_tap!r} is unknown; use 'before' (the authors': the "
                              "student's feature before its compactor) or 'after' (the compacted feature)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LossConfig":
        return build_checked(cls, data, "loss")


def default_forward(model: nn.Module, images: torch.Tensor, labels: Optional[torch.Tensor] = None):
    """(logits or None, embedding) from the common output conventions."""
    out = model(images)
    if isinstance(out, dict):
        logits = out.get("logits", out.get("cls_score"))
        emb = out.get("features", out.get("embedding"))
        if emb is None:
            raise TypeError(f"the model returned a dict with keys {sorted(out)}; pass a forward adapter "
                            "fn(model, images, labels) -> (logits, embedding) to CDDDistiller")
        return logits, emb
    if isinstance(out, (tuple, list)):
        if len(out) < 2:
            return None, out[0]
        return out[0], out[-1]
    return None, out


def triplet_loss(emb: torch.Tensor, labels: torch.Tensor, margin: float = 0.3) -> torch.Tensor:
    """Batch-hard triplet loss (hardest positive, hardest negative per anchor), Euclidean."""
    dist = torch.cdist(emb.float(), emb.float()).clamp_min(1e-12)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    pos = same & ~eye
    neg = ~same
    valid = pos.any(1) & neg.any(1)
    if not valid.any():
        return emb.sum() * 0.0
    hardest_pos = (dist * pos).max(1).values
    hardest_neg = dist.masked_fill(~neg, float("inf")).min(1).values
    if margin > 0:
        loss = F.relu(hardest_pos - hardest_neg + margin)
    else:
        loss = F.softplus(hardest_pos - hardest_neg)
    return loss[valid].mean()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2, averaged over the batch."""
    T = temperature
    log_p_s = F.log_softmax(student_logits.float() / T, dim=1)
    p_t = F.softmax(teacher_logits.float() / T, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * (T * T)


def _channels_at(module: nn.Module, where: str) -> Optional[int]:
    if where == "input":
        return getattr(module, "in_channels", getattr(module, "in_features", None))
    for attr in ("num_features", "out_channels", "out_features"):
        if hasattr(module, attr):
            return int(getattr(module, attr))
    return None


class CDDDistiller(nn.Module):
    """Teacher + heavy student with DGCs -> dict of named losses (see module docstring)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, state: CDDState, losses: Optional[LossConfig] = None,
                 *, student_forward: Optional[ForwardFn] = None, teacher_forward: Optional[ForwardFn] = None) -> None:
        super().__init__()
        if teacher is student:
            raise ValueError("teacher and student are the same object; build a separate teacher "
                             "(e.g. copy.deepcopy(student) before insert_dgc, then load its weights)")
        if state.compactors and not any(d is m for d in state.compactors.values() for m in student.modules()):
            raise ValueError("the CDD state does not belong to this student; call insert_dgc on the student "
                             "you pass to CDDDistiller")
        self.student = student
        self.teacher = teacher
        self.cdd = state
        self.losses = losses or LossConfig()
        self.student_forward = student_forward or default_forward
        self.teacher_forward = teacher_forward or default_forward
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()
        self.pairs, self.unpaired = self._pair()
        self._install_hooks()

    # -- pairing -------------------------------------------------------------------------
    def _pair(self):
        """site name -> (student module, where, teacher module); unpaired sites listed with why."""
        t_mods = dict(self.teacher.named_modules())
        explicit = dict(self.losses.pairs)
        pairs, unpaired = {}, {}
        for unit, (sname, where) in self.cdd.tap_points().items():
            tname = explicit.get(sname, explicit.get(unit, sname))
            tmod = t_mods.get(tname)
            if tmod is None:
                unpaired[unit] = f"the teacher has no module {tname!r}"
                continue
            want, got = self.cdd.unit_channels(unit), _channels_at(tmod, where)
            if got is not None and got != want:
                unpaired[unit] = f"teacher {tname} has {got} channels, the student site {want}"
                continue
            pairs[unit] = (sname, where, tname)
        if unpaired:
            logger.info("CDD: %d DGC site(s) have no teacher partner; RGGR uses the student's own features as "
                        "memory there (self-retrieval) and no feature loss is applied: %s", len(unpaired),
                        "; ".join(f"{k}: {v}" for k, v in list(unpaired.items())[:3]))
        return pairs, unpaired

    def _install_hooks(self) -> None:
        s_mods = dict(self.student.named_modules())
        t_mods = dict(self.teacher.named_modules())
        self._taps: Dict[str, Tuple[str, Optional[str]]] = {}
        before = self.losses.feat_tap == "before"
        for unit, (sname, where) in self.cdd.tap_points().items():
            tname = self.pairs[unit][2] if unit in self.pairs else None
            # a residual group's student side is read by the state itself (capture), for RGGR only
            self._taps[unit] = (None if self.cdd.tied(unit) else sname, tname)
            student = [] if self.cdd.tied(unit) else [(s_mods[sname], True)]
            for mod, is_student in (student + ([(t_mods[tname], False)] if tname else [])):
                hooks, fn = ((mod._forward_pre_hooks, tap_input) if where == "input"
                             else (mod._forward_hooks, tap_output))
                if fn in hooks.values():
                    continue  # a teacher shared by several distillers is tapped once
                # the student's compactor is a hook on the same module: a tap prepended to it
                # reads the feature before the compactor, one appended reads it after
                prepend = is_student and before
                if where == "input":
                    mod.register_forward_pre_hook(tap_input, prepend=prepend)
                else:
                    mod.register_forward_hook(tap_output, prepend=prepend)

    def _arm(self, on: bool) -> None:
        for sname, tname in self._taps.values():
            for root, name in ((self.student, sname), (self.teacher, tname)):
                if name is not None:
                    mod = root.get_submodule(name)
                    mod._cdd_tap_on = on
                    if not on:
                        mod.__dict__.pop("_cdd_tap", None)
                        mod.__dict__.pop("_cdd_tap_calls", None)

    def _collect(self, root: nn.Module, teacher: bool) -> Dict[str, torch.Tensor]:
        feats = {}
        for site, (sname, tname) in self._taps.items():
            name = tname if teacher else sname
            if name is None:
                continue
            mod = root.get_submodule(name)
            t = mod.__dict__.pop("_cdd_tap", None)
            mod.__dict__.pop("_cdd_tap_calls", None)
            if t is not None:
                feats[site] = t
        return feats

    def train(self, mode: bool = True) -> "CDDDistiller":
        super().train(mode)
        self.teacher.eval()
        return self

    # -- the step ------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        if not self.training:
            return self.student_forward(self.student, images, labels)[1]
        cfg = self.losses
        self._arm(True)
        try:
            with torch.no_grad():
                t_logits, t_emb = self.teacher_forward(self.teacher, images, labels)
            t_feats = self._collect(self.teacher, teacher=True)
            self.cdd.capture(True)
            s_logits, s_emb = self.student_forward(self.student, images, labels)
            s_feats = self._collect(self.student, teacher=False)
            # RGGR's student feature: the pooled output of each compactor, or of each residual group
            r_feats = {u: self.cdd.compactors[m[0]].last_pooled for u, m in self.cdd.units.items()
                       if not self.cdd.tied(u) and self.cdd.compactors[m[0]].last_pooled is not None}
            r_feats.update(self.cdd.group_features())
        finally:
            self._arm(False)
            self.cdd.capture(False)
        out: Dict[str, torch.Tensor] = {}
        if cfg.ce_weight > 0:
            if s_logits is None:
                raise ValueError("ce_weight > 0 needs student logits, but the student returned only an embedding; "
                                 "return (logits, embedding) or set ce_weight=0")
            if labels is None:
                raise ValueError("the identity loss needs labels; pass distiller(images, labels)")
            if labels.max().item() >= s_logits.shape[1]:
                raise ValueError(f"label {labels.max().item()} is out of range for the student's {s_logits.shape[1]} "
                                 "classes; build the student head with the dataset's number of identities")
            out["loss_id"] = cfg.ce_weight * F.cross_entropy(s_logits.float(), labels, label_smoothing=cfg.label_smoothing)
        if cfg.triplet_weight > 0:
            if labels is None:
                raise ValueError("the triplet loss needs labels; pass distiller(images, labels) or set triplet_weight=0")
            out["loss_triplet"] = cfg.triplet_weight * triplet_loss(s_emb, labels, cfg.triplet_margin)
        if cfg.kd_weight > 0:
            if s_logits is None or t_logits is None:
                raise ValueError("kd_weight > 0 needs logits from both student and teacher; return (logits, embedding) "
                                 "from both, or set kd_weight=0")
            if s_logits.shape[1] != t_logits.shape[1]:
                raise ValueError(f"teacher has {t_logits.shape[1]} classes, the student {s_logits.shape[1]}; the logit "
                                 "KL term needs the same classes: train the teacher on the same identities or set "
                                 "kd_weight=0")
            out["loss_kd"] = cfg.kd_weight * kd_loss(s_logits, t_logits, cfg.temperature)
        if cfg.feat_weight > 0 and self.pairs:
            # a residual group's output is read after its compactors: fitting it to the teacher would pull
            # every live row toward the teacher and fight the lasso, so it feeds RGGR only
            terms = [(s_feats[n].float() - t_feats[n].float()).norm(dim=1).mean()
                     for n in self.pairs if n in s_feats and n in t_feats]
            if terms:
                out["loss_feat"] = cfg.feat_weight * torch.stack(terms).sum()
        self.cdd.observe(r_feats, {n: f.detach() for n, f in t_feats.items()})
        out["cdd_sparsity"] = torch.tensor(self.cdd.lasso_value(), device=s_emb.device)
        return out


def total_loss(losses: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the ``loss_*`` terms (``cdd_sparsity`` is a logged figure; RGGR applies the lasso)."""
    if not isinstance(losses, Mapping):
        raise TypeError(f"total_loss needs the dict of named losses a CDDDistiller returns in training mode, got a "
                        f"{type(losses).__name__} (in eval mode the distiller returns the student's embedding). "
                        "Fix: call distiller.train() before the training step")
    terms = [v for k, v in losses.items() if k.startswith("loss")]
    if not terms:
        raise ValueError(f"no loss term among {sorted(losses)}: every LossConfig weight is 0; switch a term on")
    return sum(terms)
