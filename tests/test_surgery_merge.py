"""Surgery + merge on real architectures: identity at insertion, exact merge, exact FLOPs prediction."""
import copy

import pytest
import torch
import torchvision
from torch import nn

import cdd_plugin
from nets import check_exact as _check_exact, randomise as _randomise
from cdd_plugin import CDDConfig, MergeError, SurgeryError

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
X_SMALL = X[:, :, :32, :32].contiguous()


ARCHS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnext50_32x4d", "mobilenet_v2", "mobilenet_v3_small",
         "regnet_x_400mf", "efficientnet_b0", "densenet121"]


@pytest.mark.parametrize("arch", ARCHS)
def test_torchvision_architectures_merge_exactly(arch):
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10)
    x = X_SMALL if arch in ("resnet101", "densenet121", "resnext50_32x4d") else X
    model.eval()
    with torch.no_grad():
        before = model(x)
    state = cdd_plugin.insert_dgc(model, x, CDDConfig(sites="all"))
    assert state.sites, state.report()
    with torch.no_grad():
        after = model(x)
    # identity initialisation: inserting DGCs changes nothing
    assert torch.allclose(before, after, atol=1e-5, rtol=1e-4)
    dense_flops = cdd_plugin.profile(model, x)["flops"]
    _randomise(model, state)
    merged = _check_exact(model, state, x)
    assert cdd_plugin.profile(merged, x)["flops"] < dense_flops


def test_profile_counts_the_compactors_of_an_unmerged_student_and_can_leave_them_out():
    model = torchvision.models.resnet18(num_classes=10)
    dense = cdd_plugin.profile(model, X[:1])
    state = cdd_plugin.insert_dgc(model, X[:2], CDDConfig(sites="all"))
    sizes = {}
    hooks = [d.register_forward_hook(lambda m, i, o, n=n: sizes.__setitem__(n, i[0].shape[2] * i[0].shape[3]))
             for n, d in state.compactors.items()]
    with torch.no_grad():
        model.eval()(X[:1])
    for h in hooks:
        h.remove()
    expected = sum(d.channels ** 2 * sizes[n] for n, d in state.compactors.items())  # 1x1 convs, per image
    training = cdd_plugin.profile(model, X[:1])
    assert training["flops"] - dense["flops"] == expected > 0
    assert training["params"] - dense["params"] == sum(d.channels ** 2 for d in state.compactors.values())
    assert cdd_plugin.profile(model, X[:1], count_dgc=False) == dense  # the heavy student's own figures


@pytest.mark.parametrize("arch,blocks", [("resnet18", 8), ("resnet50", 16), ("resnet101", 33)])
def test_paper_placement_is_one_compactor_per_residual_block_feeding_its_last_conv(arch, blocks):
    model = getattr(torchvision.models, arch)(num_classes=10)
    x = X_SMALL if arch == "resnet101" else X
    state = cdd_plugin.insert_dgc(model, x, CDDConfig())  # sites="paper" is the default
    assert len(state.sites) == blocks
    last_inner = "bn2" if arch == "resnet50" or arch == "resnet101" else "bn1"
    assert sorted(s.host.rsplit(".", 1)[-1] for s in state.sites) == [last_inner] * blocks
    assert all(s.consumers == [s.host.rsplit(".", 1)[0] + (".conv3" if last_inner == "bn2" else ".conv2")]
               for s in state.sites)
    assert "bn1.cdd_dgc" not in state.compactors  # no compactor at the stem
    if last_inner == "bn2":  # bottlenecks: the first inner sets are left out, with the reason
        assert "sites='paper'" in state.report()
    _randomise(model, state)
    _check_exact(model, state, x)


def test_paper_placement_refuses_a_network_without_residual_blocks():
    model = torchvision.models.vgg11_bn(num_classes=10)
    with pytest.raises(SurgeryError, match="sites='all'"):
        cdd_plugin.insert_dgc(model, X, CDDConfig())
    assert not any(isinstance(m, cdd_plugin.DGC) for m in model.modules())


def test_report_names_every_site_and_the_reason_for_skips():
    model = torchvision.models.resnet50()
    state = cdd_plugin.insert_dgc(model, X, CDDConfig(sites="all"))
    text = state.report()
    assert "layer1.0.bn1.cdd_dgc" in text and "layer1.0.bn2.cdd_dgc" in text
    assert "residual addition" in text
    # a bottleneck has two compactable sets (after conv1 and conv2), 16 blocks; the stem's 64
    # channels feed layer1.0's conv1 and downsample only (no residual addition): a 33rd set
    assert len(state.sites) == 33
    assert "bn1.cdd_dgc" in state.compactors
    assert all(s.kind == "out" for s in state.sites)


def test_depthwise_chains_get_diagonal_compactors():
    model = torchvision.models.mobilenet_v2()
    state = cdd_plugin.insert_dgc(model, X, CDDConfig(sites="all"))
    kinds = {s.kind for s in state.sites}
    assert "diag" in kinds
    diag = [s for s in state.sites if s.kind == "diag"][0]
    assert diag.depthwise is not None and state.compactors[diag.name].weight.dim() == 1


class _InstanceNormNet(nn.Module):
    """Producer norm that cannot be folded: compaction must move to the consumer's input."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.norm1 = nn.InstanceNorm2d(16, affine=True)
        self.conv2 = nn.Conv2d(16, 24, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(24)
        self.conv3 = nn.Conv2d(24, 8, 1)

    def forward(self, x):
        x = torch.relu(self.norm1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.conv3(x).mean((2, 3))


def test_non_foldable_norm_gets_input_side_compactor_and_merges_exactly():
    torch.manual_seed(0)
    model = _InstanceNormNet()
    state = cdd_plugin.insert_dgc(model, X, CDDConfig(sites="all"))
    kinds = {s.name: s.kind for s in state.sites}
    assert kinds["conv2.cdd_dgc"] == "in"
    assert kinds["bn2.cdd_dgc"] == "out"
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.InstanceNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)
    _randomise(model, state)
    merged = _check_exact(model, state, X)
    assert merged.conv1.out_channels == 8 and merged.conv2.in_channels == 8


class _SigmoidGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv2(torch.sigmoid(self.bn1(self.conv1(x)))).mean((2, 3))


def test_surgery_refuses_a_site_whose_zero_channels_would_not_stay_zero():
    with pytest.raises(SurgeryError, match="non-zero"):
        cdd_plugin.insert_dgc(_SigmoidGate(), X, CDDConfig(sites="all"))


def test_mmpretrain_and_fastreid_resnet_backbones_merge_exactly():
    from mmpretrain.models.backbones import ResNet, ResNetV1d

    for backbone in (ResNet(depth=18), ResNetV1d(depth=50)):
        backbone.init_weights()
        state = cdd_plugin.insert_dgc(backbone, X, CDDConfig(sites="all"))
        assert len(state.sites) >= 8
        _randomise(backbone, state)
        backbone.eval()
        with torch.no_grad():
            y = backbone(X)[-1]
        merged = cdd_plugin.merge(backbone)
        with torch.no_grad():
            y2 = merged(X)[-1]
        assert (y - y2).abs().max() <= 1e-4 * y.abs().max()
        assert cdd_plugin.profile(merged, X[:1])["flops"] == state.predicted_flops()

    from fastreid.config import get_cfg
    from fastreid.modeling.backbones import build_resnet_backbone

    cfg = get_cfg()
    cfg.MODEL.BACKBONE.DEPTH = "50x"
    cfg.MODEL.BACKBONE.PRETRAIN = False
    cfg.MODEL.BACKBONE.WITH_IBN = False
    backbone = build_resnet_backbone(cfg)
    state = cdd_plugin.insert_dgc(backbone, X, CDDConfig(sites="all"))
    assert len(state.sites) == 33
    _randomise(backbone, state)
    _check_exact(backbone, state, X)


def test_merge_leaves_the_trained_model_untouched_and_refuses_twice():
    model = torchvision.models.resnet18()
    state = cdd_plugin.insert_dgc(model, X, CDDConfig(sites="all"))
    _randomise(model, state)
    snapshot = copy.deepcopy(model.state_dict())
    merged = cdd_plugin.merge(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k]), k
    assert len(cdd_plugin.surgery.find_dgcs(model)) == len(state.sites)
    with pytest.raises(MergeError, match="already merged"):
        cdd_plugin.merge(merged)
    with pytest.raises(MergeError, match="no DGCs"):
        cdd_plugin.merge(torchvision.models.resnet18())


def test_merge_inplace_replaces_the_model():
    model = torchvision.models.resnet18()
    state = cdd_plugin.insert_dgc(model, X, CDDConfig(sites="all"))
    _randomise(model, state)
    out = cdd_plugin.merge(model, inplace=True)
    assert out is model
    assert not cdd_plugin.surgery.find_dgcs(model)


def test_merged_model_traces_and_exports_to_onnx(tmp_path):
    model = torchvision.models.resnet18()
    state = cdd_plugin.insert_dgc(model, X, CDDConfig(sites="all"))
    _randomise(model, state)
    merged = cdd_plugin.merge(model)
    traced = torch.jit.trace(merged, X)
    with torch.no_grad():
        assert torch.allclose(traced(X), merged(X), atol=1e-5)
    path = tmp_path / "merged.onnx"
    torch.onnx.export(merged, (X,), str(path), input_names=["images"], output_names=["out"], dynamo=False)
    import onnx

    onnx.checker.check_model(onnx.load(str(path)))


def test_save_and_load_merged_rebuilds_the_narrow_network_safely(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    state = cdd_plugin.insert_dgc(model, X, CDDConfig(sites="all"))
    _randomise(model, state)
    merged = cdd_plugin.merge(model)
    path = tmp_path / "model_merged.pth"
    cdd_plugin.save_merged(merged, path, meta={"arch": "resnet50"})
    raw = torch.load(path, weights_only=True)  # data only: no pickled modules
    assert raw["format"] == "cdd_plugin.merged"
    rebuilt = cdd_plugin.load_merged(str(path), torchvision.models.resnet50())
    with torch.no_grad():
        assert torch.allclose(rebuilt(X), merged(X), atol=1e-5)
    assert cdd_plugin.profile(rebuilt, X)["flops"] == cdd_plugin.profile(merged, X)["flops"]
    with pytest.raises(ValueError, match="different architecture"):
        cdd_plugin.load_merged(str(path), torchvision.models.vgg11())
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated"):
        cdd_plugin.load_merged(str(bad), torchvision.models.resnet50())
    other = tmp_path / "plain.pth"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(ValueError, match="not a cdd_plugin merged model"):
        cdd_plugin.load_merged(str(other), torchvision.models.resnet50())


def test_bad_inputs_name_the_fix():
    with pytest.raises(SurgeryError, match="do not fit the model"):
        cdd_plugin.insert_dgc(torchvision.models.resnet18(), torch.randn(2, 1, 64, 64))

    class OnlyLSTM(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(8, 8, batch_first=True)

        def forward(self, x):
            return self.rnn(x)[0]

    with pytest.raises(SurgeryError, match="could not trace"):
        cdd_plugin.insert_dgc(torchvision.models.shufflenet_v2_x0_5(), X)
    with pytest.raises(SurgeryError, match="no prunable layer"):
        cdd_plugin.insert_dgc(OnlyLSTM(), torch.randn(2, 5, 8))
    model = torchvision.models.resnet18()
    cdd_plugin.insert_dgc(model, X, CDDConfig(sites="all"))
    with pytest.raises(SurgeryError, match="already has DGCs"):
        cdd_plugin.insert_dgc(model, X, CDDConfig(sites="all"))


def test_channel_table_and_plot(tmp_path):
    model = torchvision.models.resnet18()
    state = cdd_plugin.insert_dgc(model, X, CDDConfig(sites="all"))
    _randomise(model, state)
    merged = cdd_plugin.merge(model)
    rows = cdd_plugin.channel_table(torchvision.models.resnet18(), merged)
    changed = [r for r in rows if r["after"] < r["before"]]
    assert len(changed) == len(state.sites)
    png = cdd_plugin.plot_channels(rows, str(tmp_path / "channels.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_forward_that_fails_with_compactors_is_traced_refused_and_leaves_nothing_behind(monkeypatch):
    """If the model's forward fails once compactors are attached (a layout a compactor cannot follow;
    simulated here by a compactor that raises on 7-channel sets), surgery traces the failure to its
    sites, removes them, keeps the rest; when every site fails it refuses and leaves the model as it
    was, and a retry gets the same refusal, not "already has DGCs"."""
    real = cdd_plugin.DGC.forward

    def picky(self, x):
        if self.channels == 7:
            raise RuntimeError(f"expected input[1, 32, 32, {self.channels}] to have 7 channels")
        return real(self, x)

    monkeypatch.setattr(cdd_plugin.DGC, "forward", picky)
    torch.manual_seed(0)
    mixed = nn.Sequential(nn.Conv2d(3, 7, 3), nn.BatchNorm2d(7), nn.ReLU(), nn.Conv2d(7, 8, 3), nn.BatchNorm2d(8),
                          nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten(2), nn.Flatten(1))
    state = cdd_plugin.insert_dgc(mixed, X_SMALL, CDDConfig(sites="all"))
    assert [s.producer for s in state.sites] == ["3"]
    assert "forward fails with a compactor" in state.report()
    model = nn.Sequential(nn.Conv2d(3, 7, 3), nn.BatchNorm2d(7), nn.ReLU(), nn.Conv2d(7, 4, 1), nn.Flatten(2),
                          nn.Flatten(1))
    model.eval()
    with torch.no_grad():
        before = model(X_SMALL)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    for _ in range(2):
        with pytest.raises(SurgeryError, match="forward fails with a compactor"):
            cdd_plugin.insert_dgc(model, X_SMALL, CDDConfig(sites="all"))
    assert not cdd_plugin.graph.find_dgcs(model)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    assert not [k for k in vars(model) if k.startswith("_cdd")]
    with torch.no_grad():
        assert torch.equal(model(X_SMALL), before)


def test_ghostnet_slices_are_exact_or_refused_never_wrong():
    """A GhostNet block concatenates a tensor with a cheap depthwise function of itself and slices
    the result: the depthwise set cannot be cut one to one, so surgery must drop it (the probe
    zeroes a channel that carries values and checks every consumer input it would be cut from)."""

    class Ghost(nn.Module):
        def __init__(self, oup):
            super().__init__()
            init = (oup + 1) // 2
            self.oup = oup
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
            self.primary = nn.Sequential(nn.Conv2d(8, init, 1, bias=False), nn.BatchNorm2d(init), nn.ReLU())
            self.cheap = nn.Sequential(nn.Conv2d(init, init, 3, padding=1, groups=init, bias=False),
                                       nn.BatchNorm2d(init), nn.ReLU())
            self.head = nn.Conv2d(oup, 4, 1)

        def forward(self, x):
            a = self.primary(self.stem(x))
            return self.head(torch.cat([a, self.cheap(a)], 1)[:, :self.oup]).mean((2, 3))

    for oup in (16, 15):
        for seed in range(8):
            torch.manual_seed(seed)
            model, x = Ghost(oup), torch.randn(2, 3, 16, 16)
            state = cdd_plugin.insert_dgc(model, x, CDDConfig(sites="all"))
            assert not any(s.name.startswith("cheap") for s in state.sites), (oup, seed, state.report())
            for d in state.compactors.values():
                d.zero_([0, 1])
            model.eval()
            merged = cdd_plugin.merge(model)
            with torch.no_grad():
                y, y2 = model(x), merged(x)
            assert (y - y2).abs().max() <= 1e-5 * y.abs().max()


def test_merge_checks_the_merged_network_and_refuses_naming_the_site(monkeypatch):
    """Even if a compactor that cannot be cut one to one got past surgery (the probe is switched off
    here), merge compares the merged network with the trained one in float64 and refuses."""
    import cdd_plugin.surgery as surgery

    class Dup(nn.Module):  # conv1's channels reach conv2 twice: directly and through a depthwise copy
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(6)
            self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False)
            self.bn2 = nn.BatchNorm2d(6)
            self.conv2 = nn.Conv2d(12, 4, 1)

        def forward(self, x):
            a = torch.relu(self.bn1(self.conv1(x)))
            return self.conv2(torch.cat([a, torch.relu(self.bn2(self.dw(a)))], 1)).mean((2, 3))

    monkeypatch.setattr(surgery, "_probe", lambda *a, **k: {})
    torch.manual_seed(0)
    model, x = Dup(), torch.randn(2, 3, 8, 8)
    state = cdd_plugin.insert_dgc(model, x, CDDConfig(sites="all"))
    diag = [s.name for s in state.sites if s.kind == "diag"]
    assert diag, state.report()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.uniform_(0.5, 1.0)
    state.compactors[diag[0]].zero_([0, 1])
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MergeError, match=diag[0].replace(".", r"\.")):
        cdd_plugin.merge(model)
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("round_to", [8, 16])
def test_round_to_keeps_widths_hardware_likes_and_stays_exact(round_to):
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10)
    state = cdd_plugin.insert_dgc(model, X_SMALL, CDDConfig(sites="all", round_to=round_to))
    _randomise(model, state, frac=0.6)
    kept = state.kept_channels()
    assert all(k % round_to == 0 or k == state.compactors[n].channels for n, k in kept.items())
    merged = _check_exact(model, state, X_SMALL)  # exact, and predicted FLOPs == the merged count
    widths = {s.producer: merged.get_submodule(s.producer).out_channels for s in state.sites}
    assert all(w % round_to == 0 for w in widths.values()), widths
    plain = copy.deepcopy(model)
    for d in cdd_plugin.graph.find_dgcs(plain).values():
        d.round_to = 1
    assert cdd_plugin.profile(cdd_plugin.merge(plain), X_SMALL[:1])["flops"] <= state.predicted_flops()


def test_an_output_that_is_also_read_further_is_left_whole_and_the_model_merges():
    """``return fc(emb), emb``: torch-pruning marks no output node for ``emb`` (its node exists already
    as the classifier's input); surgery finds it and leaves its channels whole, so merge returns the same
    two outputs instead of refusing the model at the end of training."""
    from nets import SmallNet, randomise

    torch.manual_seed(0)
    model = SmallNet()
    x = torch.randn(2, 3, 16, 16)
    state = cdd_plugin.insert_dgc(model, x, CDDConfig(sites="all"))
    assert "bn3.cdd_dgc" not in state.compactors
    assert any(sk.layers == ["conv3"] and "model output" in sk.reason for sk in state.skipped), state.report()
    randomise(model, state)
    model.eval()
    with torch.no_grad():
        logits, emb = model(x)
        merged = cdd_plugin.merge(model)
        logits2, emb2 = merged(x)
    assert emb2.shape == emb.shape and torch.allclose(emb2, emb, atol=1e-5, rtol=1e-4)
    assert torch.allclose(logits2, logits, atol=1e-5, rtol=1e-4)
    assert merged.conv2.out_channels < 32
