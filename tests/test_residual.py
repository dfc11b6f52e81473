"""Residual-coupled compaction (``CDDConfig(residual=True)``): the channels that residual additions
tie together get one compactor per producer with ONE mask and one lasso over the stacked rows;
merge cuts them from every producer and consumer, exactly, and FLOPs stay predicted exactly."""
import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import cdd_plugin
from cdd_plugin import CDDConfig, RGGROptimizer
from cdd_plugin.distill import CDDDistiller, LossConfig, total_loss
from nets import check_exact, randomise_bn

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def zero_units(state, frac, seed=0):
    """Train-like compactors: perturbed rows, BN statistics, and ``frac`` of every unit's channels
    zeroed (the same rows in every member of a residual group, as the tied lasso leaves them)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for d in state.compactors.values():
            d.weight.add_(0.05 * torch.randn(d.weight.shape, generator=g))
        for unit, members in state.units.items():
            c = state.unit_channels(unit)
            rows = torch.randperm(c, generator=g)[: int(frac * c)].tolist()
            for n in members:
                state.compactors[n].zero_(rows)


def test_resnet50_stream_is_compacted_exactly_and_removes_over_90_percent():
    torch.manual_seed(0)
    dense = torchvision.models.resnet50()
    base = cdd_plugin.profile(copy.deepcopy(dense).eval(), X[:1])
    removed = {}
    for residual in (False, True):
        model = copy.deepcopy(dense)
        state = cdd_plugin.insert_dgc(model, X, CDDConfig(sites="all", residual=residual))
        randomise_bn(model)
        zero_units(state, 0.9)
        merged = check_exact(model, state, X, rel=1e-5)
        prof = cdd_plugin.profile(merged, X[:1])
        removed[residual] = (1 - prof["flops"] / base["flops"], 1 - prof["params"] / base["params"])
    groups = {u: len(m) for u, m in state.units.items() if state.tied(u)}
    # one group per stage: its blocks' last BN (and the projection shortcut's BN) are tied
    assert sorted(groups.values()) == [4, 4, 5, 7], state.report()
    assert state.tap_points()["residual:layer1.0.bn3"] == ("layer2.0.downsample.0", "input")
    assert state.tap_points()["residual:layer4.0.bn3"] == ("fc", "input")
    assert "residual:layer3.0.bn3: 7 tied compactors over 1024 channels" in state.report()
    # the stream, the shortcut projections and the classifier input are cut too
    kept = state.kept_channels()["residual:layer4.0.bn3"]
    assert kept == 2048 - int(0.9 * 2048)
    assert merged.fc.in_features == kept and merged.layer4[2].conv3.out_channels == kept
    assert_members_cut(merged, state)
    # with 90% of every compactor's rows zeroed: >= 90% of FLOPs and parameters gone (without: the
    # stream and the 2048-wide classifier input stay, ~87% of FLOPs and ~77% of parameters)
    assert removed[True][0] >= 0.90 and removed[True][1] >= 0.90, removed
    assert removed[False][1] < 0.80 and removed[True][0] > removed[False][0], removed


def test_fastreid_resnet50_backbone_merges_exactly_with_its_stages_compacted():
    from fastreid.config import get_cfg
    from fastreid.modeling.backbones import build_resnet_backbone

    cfg = get_cfg()
    cfg.MODEL.BACKBONE.DEPTH = "50x"
    cfg.MODEL.BACKBONE.PRETRAIN = False
    cfg.MODEL.BACKBONE.WITH_IBN = False
    torch.manual_seed(0)
    backbone = build_resnet_backbone(cfg)
    state = cdd_plugin.insert_dgc(backbone, X, CDDConfig(sites="paper", residual=True))
    groups = [u for u in state.units if state.tied(u)]
    # the last stage is the backbone's output (the embedding): it stays dense, and says why
    assert len(groups) == 3, state.report()
    assert any("layer4" in sk.layers[0] and "model output" in sk.reason for sk in state.skipped)
    assert len([u for u in state.units if not state.tied(u)]) == 16  # the authors' sites alongside
    randomise_bn(backbone)
    zero_units(state, 0.7)
    merged = check_exact(backbone, state, X, rel=1e-5)
    assert_members_cut(merged, state)


def assert_members_cut(merged, state):
    """Every member's producer of every residual group has the group's kept width after merge."""
    sites = {s.name: s for s in state.sites}
    for unit in [u for u in state.units if state.tied(u)]:
        for n in state.units[unit]:
            assert merged.get_submodule(sites[n].producer).out_channels == state.kept_channels()[unit], (unit, n)


# -- training with tied masks ------------------------------------------------------------------
def _resnet18(seed=0):
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=5)


def _batch(i):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 5, (4,), generator=g)


def _train(net, state, opt, steps, start=0):
    for i in range(start, start + steps):
        x, y = _batch(i)
        state.capture(True)
        logits = net(x)
        state.observe()
        state.capture(False)
        opt.zero_grad()
        F.cross_entropy(logits, y).backward()
        opt.step()


CFG = dict(sites="all", residual=True, criterion="rggr", ratio=0.9, k=1, queue_size=8, lasso=0.05)


def _tied_masks_agree(state):
    for unit, members in state.units.items():
        for n in members:
            assert torch.equal(state.compactors[n].mask, state.unit_mask(unit)), (unit, n)


def test_rggr_masks_a_group_in_every_member_and_resume_restores_tied_masks(tmp_path):
    cfg = CDDConfig(**CFG)
    net_a = _resnet18()
    st_a = cdd_plugin.insert_dgc(net_a, torch.randn(2, 3, 32, 32), cfg)
    # resnet18's first stream starts at the stem: the stem is a member of layer1's group
    assert "conv1" in [s.producer for s in st_a.sites if s.tie == "residual:bn1"]
    opt_a = RGGROptimizer(torch.optim.SGD(net_a.parameters(), lr=0.05, momentum=0.9), st_a)
    _train(net_a, st_a, opt_a, 8)
    _tied_masks_agree(st_a)
    masked = {u: int((st_a.unit_mask(u) == 0).sum()) for u in st_a.units if st_a.tied(u)}
    assert sum(masked.values()) > 0, "RGGR scored the groups from their outputs and masked some channels"

    net_b = _resnet18()
    st_b = cdd_plugin.insert_dgc(net_b, torch.randn(2, 3, 32, 32), cfg)
    opt_b = RGGROptimizer(torch.optim.SGD(net_b.parameters(), lr=0.05, momentum=0.9), st_b)
    _train(net_b, st_b, opt_b, 4)
    torch.save({"model": net_b.state_dict(), "optimizer": opt_b.state_dict()}, tmp_path / "ckpt.pth")
    ckpt = torch.load(tmp_path / "ckpt.pth", weights_only=True)
    net_c = _resnet18(seed=7)
    st_c = cdd_plugin.insert_dgc(net_c, torch.randn(2, 3, 32, 32), cfg)
    opt_c = RGGROptimizer(torch.optim.SGD(net_c.parameters(), lr=0.05, momentum=0.9), st_c)
    net_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["optimizer"])
    _tied_masks_agree(st_c)
    _train(net_c, st_c, opt_c, 4, start=4)
    for u in st_a.units:
        assert torch.equal(st_a.unit_mask(u), st_c.unit_mask(u)), u
    # a checkpoint whose members of one group disagree is refused before anything changes
    sd = st_a.state_dict()
    member = st_a.units["residual:layer2.0.bn2"][1]
    sd["masks"][member] = torch.zeros_like(sd["masks"][member])
    before = {n: m.clone() for n, m in st_c.masks().items()}
    with pytest.raises(ValueError, match="residual group residual:layer2.0.bn2 differ"):
        st_c.load_state_dict(sd)
    assert all(torch.equal(before[n], m) for n, m in st_c.masks().items())
    for (k, va), vc in zip(net_a.state_dict().items(), net_c.state_dict().values()):
        assert torch.allclose(va, vc, atol=1e-6), k


def test_tied_lasso_drives_masked_channels_to_zero_in_every_member_and_merge_cuts_them():
    cfg = CDDConfig(sites="all", residual=True, criterion="none", lasso=0.0, masked_lasso=1.0)
    net = _resnet18()
    state = cdd_plugin.insert_dgc(net, torch.randn(2, 3, 32, 32), cfg)
    unit = "residual:layer2.0.bn2"
    members = [state.compactors[n] for n in state.units[unit]]
    assert len(members) == 3  # layer2.0.bn2, its shortcut's BN, layer2.1.bn2
    for d in members:
        d.mask[:100] = 0.0
    before = state.unit_norms(unit)[:100].clone()
    opt = RGGROptimizer(torch.optim.SGD(net.parameters(), lr=0.1), state)
    for i in range(40):
        x, y = _batch(i)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    # one lasso over the stacked rows (weighted by sqrt(3)): each step shrinks every member's row by lr x lasso,
    # so masked rows reach zero in every member at the same step (the proximal snap zeroes them together)
    assert float(before.max()) / 3 ** 0.5 < 40 * 0.1 * 1.0
    for d in members:
        assert (d.weight.detach()[:100] == 0).all()
        assert (d.weight.detach()[100:].norm(dim=1) > 0).all()
    assert state.kept_channels()[unit] == 28
    net.eval()
    randomise_bn(net)
    merged = check_exact(net, state, torch.randn(2, 3, 32, 32), rel=1e-5)
    assert merged.layer2[1].conv2.out_channels == 28 and merged.layer3[0].conv1.in_channels == 28


def test_distiller_scores_groups_at_the_teacher_stage_output_and_merges_exactly():
    teacher = _resnet18(seed=1).eval()
    student = _resnet18(seed=2)
    state = cdd_plugin.insert_dgc(student, torch.randn(2, 3, 32, 32), CDDConfig(**CFG))
    both = lambda m, x, y: (lambda out: (out, out))(m(x))  # noqa: E731  (logits, embedding)
    distiller = CDDDistiller(student, teacher, state, LossConfig(triplet_weight=0.0), student_forward=both,
                             teacher_forward=both)
    # each group is read at the same point in the teacher (the input of the stage's next reader)
    assert distiller.pairs["residual:layer3.0.bn2"] == ("layer4.0.downsample.0", "input", "layer4.0.downsample.0")
    opt = RGGROptimizer(torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9), state)
    for i in range(6):
        x, y = _batch(i)
        losses = distiller(x, y)
        opt.zero_grad()
        total_loss(losses).backward()
        opt.step()
    _tied_masks_agree(state)
    assert any((state.unit_mask(u) == 0).any() for u in state.units if state.tied(u))
    assert state.planned_flops() < 0.5 * state.dense_flops()
    randomise_bn(student)
    zero_units(state, 0.5, seed=3)
    check_exact(student, state, torch.randn(2, 3, 32, 32), rel=1e-5)


# -- bad input ---------------------------------------------------------------------------------
class CatThenAdd(nn.Module):
    """``cat([a(x), b(x)]) + c(x)``: a and b own half of the tied channels each, c all of them."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
        self.b = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
        self.c = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.d = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        y = F.relu(torch.cat([self.a(x), self.b(x)], 1) + self.c(x))
        return self.fc(F.relu(self.d(y)).mean((2, 3)))


class PreActBlock(nn.Module):
    """A pre-activation residual stream: a BatchNorm reads the stream itself."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.inner = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.conv(F.relu(self.bn(x)))
        return self.fc(self.inner(x).mean((2, 3)))


def test_groups_that_cannot_be_tied_are_skipped_with_the_reason():
    x = torch.randn(2, 3, 16, 16)
    state = cdd_plugin.insert_dgc(CatThenAdd(), x, CDDConfig(sites="all", residual=True))
    assert not any(state.tied(u) for u in state.units)
    why = [sk.reason for sk in state.skipped if "residual group" in sk.reason]
    assert why and "disagree in width" in why[0] and "c.0 8 of 8" in why[0], why
    assert "d.1.cdd_dgc" in state.compactors  # the rest is compacted as before
    state = cdd_plugin.insert_dgc(PreActBlock(), x, CDDConfig(sites="all", residual=True))
    assert not any(state.tied(u) for u in state.units)
    assert any("BatchNorm2d bn sits on the stream" in sk.reason for sk in state.skipped), state.report()


def test_a_group_with_an_ignored_member_is_left_dense_and_the_model_unchanged_on_failure(monkeypatch):
    net = _resnet18()
    state = cdd_plugin.insert_dgc(net, torch.randn(2, 3, 32, 32), CDDConfig(sites="all", residual=True),
                                  ignored_layers=["layer3.1.conv2"])
    assert "residual:layer3.0.bn2" not in state.units
    assert any("ignored_layers" in sk.reason and "layer3.0.conv2" in sk.layers for sk in state.skipped)
    assert "residual:layer2.0.bn2" in state.units
    # a surgery that fails after the tied compactors are attached leaves nothing behind (fault injected)
    fresh = _resnet18()
    snap = copy.deepcopy(fresh.state_dict())

    def boom(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(cdd_plugin.flops.FlopsModel, "build", boom)
    with pytest.raises(cdd_plugin.SurgeryError, match="the model is unchanged"):
        cdd_plugin.insert_dgc(fresh, torch.randn(2, 3, 32, 32), CDDConfig(sites="all", residual=True))
    assert not cdd_plugin.surgery.find_dgcs(fresh)
    assert not any(h for m in fresh.modules() for h in (m._forward_hooks, m._forward_pre_hooks))
    assert fresh.state_dict().keys() == snap.keys()
    assert all(torch.equal(v, snap[k]) for k, v in fresh.state_dict().items())


# -- the embedding ------------------------------------------------------------------------------
class EmbeddingNet(nn.Module):
    """A retrieval network: ResNet-18 stages, the pooled last stage as the embedding, a classifier on it."""

    def __init__(self, act=None):
        super().__init__()
        torch.manual_seed(0)
        self.body = torchvision.models.resnet18(num_classes=5)
        self.act = act

    def forward(self, x):
        b = self.body
        x = b.layer4(b.layer3(b.layer2(b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(x))))))))
        emb = torch.flatten(b.avgpool(x), 1)
        if self.act is not None:
            emb = self.act(emb)
        return b.fc(emb), emb


def test_cut_embedding_drops_the_zero_channels_from_the_embedding_and_the_classifier():
    x = torch.randn(2, 3, 32, 32)
    state = cdd_plugin.insert_dgc(EmbeddingNet(), x, CDDConfig(sites="all", residual=True))
    assert len([u for u in state.units if state.tied(u)]) == 3
    assert any("cut_embedding=True" in sk.reason for sk in state.skipped), state.report()

    net = EmbeddingNet()
    state = cdd_plugin.insert_dgc(net, x, CDDConfig(sites="all", residual=True, cut_embedding=True))
    groups = [u for u in state.units if state.tied(u)]
    assert len(groups) == 4, state.report()
    last = "residual:body.layer4.0.bn2"
    assert state.tap_points()[last] == ("body.layer4.1", "output")  # the stage output, the teacher's too
    randomise_bn(net)
    zero_units(state, 0.5)
    net.eval()
    with torch.no_grad():
        logits, emb = net(x)
    merged = cdd_plugin.merge(net)
    with torch.no_grad():
        logits2, emb2 = merged(x)
    kept = state.kept_channels()[last]
    assert emb2.shape == (2, kept) and kept == 256 and merged.body.fc.in_features == kept
    assert torch.allclose(logits2, logits, atol=1e-5 * logits.abs().max().item(), rtol=1e-5)
    alive = state.unit_norms(last) > 0  # the embedding keeps the stream's live channels, in order
    assert (emb[:, ~alive] == 0).all()  # the others were exactly zero: distances do not change
    assert torch.allclose(emb2, emb[:, alive], atol=1e-5 * emb.abs().max().item(), rtol=1e-5)
    assert torch.allclose(torch.cdist(emb2, emb2), torch.cdist(emb, emb), atol=1e-4)
    assert cdd_plugin.profile(merged, x[:1])["flops"] == state.predicted_flops()


def test_cut_embedding_is_refused_where_a_zero_channel_would_not_stay_zero_in_the_output():
    with pytest.raises(cdd_plugin.ConfigError, match="residual=True"):
        CDDConfig(cut_embedding=True)
    x = torch.randn(2, 3, 32, 32)
    state = cdd_plugin.insert_dgc(EmbeddingNet(act=nn.Sigmoid()), x,
                                  CDDConfig(sites="all", residual=True, cut_embedding=True))
    assert "residual:body.layer4.0.bn2" not in state.units  # sigmoid(0) = 0.5: the probe removes the group
    why = [sk.reason for sk in state.skipped if "model output as a non-zero value" in sk.reason]
    assert why, state.report()
    assert len([u for u in state.units if state.tied(u)]) == 3
