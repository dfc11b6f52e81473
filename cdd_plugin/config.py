"""Configuration of the compression side of CDD (surgery, sparsity, mask criteria)."""
from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, Mapping, Optional

CRITERIA = ("rggr", "norm", "none")
METRICS = ("cosine", "l2")
QUEUE_DTYPES = ("float32", "bfloat16", "float16")
#: where surgery puts compactors: "paper" = the authors' placement (one per residual block,
#: on the channel set that feeds the block's last convolution); "all" = every channel set
#: that can be compacted exactly (ours: the stem and each bottleneck's first set too)
SITES = ("paper", "all")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the fix."""


_TRUE, _FALSE = ("true", "yes", "on"), ("false", "no", "off")


def _as_number(value: Any, kind: str):
    """``value`` as a ``kind`` ("float" / "int") if it converts cleanly, else raise ValueError."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()  # numpy / torch scalars
    if isinstance(value, str):
        text = value.strip()
        value = int(text) if kind == "int" and text.lstrip("+-").isdigit() else float(text)
    if not isinstance(value, (int, float)):
        raise ValueError(f"a {type(value).__name__} is not a number")
    if not math.isfinite(value):
        raise ValueError("it is not finite")
    if kind == "int":
        if isinstance(value, float) and not value.is_integer():
            raise ValueError("it is not a whole number")
        return int(value)
    return float(value)


def coerce_fields(obj: Any, what: str) -> None:
    """Type every field of a settings dataclass by its annotation, at config time, naming the key:
    numbers given as strings (PyYAML reads ``4e-3`` as a string), numpy scalars and integral floats
    are converted when they convert cleanly; NaN, infinities and anything else are refused."""
    for f in fields(obj):
        kind = str(f.type).replace("typing.", "")
        value = getattr(obj, f.name)
        optional = kind.startswith("Optional[")
        base = kind[len("Optional["):-1] if optional else kind
        if value is None and optional:
            continue
        try:
            if base in ("float", "int"):
                value = _as_number(value, base)
            elif base == "bool":
                if hasattr(value, "item") and callable(value.item):
                    value = value.item()
                if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
                    value = value.strip().lower() in _TRUE
                if not isinstance(value, bool):
                    raise ValueError("it must be True or False")
            elif base == "str" and not isinstance(value, str):
                raise ValueError(f"a {type(value).__name__} is not a string")
        except (ValueError, TypeError) as exc:
            want = {"float": "a finite number", "int": "a whole number", "bool": "True or False",
                    "str": "a string"}.get(base, base)
            default = f.default if f.default is not MISSING else None
            raise ConfigError(f"{what}.{f.name}={getattr(obj, f.name)!r} is invalid: {exc}. Fix: give {want}"
                              + (f", e.g. {f.name}={default!r} (the default)" if default is not None else "")
                              + ".") from None
        setattr(obj, f.name, value)


def mask_start_iteration(epochs: float, iters_per_epoch: float) -> int:
    """The first optimizer iteration of epoch ``epochs`` (may be fractional): every front end
    converts an epoch-based mask start with this one rule, ``ceil(epochs x iterations per
    epoch)``, where the iterations per epoch count optimizer steps (batches / accumulation)."""
    e = _as_number(epochs, "float")
    n = _as_number(iters_per_epoch, "float")
    if e < 0 or n <= 0:
        raise ConfigError(f"mask start at epoch {epochs} with {iters_per_epoch} iterations per epoch is invalid; the "
                          "epoch must be >= 0 and an epoch must have at least one iteration")
    return int(math.ceil(e * n - 1e-9))


def build_checked(cls, data: Mapping[str, Any], what: str):
    """``cls(**data)`` for a settings dataclass; unknown keys are an error listing the valid ones."""
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ConfigError(f"unknown {what} setting(s) {unknown}; valid keys are: {', '.join(valid)}")
    return cls(**dict(data))


@dataclass
class CDDConfig:
    """Settings of DGC surgery, the group lasso and the mask criterion.

    Defaults are the authors' (METHOD.md section 6). ``sites="paper"`` is the authors'
    placement (one compactor per residual block, on the channel set that feeds the block's
    last convolution: a bottleneck's middle 3x3 output, a basic block's first conv output);
    ``sites="all"`` compacts every channel set that can be folded exactly (ours).
    ``decay_compactors=True`` lets the optimizer's weight decay act on the compactors too,
    as in the authors' code; False exempts them (the group lasso is then their only
    regulariser). ``masked_lasso`` (ours; None = ``lasso``, the authors') is the lasso of masked
    rows alone: a short schedule can make masked rows reach zero in time without pulling harder
    on the rows that still learn. ``round_to`` (ours; 1 = off) rounds every merged width up to a multiple of it
    (8 or 16 suit CPU and GPU kernels) by keeping the largest rows merge would cut, so merge
    stays exact; ``kept_channels`` and the FLOPs figures count the rounded widths. ``mask_start`` and
    ``mask_interval`` count optimizer steps (iterations), not epochs: adapters convert
    epochs with their iterations per epoch. ``snap_to_zero`` adds the proximal step of the
    group lasso after each optimizer step: a masked group that is within one step of zero
    is set exactly to zero (with its momentum), instead of oscillating around zero at about
    lr x lasso / (1 - momentum) until the learning rate decays. Set it to False for the
    authors' plain form.

    ``queue_dtype`` (ours; "float32" = the authors') stores the teacher memory queues in half
    precision ("float16" or "bfloat16"): half the memory and half the checkpoint size. The
    neighbour search and contributions are still computed in float32, on the rounded features;
    masks can differ from float32 queues only where two contributions or two neighbours tie to
    within the rounding (float16: 11 significant bits, bfloat16: 8; see RESULTS.md), and
    float16 refuses features beyond its range (65504). ``checkpoint_queues=False`` (ours) leaves
    the queues out of ``state_dict()``: a resumed run refills them from its next batches, so the
    masks chosen until they are full again use a smaller memory than an uninterrupted run's.

    ``residual=True`` (ours, beyond the paper) also compacts the channels that residual additions
    tie together (a ResNet stage's stream): every producer of such a group (each block's last
    conv + BN, the projection shortcut) gets a compactor, their rows for one channel share ONE
    mask and one group lasso over the stacked rows, and RGGR scores the group from the group's
    output (the stage output, pooled; the teacher read at the same point). A channel zeroed in
    every member is zero in the whole stream, so merge cuts it from every producer and consumer,
    exactly. Groups that reach the model output (the embedding) are left dense unless
    ``cut_embedding=True`` (ours): then the last group is compacted too and its zero channels are
    dropped from the output embedding (distances between embeddings do not change; the gallery
    index gets smaller), with a classifier that reads the embedding cut to match. Merge checks
    that every dropped output channel is exactly zero.
    """

    lasso: float = 0.004
    threshold: float = 1e-5
    criterion: str = "rggr"
    k: int = 2
    ratio: float = 0.5
    queue_size: int = 24000
    metric: str = "cosine"
    mask_start: int = 0
    mask_interval: int = 1
    flops_target: Optional[float] = None
    norm_step: int = 8
    min_channels: int = 1
    round_to: int = 1
    snap_to_zero: bool = True
    sites: str = "paper"
    decay_compactors: bool = True
    masked_lasso: Optional[float] = None
    queue_dtype: str = "float32"
    checkpoint_queues: bool = True
    residual: bool = False
    cut_embedding: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "CDDConfig":
        coerce_fields(self, "CDDConfig")

        def bad(key: str, why: str, fix: str) -> ConfigError:
            return ConfigError(f"CDDConfig.{key}={getattr(self, key)!r} is invalid: {why}. Fix: {fix}.")

        if self.sites not in SITES:
            raise bad("sites", "unknown placement", "use 'paper' (the authors': one compactor per residual block) or "
                      "'all' (every channel set that can be compacted exactly)")
        if self.queue_dtype not in QUEUE_DTYPES:
            raise bad("queue_dtype", "unknown storage type of the memory queues",
                      f"use one of {', '.join(QUEUE_DTYPES)} (float32, the default, is the authors')")
        for key in ("snap_to_zero", "decay_compactors", "checkpoint_queues", "residual", "cut_embedding"):
            if not isinstance(getattr(self, key), bool):
                raise bad(key, "must be True or False", f"set {key}=True or {key}=False")
        if self.cut_embedding and not self.residual:
            raise bad("cut_embedding", "the embedding is the last residual group's stream, and residual groups are off",
                      "set residual=True as well (or cut_embedding=False)")
        if self.criterion not in CRITERIA:
            raise bad("criterion", "unknown mask criterion", f"use one of {', '.join(CRITERIA)}")
        if self.metric not in METRICS:
            raise bad("metric", "unknown retrieval metric", f"use one of {', '.join(METRICS)}")
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise bad("k", "the number of neighbours must be an integer >= 1", "set k=2 (the paper's default)")
        if not (0.0 < float(self.ratio) <= 1.0):
            raise bad("ratio", "the candidate ratio must lie in (0, 1]", "set ratio=0.5 (the paper's default)")
        if not (float(self.lasso) >= 0.0):
            raise bad("lasso", "the group-lasso strength must be >= 0", "set lasso=0.004 (the paper's default)")
        if self.masked_lasso is not None and self.masked_lasso < 0:
            raise bad("masked_lasso", "the lasso strength of masked rows must be >= 0",
                      "leave it None (the same as lasso, the authors') or give e.g. masked_lasso=0.1")
        if not (float(self.threshold) > 0.0):
            raise bad("threshold", "the merge threshold must be > 0", "set threshold=1e-5 (the paper's default)")
        if not isinstance(self.queue_size, int) or self.queue_size < 1:
            raise bad("queue_size", "the memory queue needs at least one slot", "set queue_size=24000 (the paper's default)")
        if not isinstance(self.mask_start, int) or self.mask_start < 0:
            raise bad("mask_start", "must be an iteration index >= 0", "set it to (warm-up epochs x iterations per epoch)")
        if not isinstance(self.mask_interval, int) or self.mask_interval < 1:
            raise bad("mask_interval", "must be >= 1", "set mask_interval=1 to refresh masks every iteration")
        if self.flops_target is not None and not (0.0 < float(self.flops_target) < 1.0):
            raise bad("flops_target", "must be the kept fraction of the dense student's FLOPs, in (0, 1)",
                      "set e.g. flops_target=0.35 for 65% fewer FLOPs, or None for no target")
        if self.criterion == "norm" and self.flops_target is None:
            raise bad("criterion", "ResRep's norm ranking masks channels until a FLOPs target is met, and none is set",
                      "set flops_target (e.g. 0.35), or use criterion='rggr'")
        if not isinstance(self.norm_step, int) or self.norm_step < 1:
            raise bad("norm_step", "must be >= 1", "set norm_step=8")
        if not isinstance(self.min_channels, int) or self.min_channels < 1:
            raise bad("min_channels", "every layer keeps at least one channel", "set min_channels=1")
        if self.round_to < 1:
            raise bad("round_to", "merged widths are rounded up to a multiple of it", "set round_to=1 (no rounding), 8 "
                      "or 16")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CDDConfig":
        """Build from a mapping (yaml, mmengine config); unknown keys are an error listing the valid ones."""
        return build_checked(cls, data, "CDD")
