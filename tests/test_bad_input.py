"""Bad input, as a table: every case raises a clear error that names the fix, and nothing the
user had (model, checkpoint, file) is lost or silently changed."""
import copy
import os

import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

import cdd_plugin
from cdd_plugin import CDDConfig, LossConfig
from cdd_plugin.rggr import select_unimportant

from test_rggr_state import SmallNet

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model, snap):
    sd = model.state_dict()
    return set(sd) == set(snap) and all(torch.equal(sd[k], snap[k]) for k in snap)


def _with_dgc():
    torch.manual_seed(0)
    net = SmallNet()
    return net, cdd_plugin.insert_dgc(net, X)


# Each case: (id, make, action, exception, message fragment that names the fix).
# `make(tmp)` returns a context dict; `action(ctx)` triggers the error; ctx["model"], if
# present, must be unchanged afterwards, and ctx["file"], if present, must still be there.
def c_wrong_shape(tmp):
    m = SmallNet()
    return {"model": m, "run": lambda: cdd_plugin.insert_dgc(m, torch.randn(2, 1, 16, 16))}


def c_twice(tmp):
    m, _ = _with_dgc()
    return {"model": m, "run": lambda: cdd_plugin.insert_dgc(m, X)}


def c_nothing_to_prune(tmp):
    m = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4))
    return {"model": m, "run": lambda: cdd_plugin.insert_dgc(m, X)}


def c_untraceable(tmp):
    m = torchvision.models.shufflenet_v2_x0_5(num_classes=4)
    return {"model": m, "run": lambda: cdd_plugin.insert_dgc(m, torch.randn(2, 3, 32, 32))}


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
    st_b = cdd_plugin.insert_dgc(other, X)
    return {"model": other, "run": lambda: st_b.load_state_dict(st_a.state_dict())}


def c_kd_classes(tmp):
    teacher, student = SmallNet(classes=7), SmallNet(classes=5)
    st = cdd_plugin.insert_dgc(student, X)
    d = cdd_plugin.CDDDistiller(student, teacher, st).train()
    return {"run": lambda: d(torch.randn(4, 3, 16, 16), torch.tensor([0, 0, 1, 1]))}


def c_label_out_of_range(tmp):
    teacher, student = SmallNet(classes=5), SmallNet(classes=5)
    st = cdd_plugin.insert_dgc(student, X)
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


CASES = [
    ("config-ratio", None, lambda: CDDConfig(ratio=0), cdd_plugin.ConfigError, "ratio=0.5"),
    ("config-k", None, lambda: CDDConfig(k=0), cdd_plugin.ConfigError, "k=2"),
    ("config-criterion", None, lambda: CDDConfig(criterion="l1"), cdd_plugin.ConfigError, "one of rggr"),
    ("config-metric", None, lambda: CDDConfig(metric="dot"), cdd_plugin.ConfigError, "one of cosine"),
    ("config-unknown-key", None, lambda: CDDConfig.from_dict({"lamda": 1}), cdd_plugin.ConfigError, "valid keys"),
    ("config-norm-no-target", None, lambda: CDDConfig(criterion="norm"), cdd_plugin.ConfigError, "set flops_target"),
    ("loss-negative", None, lambda: LossConfig(feat_weight=-1), cdd_plugin.ConfigError, "use 0"),
    ("surgery-shape", c_wrong_shape, None, cdd_plugin.SurgeryError, "pass a small batch shaped like"),
    ("surgery-twice", c_twice, None, cdd_plugin.SurgeryError, "call it once per model"),
    ("surgery-nothing", c_nothing_to_prune, None, cdd_plugin.SurgeryError, "no prunable layer"),
    ("surgery-untraceable", c_untraceable, None, cdd_plugin.SurgeryError, "ignored_layers"),
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
]


@pytest.mark.parametrize("name,make,action,exc,fix", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_with_the_fix_and_nothing_is_lost(tmp_path, name, make, action, exc, fix):
    ctx = make(str(tmp_path)) if make else {"run": action}
    snap = _snapshot(ctx["model"]) if "model" in ctx else None
    files = {ctx["file"]: os.path.getsize(ctx["file"])} if "file" in ctx else {}
    with pytest.raises(exc) as info:
        ctx["run"]()
    assert fix in str(info.value), f"message does not name the fix: {info.value}"
    if snap is not None:
        assert _same(ctx["model"], snap), "the user's model was changed"
    for path, size in files.items():
        assert os.path.getsize(path) == size, "the user's file was changed"
