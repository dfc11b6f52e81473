"""Surgery + merge on real architectures: identity at insertion, exact merge, exact FLOPs prediction."""
import copy

import pytest
import torch
import torchvision
from torch import nn

import cdd_plugin
from cdd_plugin import CDDConfig, MergeError, SurgeryError

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
X_SMALL = X[:, :, :32, :32].contiguous()


def _randomise(model: nn.Module, state, frac=0.5, seed=0):
    """Train-like perturbation: non-identity DGCs, real BN statistics, half the channels zeroed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for d in state.compactors.values():
            d.weight.add_(0.05 * torch.randn(d.weight.shape, generator=g))
            n = int(frac * d.channels)
            d.zero_(torch.randperm(d.channels, generator=g)[:n].tolist())
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)


def _check_exact(model, state, x=X):
    model.eval()
    with torch.no_grad():
        y = model(x)
    merged = cdd_plugin.merge(model)
    with torch.no_grad():
        y2 = merged(x)
    assert y.shape == y2.shape
    err = (y - y2).abs().max().item()
    assert err <= 1e-4 * y.abs().max().item(), f"merge changed the output by {err}"
    assert not any(isinstance(m, cdd_plugin.DGC) for m in merged.modules())
    flops = cdd_plugin.profile(merged, x[:1])["flops"]  # FLOPs per image, counted at batch 1
    assert flops == state.predicted_flops()
    return merged


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
    state = cdd_plugin.insert_dgc(model, x, CDDConfig())
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
    state = cdd_plugin.insert_dgc(model, X[:2], CDDConfig())
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


def test_report_names_every_site_and_the_reason_for_skips():
    model = torchvision.models.resnet50()
    state = cdd_plugin.insert_dgc(model, X)
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
    state = cdd_plugin.insert_dgc(model, X)
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
    state = cdd_plugin.insert_dgc(model, X)
    kinds = {s.name: s.kind for s in state.sites}
    assert kinds["conv2.cdd_dgc"] == "in"
    assert kinds["bn2.cdd_dgc"] == "out"
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.InstanceNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)
    _randomise(model, state)
    merged = _check_exact(model, state)
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
        cdd_plugin.insert_dgc(_SigmoidGate(), X)


def test_mmpretrain_and_fastreid_resnet_backbones_merge_exactly():
    from mmpretrain.models.backbones import ResNet, ResNetV1d

    for backbone in (ResNet(depth=18), ResNetV1d(depth=50)):
        backbone.init_weights()
        state = cdd_plugin.insert_dgc(backbone, X)
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
    state = cdd_plugin.insert_dgc(backbone, X)
    assert len(state.sites) == 33
    _randomise(backbone, state)
    _check_exact(backbone, state)


def test_merge_leaves_the_trained_model_untouched_and_refuses_twice():
    model = torchvision.models.resnet18()
    state = cdd_plugin.insert_dgc(model, X)
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
    state = cdd_plugin.insert_dgc(model, X)
    _randomise(model, state)
    out = cdd_plugin.merge(model, inplace=True)
    assert out is model
    assert not cdd_plugin.surgery.find_dgcs(model)


def test_merged_model_traces_and_exports_to_onnx(tmp_path):
    model = torchvision.models.resnet18()
    state = cdd_plugin.insert_dgc(model, X)
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
    state = cdd_plugin.insert_dgc(model, X)
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
    cdd_plugin.insert_dgc(model, X)
    with pytest.raises(SurgeryError, match="already has DGCs"):
        cdd_plugin.insert_dgc(model, X)


def test_channel_table_and_plot(tmp_path):
    model = torchvision.models.resnet18()
    state = cdd_plugin.insert_dgc(model, X)
    _randomise(model, state)
    merged = cdd_plugin.merge(model)
    rows = cdd_plugin.channel_table(torchvision.models.resnet18(), merged)
    changed = [r for r in rows if r["after"] < r["before"]]
    assert len(changed) == len(state.sites)
    png = cdd_plugin.plot_channels(rows, str(tmp_path / "channels.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
