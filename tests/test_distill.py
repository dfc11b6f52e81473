"""CDDDistiller: losses, frozen teacher, automatic layer pairing, RGGR feeding."""
import copy

import pytest
import torch
import torch.nn.functional as F

import cdd_plugin
from cdd_plugin import CDDConfig, LossConfig
from cdd_plugin.distill import kd_loss, total_loss, triplet_loss

from nets import SmallNet

X = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])


def _pair(cfg=None, losses=None):
    torch.manual_seed(0)
    teacher = SmallNet()
    student = copy.deepcopy(teacher)
    state = cdd_plugin.insert_dgc(student, X, cfg or CDDConfig(sites="all", queue_size=64))
    return cdd_plugin.CDDDistiller(student, teacher, state, losses), state


def test_distiller_returns_every_named_loss_and_a_sparsity_figure():
    d, state = _pair()
    d.train()
    out = d(X, Y)
    assert set(out) == {"loss_id", "loss_triplet", "loss_kd", "loss_feat", "cdd_sparsity"}
    assert all(torch.isfinite(v) for v in out.values())
    assert not out["cdd_sparsity"].requires_grad
    total_loss(out).backward()
    assert all(p.grad is None for p in d.teacher.parameters())
    assert any(dgc.weight.grad is not None for dgc in state.compactors.values())


def test_student_copied_from_teacher_has_zero_distillation_loss_at_start():
    d, _ = _pair()
    d.train()
    for m in list(d.student.modules()) + list(d.teacher.modules()):
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()  # same normalisation on both sides
    out = d(X, Y)
    assert out["loss_kd"].item() == pytest.approx(0.0, abs=1e-6)
    assert out["loss_feat"].item() == pytest.approx(0.0, abs=1e-5)


def test_teacher_stays_frozen_in_eval_mode():
    d, _ = _pair()
    d.train()
    assert d.student.training and not d.teacher.training
    assert all(not p.requires_grad for p in d.teacher.parameters())


def test_weights_switch_terms_off():
    d, _ = _pair(losses=LossConfig(kd_weight=0.0, feat_weight=0.0, triplet_weight=0.0))
    d.train()
    assert set(d(X, Y)) == {"loss_id", "cdd_sparsity"}


def test_layers_pair_by_name_and_feed_the_teacher_queues():
    d, state = _pair()
    assert set(d.pairs) == set(state.compactors)
    d.train()
    d(X, Y)
    for name, q in state.queues.items():
        assert q.count == len(X)


def test_unpaired_sites_are_reported_and_fall_back_to_self_retrieval():
    torch.manual_seed(0)
    teacher = SmallNet(width=8)           # different widths: no site can pair by name
    student = SmallNet(width=16)
    state = cdd_plugin.insert_dgc(student, X, CDDConfig(sites="all", queue_size=64))
    d = cdd_plugin.CDDDistiller(student, teacher, state)
    assert not d.pairs and set(d.unpaired) == set(state.compactors)
    assert "channels" in next(iter(d.unpaired.values()))
    d.train()
    out = d(X, Y)
    assert "loss_feat" not in out
    assert all(q.count == len(X) for q in state.queues.values())


def test_class_count_mismatch_names_the_fix():
    teacher = SmallNet(classes=7)
    student = SmallNet(classes=5)
    state = cdd_plugin.insert_dgc(student, X, CDDConfig(sites="all"))
    d = cdd_plugin.CDDDistiller(student, teacher, state).train()
    with pytest.raises(ValueError, match="set kd_weight=0"):
        d(X, Y)


def test_invalid_loss_settings_are_refused():
    with pytest.raises(cdd_plugin.ConfigError, match="switch the term off"):
        LossConfig(kd_weight=-1)
    with pytest.raises(cdd_plugin.ConfigError, match="valid keys"):
        LossConfig.from_dict({"kd_wieght": 1.0})


def test_loss_functions_match_their_definitions():
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    T = 2.0
    ref = (F.softmax(t / T, 1) * (F.log_softmax(t / T, 1) - F.log_softmax(s / T, 1))).sum(1).mean() * T * T
    assert kd_loss(s, t, T).item() == pytest.approx(ref.item(), rel=1e-5)
    emb = torch.tensor([[0.0, 0.0], [0.0, 1.0], [3.0, 0.0], [3.0, 0.5]])
    labels = torch.tensor([0, 0, 1, 1])
    # anchor 0: hardest positive 1.0, hardest negative 3.0 -> relu(1 - 3 + 0.3) = 0 ; all anchors easy
    assert triplet_loss(emb, labels, 0.3).item() == pytest.approx(0.0, abs=1e-6)
    assert triplet_loss(emb, labels, 2.5).item() > 0


def _feat_grads(feat_tap):
    """Gradients of the feature term alone on the compactors, with the compactors moved off the identity."""
    d, state = _pair(losses=LossConfig(ce_weight=0.0, triplet_weight=0.0, kd_weight=0.0, feat_weight=1.0,
                                       feat_tap=feat_tap))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for dgc in state.compactors.values():
            dgc.weight.mul_(0.5).add_(0.1 * torch.randn(dgc.weight.shape, generator=g))
    d.train()
    out = d(X, Y)
    total_loss(out).backward()
    return out, state


def test_feature_term_reads_the_student_before_its_compactor_by_default():
    """The authors' tap: the fit term sees conv + BN output, the same point as the teacher's, so it
    never pulls on compactor rows that sit after that point; RGGR still gets the compacted feature."""
    assert LossConfig().feat_tap == "before"
    out, state = _feat_grads("before")
    assert out["loss_feat"].item() > 0
    # bn2's compactor lies after the last tapped point (bn2's output): the fit term cannot reach it.
    # bn1's compactor feeds conv2, so the term at bn2 still trains it, as in the authors' code.
    # (bn3's channels are the returned embedding: a model output, left whole)
    assert sorted(state.compactors) == ["bn1.cdd_dgc", "bn2.cdd_dgc"]
    last = "bn2.cdd_dgc"
    assert state.compactors[last].weight.grad is None or state.compactors[last].weight.grad.abs().max() == 0
    assert state.compactors["bn1.cdd_dgc"].weight.grad.abs().max() > 0
    out_after, state_after = _feat_grads("after")
    assert state_after.compactors[last].weight.grad.abs().max() > 0   # the compacted tap pulls on the rows
    for dgc in state.compactors.values():  # capture is switched off again after the step
        assert dgc.capture is False and dgc.last_pooled is None


def test_rggr_gets_the_pooled_output_after_the_compactor():
    d, state = _pair(losses=LossConfig(feat_tap="before"))
    seen = {}
    original = state.observe

    def spy(student_feats=None, teacher_feats=None):
        seen.update(student_feats or {})
        return original(student_feats, teacher_feats)

    state.observe = spy
    with torch.no_grad():
        for dgc in state.compactors.values():
            dgc.zero_([0])                      # channel 0 is zero after every compactor
    d.train()
    d(X, Y)
    assert set(seen) == set(state.compactors)
    assert all(torch.all(f[:, 0] == 0) for f in seen.values())
    assert all(f[:, 1:].abs().sum() > 0 for f in seen.values())


def test_unknown_feature_tap_names_the_choices():
    with pytest.raises(cdd_plugin.ConfigError, match="'before'"):
        LossConfig(feat_tap="middle")
