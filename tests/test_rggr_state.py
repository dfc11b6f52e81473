"""RGGR selection, gradient resetting, mask criteria, schedule, optimizer wrapper and exact resume."""

import io

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import cdd_plugin
from nets import SmallNet
from cdd_plugin import CDDConfig, ConfigError, RGGROptimizer
from cdd_plugin.rggr import select_unimportant, select_unimportant_loop


X = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _make(cfg=None, seed=0):
    torch.manual_seed(seed)
    net = SmallNet()
    state = cdd_plugin.insert_dgc(net, X, cfg or CDDConfig(sites="all", criterion="none"))
    return net, state


# -- selection -------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 6), C=st.integers(2, 24), N=st.integers(1, 30), k=st.integers(1, 3),
       ratio=st.sampled_from([0.1, 0.25, 0.5, 0.75, 1.0]), metric=st.sampled_from(["cosine", "l2"]),
       ties=st.booleans(), seed=st.integers(0, 1000))
@example(B=1, C=19, N=21, k=3, ratio=0.1, metric="cosine", ties=True, seed=83)  # tied neighbours: one tie-break
def test_vectorised_selection_equals_the_per_sample_loop(B, C, N, k, ratio, metric, ties, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, C, generator=g)
    t = torch.randn(B, C, generator=g)
    bank = torch.cat([torch.randn(N, C, generator=g), t])
    if ties:  # integer-valued features: many equal contributions
        s, t, bank = s.round(), t.round(), bank.round()
    fast = select_unimportant(s, t, bank, k, ratio, metric)
    slow = select_unimportant_loop(s, t, bank, k, ratio, metric)
    assert torch.equal(fast, slow)


@settings(max_examples=40, deadline=None)
@given(sites=st.lists(st.tuples(st.sampled_from([3, 8, 17]), st.sampled_from([5, 12])), min_size=1, max_size=6),
       B=st.integers(1, 4), k=st.integers(1, 3), ratio=st.sampled_from([0.25, 0.5, 1.0]),
       metric=st.sampled_from(["cosine", "l2"]), ties=st.booleans(), half=st.booleans(), seed=st.integers(0, 1000))
def test_one_batched_selection_over_all_sites_equals_one_selection_per_site(sites, B, k, ratio, metric, ties, half,
                                                                               seed):
    """The refresh's batched form (sites of mixed widths and bank lengths, tied values, bfloat16 banks
    with cached norms) returns, for every site, exactly the mask of the per-site call."""
    from cdd_plugin.rggr import MemoryQueue, select_unimportant_many

    g = torch.Generator().manual_seed(seed)
    items = {}
    for i, (C, N) in enumerate(sites):
        s, t = torch.randn(B, C, generator=g), torch.randn(B, C, generator=g)
        past = torch.randn(N, C, generator=g)
        if ties:
            s, t, past = s.round(), t.round(), past.round()
        q = MemoryQueue(N + B, C, "bfloat16" if half else "float32")
        q.push(past)
        q.push(t)
        items[f"site{i}"] = (s, t, q.bank(), q.bank_norms())
    got = select_unimportant_many(items, k, ratio, metric)
    assert list(got) == list(items)
    for name, (s, t, bank, norms) in items.items():
        assert torch.equal(got[name], select_unimportant(s, t, bank, k, ratio, metric, bank_norms=norms)), name


@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 5), N=st.integers(1, 40), k=st.integers(1, 4), levels=st.integers(1, 6),
       seed=st.integers(0, 10_000))
def test_neighbour_search_picks_the_sets_a_stable_sort_would(B, N, k, levels, seed):
    """The top-k neighbour search returns exactly the first k of a stable descending sort (ties:
    the lower queue index), with few distinct values so ties are everywhere, and NaN rows."""
    from cdd_plugin.rggr import neighbours

    g = torch.Generator().manual_seed(seed)
    sim = torch.randint(0, levels, (B, N), generator=g).float()
    if seed % 5 == 0:
        sim[0, seed % N] = float("nan")
    got = neighbours(sim, k)
    want = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :min(k, N)]
    assert torch.equal(torch.sort(got, dim=1).values, torch.sort(want, dim=1).values)


def test_a_channel_the_student_never_uses_is_unimportant_and_a_dominant_one_is_not():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(8, 16, generator=g) + 0.1
    t = torch.rand(8, 16, generator=g) + 0.1
    s[:, 3] = 0.0        # contributes nothing to any match
    s[:, 7] = 100.0      # dominates every match
    bank = torch.cat([torch.rand(50, 16, generator=g) + 0.1, t])
    mask = select_unimportant(s, t, bank, k=2, ratio=0.5)
    assert mask[3] and not mask[7]


def test_selection_rejects_bad_shapes_with_the_fix():
    with pytest.raises(ValueError, match="pool each layer"):
        select_unimportant(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(5, 3), 2, 0.5)
    with pytest.raises(ValueError, match="memory bank"):
        select_unimportant(torch.randn(2, 3), torch.randn(2, 3), torch.randn(5, 4), 2, 0.5)


# -- gradient resetting ----------------------------------------------------------------------
def test_masked_channels_receive_only_the_lasso_gradient_and_others_task_plus_lasso():
    net, state = _make(CDDConfig(sites="all", criterion="none", lasso=0.01))
    dgc = state.compactors["bn1.cdd_dgc"]
    with torch.no_grad():
        dgc.weight.add_(0.1 * torch.randn_like(dgc.weight))
    dgc.mask[[1, 4]] = 0.0
    logits, _ = net(X)
    logits.sum().backward()
    task = dgc.weight.grad.clone()
    state.reset_gradients()
    w = dgc.weight.detach()
    lasso = 0.01 * w / w.norm(dim=1, keepdim=True)
    expected = task * dgc.mask[:, None] + lasso
    assert torch.allclose(dgc.weight.grad, expected, atol=1e-7)
    assert torch.allclose(dgc.weight.grad[1], lasso[1]) and torch.allclose(dgc.weight.grad[4], lasso[4])


def test_masked_rows_shrink_to_zero_and_merge_removes_them():
    net, state = _make(CDDConfig(sites="all", criterion="none", lasso=0.5, threshold=1e-3))
    dgc = state.compactors["bn2.cdd_dgc"]
    dgc.mask[:10] = 0.0
    opt = RGGROptimizer(torch.optim.SGD(net.parameters(), lr=0.05), state)
    norms = []
    for _ in range(60):
        logits, _ = net(X)
        opt.zero_grad()
        F.cross_entropy(logits, torch.arange(4) % 5).backward()
        opt.step()
        norms.append(dgc.channel_norms()[:10].max().item())
    # only the lasso pulls masked rows: lr * lasso = 0.025 per step towards zero, so after
    # 60 steps they sit within one step of it
    assert norms[0] > 0.9 and norms[-1] <= 0.05 * 0.5 + 1e-6
    with torch.no_grad():  # finish the job exactly, as a long schedule would
        dgc.zero_(range(10))
    merged = cdd_plugin.merge(net)
    assert merged.conv2.out_channels == 32 - 10


# -- criteria and schedule -------------------------------------------------------------------
def _feed(state, net, seed):
    g = torch.Generator().manual_seed(seed)
    feats = {}
    for name, dgc in state.compactors.items():
        feats[name] = torch.rand(6, dgc.channels, generator=g)
    state.observe(feats, {n: f + 0.01 for n, f in feats.items()})


def test_rggr_masks_persist_and_respect_the_flops_target_and_min_channels():
    net, state = _make(CDDConfig(sites="all", criterion="rggr", ratio=0.9, k=1, flops_target=0.7, queue_size=64))
    dense = state.dense_flops()
    seen_masked = set()
    for it in range(20):
        _feed(state, net, it)
        state.on_step()
        now = {(n, c) for n, d in state.compactors.items() for c in (d.mask == 0).nonzero().flatten().tolist()}
        assert seen_masked <= now, "a mask came back to 1"
        seen_masked = now
    assert seen_masked, "RGGR never masked anything"
    assert state.planned_flops() <= 0.7 * dense
    # budget met: it stopped early rather than masking everything it could
    assert sum(state.active_channels().values()) > len(state.sites)
    assert all(v >= 1 for v in state.active_channels().values())


def test_rggr_without_flops_target_keeps_at_least_one_channel_per_layer():
    net, state = _make(CDDConfig(sites="all", criterion="rggr", ratio=1.0, k=1, queue_size=16))
    for it in range(5):
        _feed(state, net, it)
        state.on_step()
    assert all(v == 1 for v in state.active_channels().values())


def test_norm_criterion_masks_the_smallest_rows_a_few_at_a_time():
    net, state = _make(CDDConfig(sites="all", criterion="norm", norm_step=3, flops_target=0.5))
    dgc = state.compactors["bn2.cdd_dgc"]
    with torch.no_grad():
        dgc.weight[[5, 9, 11]] *= 0.01
    state.on_step()
    assert sum(d.channels - a for d, a in zip(state.compactors.values(), state.active_channels().values())) == 3
    assert set((dgc.mask == 0).nonzero().flatten().tolist()) == {5, 9, 11}


def test_mask_start_and_interval_schedule():
    net, state = _make(CDDConfig(sites="all", criterion="norm", norm_step=1, flops_target=0.1, mask_start=3, mask_interval=2))
    masked = []
    for it in range(8):
        state.on_step()
        masked.append(sum(d.channels for d in state.compactors.values()) - sum(state.active_channels().values()))
    # refreshes at iterations 3, 5, 7
    assert masked == [0, 0, 0, 1, 1, 2, 2, 3]


def test_sites_without_a_teacher_fall_back_to_self_retrieval():
    net, state = _make(CDDConfig(sites="all", criterion="rggr", queue_size=32))
    s = {n: torch.rand(4, d.channels) for n, d in state.compactors.items()}
    state.observe(s, {})
    for n, q in state.queues.items():
        assert torch.equal(q.bank(), s[n])


# -- optimizer wrapper -----------------------------------------------------------------------
def test_wrapper_is_still_the_inner_optimizer_for_schedulers_and_scalers():
    net, state = _make()
    inner = torch.optim.SGD(cdd_plugin.param_groups(net, lr=0.1, weight_decay=1e-4), lr=0.1, momentum=0.9)
    opt = RGGROptimizer(inner, state)
    assert isinstance(opt, torch.optim.SGD)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    logits, _ = net(X)
    F.cross_entropy(logits, torch.zeros(4, dtype=torch.long)).backward()
    opt.step()
    sched.step()
    assert state.iteration == 1
    assert opt.param_groups[0]["lr"] < 0.1
    dgc_group = [g for g in opt.param_groups if any(p is d.weight for d in state.compactors.values() for p in g["params"])]
    assert all(g["weight_decay"] == 1e-4 for g in dgc_group)  # the authors' default: compactors decay too
    with pytest.raises(TypeError, match="already wrapped"):
        RGGROptimizer(opt, state)
    with pytest.raises(ValueError, match="AFTER cdd_plugin.insert_dgc"):
        RGGROptimizer(torch.optim.SGD(SmallNet().parameters(), lr=0.1), state)


def test_bf16_autocast_step_on_cpu():
    net, state = _make(CDDConfig(sites="all", criterion="none", lasso=0.01))
    opt = RGGROptimizer(torch.optim.SGD(net.parameters(), lr=0.1), state)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = net(X)
        loss = F.cross_entropy(logits.float(), torch.zeros(4, dtype=torch.long))
    loss.backward()
    before = {n: d.weight.detach().clone() for n, d in state.compactors.items()}
    opt.step()
    assert all(not torch.equal(before[n], d.weight) for n, d in state.compactors.items())
    assert all(torch.isfinite(d.weight).all() for d in state.compactors.values())


def test_amp_grad_scaler_unscales_before_the_reset():
    net, state = _make(CDDConfig(sites="all", criterion="none", lasso=0.01))
    opt = RGGROptimizer(torch.optim.SGD(net.parameters(), lr=0.1), state)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    dgc = state.compactors["bn1.cdd_dgc"]
    dgc.mask[0] = 0.0
    logits, _ = net(X)
    scaler.scale(F.cross_entropy(logits, torch.zeros(4, dtype=torch.long))).backward()
    scaler.unscale_(opt)
    w = dgc.weight.detach().clone()
    scaler.step(opt)
    scaler.update()
    # the masked row moved by exactly lr * lasso * unit vector: no leftover scale factor
    step = (w[0] - dgc.weight.detach()[0]).norm().item()
    assert step == pytest.approx(0.1 * 0.01, rel=1e-4)


# -- exact resume ----------------------------------------------------------------------------
def _train(net, state, opt, steps, start=0):
    for i in range(start, start + steps):
        g = torch.Generator().manual_seed(100 + i)
        x = torch.randn(4, 3, 16, 16, generator=g)
        y = torch.randint(0, 5, (4,), generator=g)
        state.capture(True)
        logits, _ = net(x)
        state.observe()
        opt.zero_grad()
        F.cross_entropy(logits, y).backward()
        opt.step()


@pytest.mark.parametrize("queue_dtype", ["float32", "bfloat16", "float16"])
def test_resume_from_checkpoint_ends_with_the_same_masks_and_weights(tmp_path, queue_dtype):
    cfg = CDDConfig(sites="all", criterion="rggr", ratio=0.6, k=2, queue_size=10, lasso=0.05, flops_target=0.6,
                    queue_dtype=queue_dtype)
    net_a, st_a = _make(cfg)
    opt_a = RGGROptimizer(torch.optim.SGD(net_a.parameters(), lr=0.05, momentum=0.9), st_a)
    _train(net_a, st_a, opt_a, 8)

    net_b, st_b = _make(cfg)
    opt_b = RGGROptimizer(torch.optim.SGD(net_b.parameters(), lr=0.05, momentum=0.9), st_b)
    _train(net_b, st_b, opt_b, 4)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": net_b.state_dict(), "optimizer": opt_b.state_dict()}, path)

    ckpt = torch.load(path, weights_only=True)
    net_c, st_c = _make(cfg, seed=123)  # different init: everything must come from the checkpoint
    opt_c = RGGROptimizer(torch.optim.SGD(net_c.parameters(), lr=0.05, momentum=0.9), st_c)
    net_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["optimizer"])
    assert st_c.iteration == 4
    _train(net_c, st_c, opt_c, 4, start=4)

    assert any((d.mask == 0).any() for d in st_a.compactors.values())
    for n in st_a.compactors:
        assert torch.equal(st_a.compactors[n].mask, st_c.compactors[n].mask), n
    for (k, va), vc in zip(net_a.state_dict().items(), net_c.state_dict().values()):
        assert torch.allclose(va, vc, atol=1e-6), k
    for n, q in st_a.queues.items():   # the queues are stored and restored in their own type, exactly
        assert q.data.dtype == getattr(torch, queue_dtype)
        assert torch.equal(q.data, st_c.queues[n].data) and torch.equal(q.norms, st_c.queues[n].norms), n


def _save(obj):
    """``obj`` as torch.save writes it, in memory, ready to load."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def _checkpoint_bytes(obj) -> int:
    return _save(obj).getbuffer().nbytes


def test_half_precision_queues_halve_the_checkpoint_and_keep_the_float32_masks():
    """Half-precision storage: half the bytes; the selection computes in float32 on the
    rounded rows, so masks equal the float32 queue's except where contributions tie within
    the rounding. Over seeded retrieval-like features, float16 changes no more than 1% of the
    masked channels and bfloat16 no more than 3% (the tolerance stated in the docs)."""
    from cdd_plugin.rggr import MemoryQueue
    gen = torch.Generator().manual_seed(0)
    sizes, changed, masked = {}, {"float16": 0, "bfloat16": 0}, 0
    for trial in range(12):
        C, N, B = (64, 256, 512)[trial % 3], 2000, 4
        protos = torch.randn(80, C, generator=gen).relu() * 3 * torch.rand(C, generator=gen)
        t = protos[torch.randint(0, 80, (B,), generator=gen)] + 0.3 * torch.rand(B, C, generator=gen)
        past = protos[torch.randint(0, 80, (N - B,), generator=gen)] + 0.3 * torch.rand(N - B, C, generator=gen)
        s = t + 0.2 * torch.randn(B, C, generator=gen)
        masks = {}
        for dtype in ("float32", "float16", "bfloat16"):
            q = MemoryQueue(N, C, dtype)
            q.push(past)
            q.push(t)
            masks[dtype] = select_unimportant(s, t, q.bank(), 2, 0.5, bank_norms=q.bank_norms())
            sizes[dtype] = _checkpoint_bytes(q.state_dict()) if trial == 0 else sizes[dtype]
        masked += int(masks["float32"].sum())
        for dtype in changed:
            changed[dtype] += int((masks[dtype] ^ masks["float32"]).sum())
    assert masked > 100   # the comparison is about real masks, not empty ones
    assert changed["float16"] <= 0.01 * masked and changed["bfloat16"] <= 0.03 * masked, (changed, masked)
    assert sizes["float16"] < 0.52 * sizes["float32"] and sizes["bfloat16"] < 0.52 * sizes["float32"], sizes


def test_float16_queues_refuse_features_beyond_their_range_and_change_nothing():
    net, state = _make(CDDConfig(sites="all", criterion="rggr", queue_size=8, queue_dtype="float16"))
    state.capture(True)
    net(X)
    state.observe()
    before = {n: (q.data.clone(), q.ptr, q.count) for n, q in state.queues.items()}
    net(X)
    first = next(iter(state.compactors))
    big = {n: d.last_pooled for n, d in state.compactors.items()}
    big[list(big)[-1]] = big[list(big)[-1]] * 1e6   # only the LAST site overflows
    with pytest.raises(ValueError, match="queue_dtype='bfloat16'"):
        state.observe(teacher_feats=big)
    for n, q in state.queues.items():   # no queue took the batch, not even the sites checked earlier
        assert torch.equal(q.data, before[n][0]) and (q.ptr, q.count) == before[n][1:], n
    assert first in state.queues


def test_checkpoints_without_queues_are_small_and_the_resumed_run_refills_them():
    cfg = CDDConfig(sites="all", criterion="rggr", ratio=0.6, k=2, queue_size=12, lasso=0.05, flops_target=0.6,
                    checkpoint_queues=False)
    net_b, st_b = _make(cfg)
    opt_b = RGGROptimizer(torch.optim.SGD(net_b.parameters(), lr=0.05, momentum=0.9), st_b)
    _train(net_b, st_b, opt_b, 4)
    sd = opt_b.state_dict()
    assert all(q["data"] is None and q["count"] == 0 for q in sd["cdd"]["queues"].values())
    with_queues = CDDConfig(**{**cfg.to_dict(), "checkpoint_queues": True})
    _, st_full = _make(with_queues)
    st_full.queues = st_b.queues
    assert _checkpoint_bytes(sd["cdd"]) < _checkpoint_bytes(st_full.state_dict())
    assert "left out of checkpoints" in st_b.report()

    net_c, st_c = _make(cfg, seed=7)
    opt_c = RGGROptimizer(torch.optim.SGD(net_c.parameters(), lr=0.05, momentum=0.9), st_c)
    net_c.load_state_dict(net_b.state_dict())
    opt_c.load_state_dict(torch.load(_save(sd), weights_only=True))
    assert st_c.iteration == 4
    for n in st_b.compactors:       # masks and schedule come back; the queues start empty ...
        assert torch.equal(st_b.compactors[n].mask, st_c.compactors[n].mask)
        assert st_c.queues[n].count == 0
    _train(net_c, st_c, opt_c, 2, start=4)
    for n, q in st_c.queues.items():  # ... and hold exactly the batches seen since the resume
        assert q.count == 2 * X.shape[0], n


def test_loading_a_state_from_another_architecture_is_refused():
    _, st_a = _make()
    torch.manual_seed(0)
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten())
    st_b = cdd_plugin.insert_dgc(other, X, CDDConfig(sites="all"))
    with pytest.raises(ValueError, match="same student architecture"):
        st_b.load_state_dict(st_a.state_dict())
    with pytest.raises(ValueError, match="not a cdd_plugin CDD state"):
        st_b.load_state_dict({"masks": {}})


# -- configuration ---------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"ratio": 0.0}, "ratio"), ({"ratio": 1.5}, "ratio"), ({"k": 0}, "k=2"), ({"criterion": "magnitude"}, "rggr"),
    ({"metric": "dot"}, "cosine"), ({"lasso": -1.0}, "lasso"), ({"threshold": 0.0}, "threshold"),
    ({"flops_target": 1.5}, "flops_target"), ({"criterion": "norm"}, "set flops_target"), ({"queue_size": 0}, "queue_size"), ({"mask_interval": 0}, "mask_interval"),
    ({"queue_dtype": "float8"}, "bfloat16"),
])
def test_invalid_config_values_name_the_fix(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        CDDConfig(sites="all", **kwargs)


def test_unknown_config_keys_list_the_valid_ones():
    with pytest.raises(ConfigError, match="valid keys are: lasso, threshold"):
        CDDConfig.from_dict({"lasso": 0.1, "lamda": 0.2})


def test_compactor_weight_decay_follows_the_setting_in_every_optimizer_form():
    """decay_compactors=True (the authors'): the optimizer's weight decay acts on the compactors too;
    False: the wrapper moves them into a group without weight decay, whatever groups the user built."""
    for decay in (True, False):
        torch.manual_seed(0)
        net = SmallNet()
        state = cdd_plugin.insert_dgc(net, X, CDDConfig(sites="all", criterion="none", decay_compactors=decay))
        dgc = {id(d.weight) for d in state.compactors.values()}
        for inner in (torch.optim.SGD(net.parameters(), lr=0.1, weight_decay=1e-3),
                      torch.optim.SGD(cdd_plugin.param_groups(net, lr=0.1, weight_decay=1e-3), lr=0.1)):
            opt = RGGROptimizer(inner, state)
            n_params = sum(len(g["params"]) for g in opt.param_groups)
            assert n_params == len(list(net.parameters()))
            for g in opt.param_groups:
                for p in g["params"]:
                    want = 1e-3 if (decay or id(p) not in dgc) else 0.0
                    assert g["weight_decay"] == want
    with pytest.raises(ConfigError, match="decay_compactors"):
        CDDConfig(decay_compactors="sometimes")


def test_masked_lasso_pulls_only_the_masked_rows_harder():
    """masked_lasso (ours) is the lasso of masked rows alone; the rows that still learn feel `lasso`."""
    net, state = _make(CDDConfig(sites="all", criterion="none", lasso=0.01, masked_lasso=0.5))
    d = next(iter(state.compactors.values()))
    d.mask[:3] = 0.0
    logits, _ = net(X)
    F.cross_entropy(logits, torch.zeros(4, dtype=torch.long)).backward()
    task = d.weight.grad.clone()
    state.reset_gradients()
    unit = d.weight.detach() / d.weight.detach().norm(dim=1, keepdim=True)
    assert torch.allclose(d.weight.grad[:3], 0.5 * unit[:3], atol=1e-6)
    assert torch.allclose(d.weight.grad[3:], task[3:] + 0.01 * unit[3:], atol=1e-6)
    with pytest.raises(ConfigError, match="masked_lasso"):
        CDDConfig(masked_lasso=-1.0)
