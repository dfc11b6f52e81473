"""Grouped convolutions (ResNeXt, RegNet): channel sets through them are compacted with the same
number of channels kept in every group, merge stays exact and FLOPs stay predicted exactly."""
import copy

import pytest
import torch
import torchvision
from torch import nn

import cdd_plugin
from cdd_plugin import CDDConfig
from cdd_plugin.dgc import DGC, site_kept
from nets import check_exact, randomise

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _grouped_convs(model):
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels}


def _zero_within_groups(state, frac, seed=0):
    g = torch.Generator().manual_seed(seed)
    for s in state.sites:
        if s.groups > 1:
            d, size = state.compactors[s.name], s.channels // s.groups
            with torch.no_grad():
                d.weight.add_(0.05 * torch.randn(d.weight.shape, generator=g))  # rows back, then cut per group
            d.zero_([j * size + int(c) for j in range(s.groups)
                     for c in torch.randperm(size, generator=g)[:max(1, int(frac * size))]])


@pytest.mark.parametrize("arch,grouped,blocks", [("resnext50_32x4d", 32, 16), ("regnet_y_400mf", 16, 0)])
def test_grouped_sets_are_compacted_and_merge_exactly_with_balanced_groups(arch, grouped, blocks, tmp_path):
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10)
    state = cdd_plugin.insert_dgc(model, X, CDDConfig(sites="all"))
    mine = [s for s in state.sites if s.groups > 1]
    # every bottleneck's set into the grouped 3x3 (and ResNeXt's set out of it) is a site now
    assert len(mine) == grouped, state.report()
    assert sum(s.blocks > 1 for s in state.sites) == blocks
    assert all(state.compactors[s.name].blocks == s.blocks for s in state.sites)
    assert "groups" in state.report()
    dense = cdd_plugin.profile(copy.deepcopy(model), X[:1])["flops"]
    randomise(model, state, frac=0.6)
    _zero_within_groups(state, frac=0.5)  # the same count in every group, at different offsets
    merged = check_exact(model, state, X)  # exact, and predicted FLOPs == the merged model's count
    before, after = _grouped_convs(model), _grouped_convs(merged)
    assert before.keys() == after.keys()
    cut = 0
    for name, conv in after.items():
        assert conv.groups == before[name].groups
        assert conv.in_channels % conv.groups == 0 and conv.out_channels % conv.groups == 0
        cut += conv.in_channels < before[name].in_channels
    assert cut == len(after), "every grouped conv lost input channels"
    assert cdd_plugin.profile(merged, X[:1])["flops"] < 0.75 * dense
    # the narrow grouped network survives a save / load round trip
    cdd_plugin.save_merged(merged, tmp_path / "m.pth")
    fresh = getattr(torchvision.models, arch)(num_classes=10)
    cdd_plugin.load_merged(str(tmp_path / "m.pth"), fresh)
    with torch.no_grad():
        assert torch.allclose(fresh(X), merged(X), atol=1e-6)


class TinyResNeXt(nn.Module):
    """One ResNeXt bottleneck (grouped 3x3 between two 1x1) and a head."""

    def __init__(self, width=16, groups=4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.conv1, self.bn1 = nn.Conv2d(32, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, 32, 1, bias=False), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = self.stem(x)
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        x = torch.relu(self.bn3(self.conv3(y)) + x)
        return self.fc(x.mean((2, 3)))


def test_block_diagonal_compactor_keeps_the_groups_apart_through_training():
    torch.manual_seed(0)
    model = TinyResNeXt()
    state = cdd_plugin.insert_dgc(model, X, CDDConfig(sites="all", lasso=0.05, mask_start=0))
    d = model.bn2.cdd_dgc
    assert d.blocks == 4 and model.bn1.cdd_dgc.blocks == 1  # only the grouped producer's set is block-diagonal
    off = 1 - torch.block_diag(*[torch.ones(4, 4)] * 4)
    opt = cdd_plugin.RGGROptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4),
                                   state)
    model.train()
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randn(8, 3, 32, 32, generator=g)
        loss = model(x).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (d.weight.detach() * off).abs().max().item() == 0.0
    assert (d.weight.detach() * (1 - off)).abs().sum() > 0
    randomise(model, state, frac=0.5)
    check_exact(model, state, X)


def test_the_mask_budget_counts_the_widest_group():
    """Merge keeps, in every group, as many channels as the widest group needs: masking a whole group's
    worth of channels in ONE group saves nothing, the same number spread over the groups does."""
    model = TinyResNeXt()
    state = cdd_plugin.insert_dgc(model, X, CDDConfig(sites="all"))
    d = model.bn1.cdd_dgc  # the set into the grouped conv (4 groups of 4)
    dense = state.planned_flops()
    d.mask[:3] = 0  # three channels of group 0
    assert state.planned_flops() == dense
    d.mask[:] = 1
    d.mask[torch.tensor([0, 4, 8, 12])] = 0  # one channel of every group
    assert state.planned_flops() < dense
    # kept counts: widest group, a multiple of round_to, and at least min_channels in all
    alive = torch.tensor([1, 1, 0, 0, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0], dtype=torch.bool)
    assert site_kept(alive, 4) == 12
    assert site_kept(alive, 4, round_to=8) == 16
    assert site_kept(torch.zeros(16, dtype=torch.bool), 4, min_channels=6) == 8
    with torch.no_grad():
        d.weight[torch.tensor([0, 1, 2])] = 0  # group 0 down to one live row
    assert state.kept_channels()[d.site["name"]] == 16  # the other groups still need all four


class TwoGroupings(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12)
        self.a = nn.Conv2d(12, 12, 3, padding=1, groups=2, bias=False)
        self.b = nn.Conv2d(12, 12, 3, padding=1, groups=3, bias=False)
        self.fc = nn.Linear(24, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.cat([self.a(x), self.b(x)], 1).mean((2, 3)))


def test_a_set_split_two_ways_is_skipped_with_the_reason():
    model = TwoGroupings()
    x = torch.randn(2, 3, 16, 16)
    state = cdd_plugin.insert_dgc(model, x, CDDConfig(sites="all"))
    assert all(s.producer != "conv1" for s in state.sites)
    why = next(s.reason for s in state.skipped if "conv1" in s.layers)
    assert "2 and 3 groups" in why and "balanced" in why


def test_dgc_refuses_blocks_that_do_not_divide_its_channels():
    with pytest.raises(ValueError, match="divisible"):
        DGC(10, "out", blocks=4)
    with pytest.raises(ValueError, match="kind 'out'"):
        DGC(8, "diag", blocks=2)
