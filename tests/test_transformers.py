"""Transformer MLPs (Linear -> GELU -> Linear on channels-last tokens): compactors over the hidden
dimension, exact merge, exact FLOPs, export, and RGGR training on token features."""
import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.vision_transformer import VisionTransformer

import cdd_plugin
from cdd_plugin import CDDConfig, SurgeryError
from nets import check_exact, randomise

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _small_vit(layers=2):
    return VisionTransformer(image_size=32, patch_size=8, num_layers=layers, num_heads=2, hidden_dim=16, mlp_dim=32,
                             num_classes=4)


def _trained_like(model):
    """torchvision zero-initialises ViT heads and ConvNeXt scales its blocks by 1e-6: give the
    blocks weight in the output, so a wrong merge shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("heads") and p.dim() == 2:
                nn.init.normal_(p, std=0.2, generator=torch.Generator().manual_seed(3))
            if "layer_scale" in name:
                p.fill_(1.0)
    return model


@pytest.mark.parametrize("name", ["vit_small", "vit_b_16", "convnext"])
def test_mlp_hidden_channels_are_compacted_and_merge_exactly(name):
    torch.manual_seed(0)
    if name == "vit_small":
        model, blocks = _small_vit(), 2
    elif name == "vit_b_16":  # ViT-B/16's real blocks (768 wide, MLP 3072), on a 32x32 input
        model, blocks = torchvision.models.vit_b_16(image_size=32, num_classes=4), 12
    else:
        model, blocks = ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=4), 2
    _trained_like(model).eval()
    with torch.no_grad():
        before = model(X)
    state = cdd_plugin.insert_dgc(model, X, CDDConfig(sites="all"))
    assert len(state.sites) == blocks and all(s.channels_last for s in state.sites), state.report()
    with torch.no_grad():
        assert torch.allclose(model(X), before, atol=1e-5)  # identity at insertion
    randomise(model, state, frac=0.5)
    merged = check_exact(model, state, X)  # exact, and predicted FLOPs == the merged model's count
    hidden = [m for n, m in merged.named_modules() if isinstance(m, nn.Linear) and n.endswith(("mlp.0", "block.3"))]
    assert len(hidden) == blocks and all(m.out_features < 4 * m.in_features for m in hidden)


def test_merged_vit_traces_and_exports_to_onnx(tmp_path):
    torch.manual_seed(0)
    model = _trained_like(_small_vit())
    state = cdd_plugin.insert_dgc(model, X, CDDConfig(sites="all"))
    randomise(model, state, frac=0.5)
    merged = cdd_plugin.merge(model)
    with torch.no_grad():
        want = merged(X)
        assert torch.allclose(torch.jit.trace(merged, X)(X), want, atol=1e-5)
    path = tmp_path / "vit.onnx"
    torch.onnx.export(merged, (X,), str(path), input_names=["images"], output_names=["logits"], dynamo=False)
    import onnx

    onnx.checker.check_model(onnx.load(str(path)))


def test_attention_is_left_dense_and_the_report_says_why():
    model = _small_vit()
    state = cdd_plugin.insert_dgc(model, X, CDDConfig(sites="all"))
    assert "MultiheadAttention" in state.report()


class QKVAttention(nn.Module):
    """timm-style attention (as in FastReID's and MMPretrain's ViTs): one qkv Linear whose channels
    end in the query-key product."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 32), nn.Linear(32, dim)
        self.embed = nn.Linear(12, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x)
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1), -1)
        x = x + self.proj((a @ v).transpose(1, 2).reshape(b, n, c))
        x = x + self.fc2(nn.functional.gelu(self.fc1(x)))
        return self.head(x.mean(1))


def test_qkv_attention_is_never_compacted_wrongly():
    """Zeroing a query channel changes q.k: surgery must not keep a compactor there (it would be
    trained and then refused at merge); the MLP is compacted and merges exactly."""
    torch.manual_seed(0)
    model = QKVAttention()
    x = torch.randn(2, 5, 12)
    state = cdd_plugin.insert_dgc(model, x, CDDConfig(sites="all"))
    assert [s.producer for s in state.sites] == ["fc1"], state.report()
    randomise(model, state, frac=0.5)
    check_exact(model, state, x)


def _logits_twice(model, images, labels=None):
    out = model(images)
    return out, out  # the classifier output doubles as the retrieval embedding


def test_rggr_trains_a_vit_on_token_features_and_merges():
    """A short distillation run: the compactor's pooled feature is the mean over tokens (channels on
    the last dim), RGGR masks, the lasso drives masked rows to zero, and merge is exact."""
    torch.manual_seed(0)
    teacher = _trained_like(_small_vit()).eval()
    student = copy.deepcopy(teacher)
    cfg = CDDConfig(sites="all", lasso=0.05, mask_start=0, ratio=0.9, queue_size=32, flops_target=0.9)
    state = cdd_plugin.insert_dgc(student, X, cfg)
    distiller = cdd_plugin.CDDDistiller(student, teacher, state, student_forward=_logits_twice,
                                        teacher_forward=_logits_twice)
    opt = cdd_plugin.RGGROptimizer(torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9), state)
    g = torch.Generator().manual_seed(1)
    student.train()
    for _ in range(12):
        x = torch.randn(8, 3, 32, 32, generator=g)
        labels = torch.randint(0, 4, (8,), generator=g)
        losses = distiller(x, labels)
        pending = state.pending()  # RGGR's pooled (student, teacher) pairs of this step
        opt.zero_grad()
        cdd_plugin.distill.total_loss(losses).backward()
        opt.step()
    assert len(pending) == 2  # both blocks' MLP sets, each pooled over tokens to [batch, MLP width]
    assert all(s_feat.shape == t_feat.shape == (8, 32) for s_feat, t_feat in pending.values())
    masked = sum(int((d.mask == 0).sum()) for d in state.compactors.values())
    assert masked > 0, state.report()
    check_exact(student, state, X)


def test_channels_last_compactor_is_identity_and_bad_settings_are_refused():
    d = cdd_plugin.DGC(6, "out", channels_last=True)
    x = torch.randn(2, 5, 6)
    assert torch.equal(d(x), x)
    with pytest.raises(ValueError):
        cdd_plugin.DGC(6, "in", blocks=2, channels_last=True)
    with pytest.raises(SurgeryError, match="Fix: pass a small batch shaped like your training input"):
        cdd_plugin.insert_dgc(_small_vit(), torch.randn(2, 3, 16, 16), CDDConfig(sites="all"))


def test_fastreid_vit_backbone_compacts_its_mlps_exactly():
    """FastReID's TransReID-style ViT backbone (qkv attention, class-token embedding as a 1x1 map):
    the MLP hidden sets are compacted, the fused qkv projection is refused by the probe, merge is
    exact and FLOPs are predicted exactly."""
    from fastreid.modeling.backbones.vision_transformer import VisionTransformer as FastReIDViT

    torch.manual_seed(0)
    backbone = FastReIDViT(img_size=(64, 32), patch_size=16, stride_size=16, embed_dim=32, depth=2, num_heads=2,
                           mlp_ratio=3.0, qkv_bias=True)
    x = torch.randn(2, 3, 64, 32, generator=torch.Generator().manual_seed(2))
    state = cdd_plugin.insert_dgc(backbone, x, CDDConfig())  # the authors' placement
    assert sorted(s.producer for s in state.sites) == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]
    assert "blocks.0.attn.qkv" in state.report()
    randomise(backbone, state, frac=0.5)
    check_exact(backbone, state, x)


class SharedMLP(nn.Module):
    """A CNN stem feeding tokens to ONE MLP applied twice (weight-shared blocks)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.proj = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 12, 1)
        self.embed = nn.Linear(12, 16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        t = self.embed(self.proj(torch.relu(self.bn(self.conv(x)))).flatten(2).transpose(1, 2))
        for _ in range(2):
            t = t + self.mlp(t)
        emb = t.mean(1)
        return self.head(emb), emb


def test_cnn_and_transformer_parts_mix_and_a_shared_mlp_is_read_over_all_its_calls():
    """Conv sites and a Linear site in one model merge exactly; the MLP used by two blocks gives
    RGGR (and the teacher side) the mean of its pooled output over both calls, not the last one."""
    torch.manual_seed(0)
    teacher, student = SharedMLP().eval(), SharedMLP()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    state = cdd_plugin.insert_dgc(student, x, CDDConfig(sites="all", queue_size=16))
    assert sorted(s.producer for s in state.sites) == ["conv", "mlp.0", "proj"]
    assert next(s for s in state.sites if s.producer == "mlp.0").channels_last
    seen = {"student": [], "teacher": []}
    student.mlp[0].register_forward_hook(lambda m, i, o: seen["student"].append(o.detach().mean(1)))
    teacher.mlp[0].register_forward_hook(lambda m, i, o: seen["teacher"].append(o.detach().mean(1)))
    distiller = cdd_plugin.CDDDistiller(student, teacher, state)
    distiller.train()
    distiller(x, torch.tensor([0, 1, 2, 0]))
    s, t = state.pending()["mlp.0.cdd_dgc"]
    assert len(seen["student"]) == 2 and len(seen["teacher"]) == 2
    assert torch.allclose(s, torch.stack(seen["student"]).mean(0), atol=1e-6)
    assert torch.allclose(t, torch.stack(seen["teacher"]).mean(0), atol=1e-6)
    randomise(student, state, frac=0.5)
    student.eval()
    merged = cdd_plugin.merge(student)
    with torch.no_grad():
        for a, b in zip(student(x), merged(x)):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert cdd_plugin.profile(merged, x[:1])["flops"] == state.predicted_flops()
