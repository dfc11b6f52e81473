"""Configuration of the compression side of CDD (surgery, sparsity, mask criteria)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Optional

CRITERIA = ("rggr", "norm", "none")
METRICS = ("cosine", "l2")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the fix."""


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

    Defaults are the authors' (METHOD.md section 6). ``mask_start`` and
    ``mask_interval`` count optimizer steps (iterations), not epochs: adapters convert
    epochs with their iterations per epoch. ``snap_to_zero`` adds the proximal step of the
    group lasso after each optimizer step: a masked group that is within one step of zero
    is set exactly to zero (with its momentum), instead of oscillating around zero at about
    lr x lasso / (1 - momentum) until the learning rate decays. Set it to False for the
    authors' plain form.
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
    snap_to_zero: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "CDDConfig":
        def bad(key: str, why: str, fix: str) -> ConfigError:
            return ConfigError(f"CDDConfig.{key}={getattr(self, key)!r} is invalid: {why}. Fix: {fix}.")

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
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CDDConfig":
        """Build from a mapping (yaml, mmengine config); unknown keys are an error listing the valid ones."""
        return build_checked(cls, data, "CDD")
