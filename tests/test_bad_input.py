"""Bad input, as a table: every case raises a clear error that names the fix, and nothing the
user had (model, checkpoint, file) is lost or silently changed."""
import os

import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

import cdd_plugin
from cdd_plugin import CDDConfig, LossConfig
from cdd_plugin.rggr import select_unimportant

from nets import SmallNet

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _structure(model):
    """What a failed operation must not leave behind: hooks, cdd attributes, modules, training flags."""
    return [(n, type(m).__name__, m.training, len(m._forward_hooks), len(m._forward_pre_hooks),
             sorted(k for k in vars(m) if k.startswith("_cdd") or k == "cdd_dgc")) for n, m in model.named_modules()]


def _snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()}, _structure(model))


def _same(model, snap):
    tensors, structure = snap
    sd = model.state_dict()
    def equal(a, b):  # NaN-aware: a model that held a NaN must still hold it, unchanged
        return torch.equal(a, b) or (a.is_floating_point() and a.shape == b.shape
                                     and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True))
    return (set(sd) == set(tensors) and all(equal(sd[k], tensors[k]) for k in tensors)
            and _structure(model) == structure)


def _file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def _with_dgc():
    torch.manual_seed(0)
    net = SmallNet()
    return net, cdd_plugin.insert_dgc(net, X, CDDConfig(sites="all"))


# Each case: (id, make, action, exception, message fragment that names the fix).
# `make(tmp)` returns a context dict; `action(ctx)` triggers the error; ctx["model"], if
# present, must be unchanged afterwards, and ctx["file"], if present, must still be there.
def c_wrong_shape(tmp):
    m = SmallNet()
    return {"model": m, "run": lambda: cdd_plugin.insert_dgc(m, torch.randn(2, 1, 16, 16))}


def c_twice(tmp):
    m, _ = _with_dgc()
    return {"model": m, "run": lambda: cdd_plugin.insert_dgc(m, X, CDDConfig(sites="all"))}


def c_nothing_to_prune(tmp):
    m = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4))
    return {"model": m, "run": lambda: cdd_plugin.insert_dgc(m, X, CDDConfig(sites="all"))}


def c_untraceable(tmp):
    m = torchvision.models.shufflenet_v2_x0_5(num_classes=4)
    return {"model": m, "run": lambda: cdd_plugin.insert_dgc(m, torch.randn(2, 3, 32, 32), CDDConfig(sites="all"))}


def c_merge_plain(tmp):
    m = SmallNet()
    return {"model": m, "run": lambda: cdd_plugin.merge(m)}


def c_merge_twice(tmp):
    m, _ = _with_dgc()
    merged = cdd_plugin.merge(m)
    return {"model": merged, "run": lambda: cdd_plugin.merge(merged)}


def _merged_file(tmp):
    m, st = _with_dgc()
    st.compactors["bn2.cdd_dgc"].zero_(range(5))
    path = os.path.join(tmp, "m.pth")
    cdd_plugin.save_merged(cdd_plugin.merge(m), path)
    return path


def c_load_wrong_arch(tmp):
    path = _merged_file(tmp)
    target = torchvision.models.resnet18()
    return {"file": path, "run": lambda: cdd_plugin.load_merged(path, target)}


def c_load_truncated(tmp):
    path = _merged_file(tmp)
    with open(path, "rb") as f:
        data = f.read()
    bad = os.path.join(tmp, "cut.pth")
    with open(bad, "wb") as f:
        f.write(data[: len(data) // 3])
    return {"file": bad, "run": lambda: cdd_plugin.load_merged(bad, SmallNet())}


def c_load_foreign(tmp):
    path = os.path.join(tmp, "foreign.pth")
    torch.save({"model": SmallNet().state_dict()}, path)
    return {"file": path, "run": lambda: cdd_plugin.load_merged(path, SmallNet())}


def c_load_pickled_module(tmp):
    path = os.path.join(tmp, "pickled.pth")
    torch.save(SmallNet(), path)  # a whole pickled module: must never be unpickled
    return {"file": path, "run": lambda: cdd_plugin.load_merged(path, SmallNet())}


def c_load_missing(tmp):
    return {"run": lambda: cdd_plugin.load_merged(os.path.join(tmp, "nope.pth"), SmallNet())}


def c_save_unmerged(tmp):
    m, _ = _with_dgc()
    return {"model": m, "run": lambda: cdd_plugin.save_merged(m, os.path.join(tmp, "x.pth"))}


def c_opt_missing_params(tmp):
    m, st = _with_dgc()
    return {"run": lambda: cdd_plugin.RGGROptimizer(torch.optim.SGD(SmallNet().parameters(), lr=0.1), st)}


def c_opt_twice(tmp):
    m, st = _with_dgc()
    opt = cdd_plugin.RGGROptimizer(torch.optim.SGD(m.parameters(), lr=0.1), st)
    return {"run": lambda: cdd_plugin.RGGROptimizer(opt, st)}


def c_nan_loss(tmp):
    m, st = _with_dgc()
    opt = cdd_plugin.RGGROptimizer(torch.optim.SGD(m.parameters(), lr=0.1), st)

    m.eval()  # (a training forward updates BatchNorm statistics by itself; only the step is under test)

    def run():
        logits, _ = m(X)
        (logits.sum() * float("nan")).backward()
        opt.step()
    return {"model": m, "run": run}


def c_state_other_arch(tmp):
    _, st_a = _with_dgc()
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten())
    st_b = cdd_plugin.insert_dgc(other, X, CDDConfig(sites="all"))
    return {"model": other, "run": lambda: st_b.load_state_dict(st_a.state_dict())}


def c_kd_classes(tmp):
    teacher, student = SmallNet(classes=7), SmallNet(classes=5)
    st = cdd_plugin.insert_dgc(student, X, CDDConfig(sites="all"))
    d = cdd_plugin.CDDDistiller(student, teacher, st).train()
    return {"run": lambda: d(torch.randn(4, 3, 16, 16), torch.tensor([0, 0, 1, 1]))}


def c_label_out_of_range(tmp):
    teacher, student = SmallNet(classes=5), SmallNet(classes=5)
    st = cdd_plugin.insert_dgc(student, X, CDDConfig(sites="all"))
    d = cdd_plugin.CDDDistiller(student, teacher, st).train()
    return {"run": lambda: d(torch.randn(4, 3, 16, 16), torch.tensor([0, 0, 9, 9]))}


def c_same_teacher(tmp):
    m, st = _with_dgc()
    return {"run": lambda: cdd_plugin.CDDDistiller(m, m, st)}


def c_selection_shapes(tmp):
    return {"run": lambda: select_unimportant(torch.randn(2, 3), torch.randn(2, 4), torch.randn(5, 3), 2, 0.5)}


def c_market_missing(tmp):
    from cdd_plugin.datasets import parse_market1501
    return {"run": lambda: parse_market1501(os.path.join(tmp, "no_market"))}


def c_truncated_image(tmp):
    from cdd_plugin.datasets import ImageDataset, Sample
    path = os.path.join(tmp, "0001_c1s1_000001_00.jpg")
    Image.new("RGB", (64, 128), (200, 30, 30)).save(path)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:200])
    ds = ImageDataset([Sample(path, 1, 0)])
    return {"file": path, "run": lambda: ds[0]}


# -- hardening: exact or refused, nothing half-changed, no silent corruption, errors that name the fix
def c_surgery_fails_late(tmp):
    """A failure after the compactors were attached (here: while the FLOPs model is traced) must
    leave the model exactly as it was, and a corrected retry must work."""
    import cdd_plugin.flops as flops

    m = SmallNet()

    def run():
        real = flops.FlopsModel.build
        flops.FlopsModel.build = classmethod(lambda cls, *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
        try:
            cdd_plugin.insert_dgc(m, X, CDDConfig(sites="all"))
        finally:
            flops.FlopsModel.build = real
    return {"model": m, "run": run, "after": lambda: cdd_plugin.insert_dgc(m, X, CDDConfig(sites="all"))}


def c_surgery_meta(tmp):
    with torch.device("meta"):
        m = SmallNet()
    return {"run": lambda: cdd_plugin.insert_dgc(m, X, CDDConfig(sites="all"))}


def c_surgery_nan_inputs(tmp):
    m = SmallNet()
    x = X.clone()
    x[0, 0, 0, 0] = float("nan")
    return {"model": m, "run": lambda: cdd_plugin.insert_dgc(m, x, CDDConfig(sites="all"))}


def c_surgery_huge_inputs(tmp):
    m = SmallNet()
    return {"model": m, "run": lambda: cdd_plugin.insert_dgc(m, X * 1e30, CDDConfig(sites="all"))}


def c_surgery_dict_cfg(tmp):
    m = SmallNet()
    return {"model": m, "run": lambda: cdd_plugin.insert_dgc(m, X, {"lasso": 0.01})}


def c_surgery_dict_inputs(tmp):
    m = SmallNet()
    return {"model": m, "run": lambda: cdd_plugin.insert_dgc(m, {"x": X}, CDDConfig(sites="all"))}


def c_ignored_unknown_name(tmp):
    m = SmallNet()
    return {"model": m, "run": lambda: cdd_plugin.insert_dgc(m, X, CDDConfig(sites="all"), ignored_layers=["conv9"])}


def c_ignored_foreign_module(tmp):
    m = SmallNet()
    return {"model": m, "run": lambda: cdd_plugin.insert_dgc(m, X, CDDConfig(sites="all"),
                                                             ignored_layers=[SmallNet().conv2])}


def c_ignored_wrong_type(tmp):
    m = SmallNet()
    return {"model": m, "run": lambda: cdd_plugin.insert_dgc(m, X, CDDConfig(sites="all"), ignored_layers=3)}


def c_state_other_queue(tmp):
    m, st = _with_dgc()
    other_net = SmallNet()
    other = cdd_plugin.insert_dgc(other_net, X, CDDConfig(sites="all", queue_size=7))
    saved = st.state_dict()
    return {"state": other, "run": lambda: other.load_state_dict(saved)}


def c_optim_other_groups(tmp):
    m, st = _with_dgc()
    a = cdd_plugin.RGGROptimizer(torch.optim.SGD(cdd_plugin.param_groups(m, 0.1), lr=0.1), st)
    saved = a.state_dict()
    m2, st2 = _with_dgc()
    b = cdd_plugin.RGGROptimizer(torch.optim.SGD(m2.parameters(), lr=0.1), st2)
    st2.iteration = 5
    return {"state": st2, "run": lambda: b.load_state_dict(saved)}


def c_optim_plain_state(tmp):
    m, st = _with_dgc()
    plain = torch.optim.SGD(m.parameters(), lr=0.1).state_dict()
    opt = cdd_plugin.RGGROptimizer(torch.optim.SGD(m.parameters(), lr=0.1), st)
    st.iteration = 5
    return {"state": st, "run": lambda: opt.load_state_dict(plain)}


def c_merge_nan_compactor(tmp):
    m, st = _with_dgc()
    st.compactors["bn2.cdd_dgc"].weight.data[0, 0] = float("nan")
    return {"model": m, "run": lambda: cdd_plugin.merge(m)}


def c_merge_wrong_inputs(tmp):
    m, st = _with_dgc()
    return {"model": m, "run": lambda: cdd_plugin.merge(m, example_inputs=torch.randn(2, 1, 16, 16))}


def c_save_meta_object(tmp):
    path = _merged_file(tmp)
    m, _ = _with_dgc()
    merged = cdd_plugin.merge(m)
    return {"file": path, "run": lambda: cdd_plugin.save_merged(merged, path, meta={"model": SmallNet()})}


def c_save_read_only(tmp):
    path = _merged_file(tmp)
    os.chmod(path, 0o444)
    m, _ = _with_dgc()
    merged = cdd_plugin.merge(m)
    return {"file": path, "run": lambda: cdd_plugin.save_merged(merged, path)}


def c_save_into_a_file_as_folder(tmp):
    blocker = os.path.join(tmp, "blocker")
    with open(blocker, "w") as f:
        f.write("x")
    m, _ = _with_dgc()
    merged = cdd_plugin.merge(m)
    return {"file": blocker, "run": lambda: cdd_plugin.save_merged(merged, os.path.join(blocker, "m.pth"))}


def _edited_merged(tmp, edit):
    path = _merged_file(tmp)
    payload = torch.load(path, weights_only=True)
    edit(payload)
    torch.save(payload, path)
    return path


def c_load_edited_shape(tmp):
    def edit(p):
        p["state_dict"]["conv2.weight"] = torch.zeros(3, 3, 1, 1)
    path = _edited_merged(tmp, edit)
    target = SmallNet()
    return {"model": target, "file": path, "run": lambda: cdd_plugin.load_merged(path, target)}


def c_load_injected_kwargs(tmp):
    def edit(p):
        p["plan"]["conv2"]["spec"]["kwargs"]["device"] = "meta"
        p["plan"]["conv2"]["spec"]["args"][1] += 0  # same size: only the argument is foreign
    path = _edited_merged(tmp, edit)
    target = SmallNet()
    return {"model": target, "file": path, "run": lambda: cdd_plugin.load_merged(path, target)}


def c_total_loss_eval(tmp):
    from cdd_plugin.distill import total_loss
    teacher, student = SmallNet(), SmallNet()
    st = cdd_plugin.insert_dgc(student, X, CDDConfig(sites="all"))
    d = cdd_plugin.CDDDistiller(student, teacher, st).eval()
    return {"run": lambda: total_loss(d(X, torch.tensor([0, 1])))}


def c_paper_without_blocks(tmp):
    m = SmallNet()
    return {"model": m, "run": lambda: cdd_plugin.insert_dgc(m, X, CDDConfig())}


CASES = [
    ("config-ratio", None, lambda: CDDConfig(sites="all", ratio=0), cdd_plugin.ConfigError, "ratio=0.5"),
    ("config-k", None, lambda: CDDConfig(sites="all", k=0), cdd_plugin.ConfigError, "k=2"),
    ("config-criterion", None, lambda: CDDConfig(sites="all", criterion="l1"), cdd_plugin.ConfigError, "one of rggr"),
    ("config-metric", None, lambda: CDDConfig(sites="all", metric="dot"), cdd_plugin.ConfigError, "one of cosine"),
    ("config-unknown-key", None, lambda: CDDConfig.from_dict({"lamda": 1}), cdd_plugin.ConfigError, "valid keys"),
    ("config-norm-no-target", None, lambda: CDDConfig(sites="all", criterion="norm"), cdd_plugin.ConfigError, "set flops_target"),
    ("loss-negative", None, lambda: LossConfig(feat_weight=-1), cdd_plugin.ConfigError, "use 0"),
    ("surgery-shape", c_wrong_shape, None, cdd_plugin.SurgeryError, "pass a small batch shaped like"),
    ("surgery-twice", c_twice, None, cdd_plugin.SurgeryError, "call it once per model"),
    ("surgery-nothing", c_nothing_to_prune, None, cdd_plugin.SurgeryError, "no prunable layer"),
    ("surgery-untraceable", c_untraceable, None, cdd_plugin.SurgeryError, "customized pruner"),
    ("merge-no-dgc", c_merge_plain, None, cdd_plugin.MergeError, "Call cdd_plugin.insert_dgc"),
    ("merge-twice", c_merge_twice, None, cdd_plugin.MergeError, "once"),
    ("save-unmerged", c_save_unmerged, None, cdd_plugin.MergeError, "result of cdd_plugin.merge"),
    ("load-wrong-arch", c_load_wrong_arch, None, ValueError, "same student architecture"),
    ("load-truncated", c_load_truncated, None, ValueError, "Re-export"),
    ("load-foreign", c_load_foreign, None, ValueError, "load it with the framework"),
    ("load-pickled-module", c_load_pickled_module, None, ValueError, "not a readable cdd_plugin merged model"),
    ("load-missing", c_load_missing, None, FileNotFoundError, "save_merged"),
    ("optim-missing-dgc", c_opt_missing_params, None, ValueError, "AFTER cdd_plugin.insert_dgc"),
    ("optim-twice", c_opt_twice, None, TypeError, "wrap the plain optimizer once"),
    ("nan-loss", c_nan_loss, None, FloatingPointError, "lower the learning rate"),
    ("state-other-arch", c_state_other_arch, None, ValueError, "same student architecture"),
    ("kd-class-mismatch", c_kd_classes, None, ValueError, "set kd_weight=0"),
    ("label-out-of-range", c_label_out_of_range, None, ValueError, "number of identities"),
    ("teacher-is-student", c_same_teacher, None, ValueError, "build a separate teacher"),
    ("selection-shapes", c_selection_shapes, None, ValueError, "pool each layer"),
    ("market-missing", c_market_missing, None, FileNotFoundError, "no_market"),
    ("truncated-image", c_truncated_image, None, OSError, "0001_c1s1_000001_00.jpg"),
    # no silent corruption: every setting typed and finite at config time, naming the key
    ("config-inf-lasso", None, lambda: CDDConfig(lasso=float("inf")), cdd_plugin.ConfigError, "lasso=0.004"),
    ("config-nan-threshold", None, lambda: CDDConfig(threshold=float("nan")), cdd_plugin.ConfigError, "threshold"),
    ("config-text-lasso", None, lambda: CDDConfig(lasso="four"), cdd_plugin.ConfigError, "finite number"),
    ("config-fractional-k", None, lambda: CDDConfig(k=2.5), cdd_plugin.ConfigError, "whole number"),
    ("config-bool-number", None, lambda: CDDConfig(queue_size=True), cdd_plugin.ConfigError, "queue_size"),
    ("config-sites", None, lambda: CDDConfig(sites="every"), cdd_plugin.ConfigError, "'paper'"),
    ("loss-text-temperature", None, lambda: LossConfig(temperature="warm"), cdd_plugin.ConfigError, "temperature"),
    ("loss-feat-tap", None, lambda: LossConfig(feat_tap="middle"), cdd_plugin.ConfigError, "'before'"),
    ("loss-pairs", None, lambda: LossConfig(pairs=["a:b"]), cdd_plugin.ConfigError, "teacher module"),
    # surgery: refused before anything changes, or rolled back completely
    ("surgery-fails-late", c_surgery_fails_late, None, cdd_plugin.SurgeryError, "the model is unchanged"),
    ("surgery-meta-device", c_surgery_meta, None, cdd_plugin.SurgeryError, "materialised"),
    ("surgery-nan-inputs", c_surgery_nan_inputs, None, cdd_plugin.SurgeryError, "finite batch"),
    ("surgery-huge-inputs", c_surgery_huge_inputs, None, cdd_plugin.SurgeryError, "scale of the training input"),
    ("surgery-dict-config", c_surgery_dict_cfg, None, cdd_plugin.SurgeryError, "CDDConfig.from_dict"),
    ("surgery-dict-inputs", c_surgery_dict_inputs, None, cdd_plugin.SurgeryError, "tuple"),
    ("surgery-paper-no-blocks", c_paper_without_blocks, None, cdd_plugin.SurgeryError, "sites='all'"),
    ("ignored-unknown-name", c_ignored_unknown_name, None, cdd_plugin.SurgeryError, "named_modules"),
    ("ignored-foreign-module", c_ignored_foreign_module, None, cdd_plugin.SurgeryError, "model's own modules"),
    ("ignored-wrong-type", c_ignored_wrong_type, None, cdd_plugin.SurgeryError, "ignored_layers=[model.fc]"),
    # resume: everything checked, then everything loaded
    ("state-other-queue", c_state_other_queue, None, ValueError, "same queue_size"),
    ("optim-other-groups", c_optim_other_groups, None, ValueError, "build the optimizer exactly as"),
    ("optim-plain-state", c_optim_plain_state, None, ValueError, "resume from a checkpoint written by the CDD run"),
    # merge and files: exact or refused; the previous good file survives
    ("merge-nan-compactor", c_merge_nan_compactor, None, cdd_plugin.MergeError, "bn2.cdd_dgc"),
    ("merge-wrong-inputs", c_merge_wrong_inputs, None, cdd_plugin.MergeError, "merge's example_inputs"),
    ("save-meta-object", c_save_meta_object, None, cdd_plugin.MergeError, "numbers, strings"),
    ("save-read-only", c_save_read_only, None, PermissionError, "chmod u+w"),
    ("save-folder-is-a-file", c_save_into_a_file_as_folder, None, OSError, "choose a writable folder"),
    ("load-edited-shape", c_load_edited_shape, None, ValueError, "same student architecture"),
    ("load-injected-kwargs", c_load_injected_kwargs, None, ValueError, "never has"),
    ("total-loss-eval", c_total_loss_eval, None, TypeError, "distiller.train()"),
]


@pytest.mark.parametrize("name,make,action,exc,fix", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_with_the_fix_and_nothing_is_lost(tmp_path, name, make, action, exc, fix):
    ctx = make(str(tmp_path)) if make else {"run": action}
    snap = _snapshot(ctx["model"]) if "model" in ctx else None
    state = ctx.get("state")
    state_before = (state.iteration, {n: m.clone() for n, m in state.masks().items()}) if state is not None else None
    files = {ctx["file"]: _file_bytes(ctx["file"])} if "file" in ctx else {}
    with pytest.raises(exc) as info:
        ctx["run"]()
    assert fix in str(info.value), f"message does not name the fix: {info.value}"
    assert ".tmp" not in str(info.value), f"the message names a temporary file instead of the user's: {info.value}"
    if snap is not None:
        assert _same(ctx["model"], snap), "the user's model was changed"
    if state is not None:
        assert state.iteration == state_before[0], "the CDD schedule was changed"
        assert all(torch.equal(m, state_before[1][n]) for n, m in state.masks().items()), "masks were changed"
    for path, data in files.items():
        assert _file_bytes(path) == data, "the user's file was changed"
        assert not [f for f in os.listdir(os.path.dirname(path)) if f.endswith(".tmp")], "a temporary file was left"
    if "after" in ctx:  # the corrected call works on the object the failed one was given
        ctx["after"]()


def test_numbers_given_as_text_convert_when_they_convert_cleanly():
    import yaml

    cfg = CDDConfig.from_dict(yaml.safe_load("lasso: 4e-3\nthreshold: 1e-5\nk: '2'\nsnap_to_zero: 'false'"))
    assert (cfg.lasso, cfg.threshold, cfg.k, cfg.snap_to_zero) == (0.004, 1e-5, 2, False)
    assert isinstance(cfg.lasso, float) and isinstance(cfg.k, int)
    assert LossConfig(temperature="2").temperature == 2.0


def test_a_nan_compactor_row_counts_as_kept_like_merge_counts_it():
    m, st = _with_dgc()
    d = st.compactors["bn2.cdd_dgc"]
    d.zero_([0, 1])
    before = st.kept_channels()["bn2.cdd_dgc"]
    d.weight.data[0, 0] = float("nan")  # row 0 was cut; a NaN makes it neither zero nor below the threshold
    assert st.kept_channels()["bn2.cdd_dgc"] == before + 1


def test_meta_of_numpy_scalars_and_paths_is_stored_loadably(tmp_path):
    import pathlib

    import numpy as np

    m, _ = _with_dgc()
    path = str(tmp_path / "m.pth")
    cdd_plugin.save_merged(cdd_plugin.merge(m), path, meta={"mAP": np.float64(97.9), "n": np.int64(3),
                                                            "src": pathlib.Path("/data"), "size": (3, 16, 16)})
    meta = cdd_plugin.read_merged(path)["meta"]
    assert meta == {"mAP": 97.9, "n": 3, "src": "/data", "size": [3, 16, 16]}
    assert type(meta["mAP"]) is float and type(meta["n"]) is int
    cdd_plugin.load_merged(path, SmallNet())


def test_merge_of_a_half_precision_model_is_exact_in_that_precision():
    m, st = _with_dgc()
    st.compactors["bn2.cdd_dgc"].zero_([0, 3])
    m.eval()
    ref = cdd_plugin.merge(m)
    half = cdd_plugin.merge(m.half())
    assert next(half.parameters()).dtype == torch.float16
    with torch.no_grad():
        a, b = ref(X)[0], half.float()(X)[0]
    assert (a - b).abs().max() <= 1e-2 * a.abs().max()
