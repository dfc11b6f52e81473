"""Property test: surgery + merge on randomly generated CNNs is either exact or a clear refusal."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import cdd_plugin
from cdd_plugin import CDDConfig, MergeError, SurgeryError

ACTS = [nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, nn.Sigmoid, nn.Identity]


class RandomNet(nn.Module):
    """Stages of conv/norm/activation with optional residual adds, concatenations,
    depthwise and grouped convs, built from a hypothesis-drawn recipe."""

    def __init__(self, recipe):
        super().__init__()
        self.recipe = recipe
        self.blocks = nn.ModuleList()
        c = 3
        for spec in recipe:
            groups = 1
            out = spec["width"]
            if spec["conv"] == "depthwise":
                out, groups = c, c
            elif spec["conv"] == "grouped" and c % 2 == 0 and out % 2 == 0:
                groups = 2
            layers = [nn.Conv2d(c, out, spec["kernel"], stride=spec["stride"], padding=spec["kernel"] // 2,
                                groups=groups, bias=spec["bias"])]
            if spec["norm"] == "bn":
                layers.append(nn.BatchNorm2d(out))
            elif spec["norm"] == "in":
                layers.append(nn.InstanceNorm2d(out, affine=True))
            elif spec["norm"] == "gn" and out % 2 == 0:
                layers.append(nn.GroupNorm(2, out))
            layers.append(ACTS[spec["act"]]())
            block = nn.Sequential(*layers)
            block.residual = spec["residual"] and spec["stride"] == 1 and out == c
            block.concat = spec["concat"] and spec["stride"] == 1 and not block.residual
            # GhostNet's pattern: the output concatenated with a cheap depthwise function of itself, sliced
            block.ghost = bool(spec["ghost"]) and groups == 1 and not block.residual and not block.concat
            if block.ghost:
                block.cheap = nn.Sequential(nn.Conv2d(out, out, 3, padding=1, groups=out, bias=False),
                                            nn.BatchNorm2d(out), nn.ReLU())
                block.keep = out + spec["ghost"] - 1   # keep 1..out channels of the cheap half
            self.blocks.append(block)
            c = out + c if block.concat else (block.keep if block.ghost else out)
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        for block in self.blocks:
            y = _run_block(block, x)
            if block.ghost:
                y = torch.cat([y, block.cheap(y)], 1)[:, :block.keep]
            elif block.residual:
                y = y + x
            elif block.concat:
                y = torch.cat([y, x], 1)
            x = y
        return self.head(x.mean((2, 3)))


def _run_block(block, x):
    for layer in block:  # the Sequential's own layers (the cheap branch is an attribute, not a child in order)
        if layer is getattr(block, "cheap", None):
            continue
        x = layer(x)
    return x


block = st.fixed_dictionaries({
    "width": st.sampled_from([4, 6, 8, 12]),
    "kernel": st.sampled_from([1, 3]),
    "stride": st.sampled_from([1, 1, 2]),
    "conv": st.sampled_from(["dense", "dense", "depthwise", "grouped"]),
    "bias": st.booleans(),
    "norm": st.sampled_from(["bn", "bn", "in", "gn", "none"]),
    "act": st.integers(0, len(ACTS) - 1),
    "residual": st.booleans(),
    "concat": st.booleans(),
    "ghost": st.sampled_from([0, 0, 1, 3]),   # 0: none; k: keep the first k - 1 cheap channels
})


# residual chains: mostly one width and stride 1, so additions tie several producers into one stream
residual_block = block.flatmap(lambda b: st.fixed_dictionaries({
    "width": st.sampled_from([8] * 5 + [12]), "stride": st.sampled_from([1] * 5 + [2]),
    "residual": st.sampled_from([True, True, False]), "concat": st.just(False), "ghost": st.just(0),
    "conv": st.sampled_from(["dense"] * 4 + ["depthwise", "grouped"]),
    "norm": st.sampled_from(["bn"] * 4 + ["none", "in", "gn"]),
    "act": st.sampled_from([0, 0, 0, 1, 2, 3, 4, 5]),   # ReLU mostly; Sigmoid (4) breaks a stream's zeros
}).map(lambda r: {**b, **r}))


@pytest.mark.parametrize("residual", [False, True])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), seed=st.integers(0, 10_000))
def test_random_cnn_merges_exactly_or_is_refused_clearly(residual, data, seed):
    recipe = data.draw(st.lists(residual_block if residual else block, min_size=1, max_size=6), label="recipe")
    torch.manual_seed(seed)
    model = RandomNet(recipe)
    x = torch.randn(2, 3, 12, 12)
    try:
        state = cdd_plugin.insert_dgc(model, x, CDDConfig(sites="all", residual=residual))
    except SurgeryError as exc:
        assert "Fix" in str(exc) or "cannot" in str(exc) or "no channel set" in str(exc)
        return
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d, nn.GroupNorm)):
                if getattr(m, "running_mean", None) is not None:
                    m.running_mean.normal_(0, 0.5, generator=g)
                    m.running_var.uniform_(0.5, 2.0, generator=g)
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5, generator=g)
                    m.bias.normal_(0, 0.5, generator=g)
        for d in state.compactors.values():
            d.weight.add_(0.1 * torch.randn(d.weight.shape, generator=g))
        for unit, members in state.units.items():  # the same rows in every member of a residual group
            c = state.unit_channels(unit)
            rows = torch.randperm(c, generator=g)[: c // 2].tolist()
            for n in members:
                state.compactors[n].zero_(rows)
    model.eval()
    with torch.no_grad():
        y = model(x)
    try:
        merged = cdd_plugin.merge(model)
    except MergeError as exc:  # exact or refused, never wrong: the refusal names the site
        assert "refuses" in str(exc) or "failed at" in str(exc), exc
        return
    with torch.no_grad():
        y2 = merged(x)
    assert y.shape == y2.shape
    assert (y - y2).abs().max().item() <= 1e-4 * max(1.0, y.abs().max().item())
    assert cdd_plugin.profile(merged, x[:1])["flops"] == state.predicted_flops()
