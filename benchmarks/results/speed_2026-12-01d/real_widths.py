"""Latency of merged ResNet-50s with the widths CDD really produced in the trade-off study, against the
widths of bench_speed.py's synthetic cut, every model BN-folded, timed at 256x128 in alternation.

    python benchmarks/results/speed_2026-12-01d/real_widths.py RECIPE_MERGED.pth RESIDUAL_MERGED.pth [THREADS]

RECIPE_MERGED.pth / RESIDUAL_MERGED.pth: merged rows saved by bench_tradeoff.py (``cdd_rggr`` and
``abl_live_p09_residual``; the study trains at 64x32, and widths do not depend on the input size).
Each real model is also timed with its widths rounded up to a multiple of 8 (what ``round_to=8``
gives: zero rows, the function unchanged; here random weights, since only shapes set the speed).
"""
import math
import os
import sys

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.abspath(os.path.join(HERE, "..", "..")))
import bench_speed as bs  # noqa: E402
import tradeoff_common as tc  # noqa: E402

import cdd_plugin  # noqa: E402
from cdd_plugin.deploy import latency_table  # noqa: E402


class Embedding(nn.Module):
    """What a re-ID deployment runs: backbone and BN neck, no classifier."""

    def __init__(self, net):
        super().__init__()
        self.backbone, self.neck = net.backbone, net.neck

    def forward(self, x):
        return self.neck(self.backbone(x))


def rounded(model, to=8):
    """A copy with every convolution's and BatchNorm's channels rounded up to a multiple of ``to``
    (the image input stays 3); random weights."""
    up = lambda c: c if c == 3 else int(math.ceil(c / to) * to)  # noqa: E731
    model = __import__("copy").deepcopy(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Conv2d):
            new = nn.Conv2d(up(m.in_channels), up(m.out_channels), m.kernel_size, m.stride, m.padding,
                            bias=m.bias is not None)
        elif isinstance(m, nn.BatchNorm2d):
            new = nn.BatchNorm2d(up(m.num_features))
        else:
            continue
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        setattr(parent, name.rpartition(".")[2], new)
    return model.eval()


def main():
    torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 2)
    size = (256, 128)
    x = torch.randn(1, 3, *size)
    dense = Embedding(tc.ReIDNet("resnet50", 100)).eval()
    models = {"dense": dense}
    for tag, path in zip(("recipe", "residual"), sys.argv[1:3]):
        m = Embedding(cdd_plugin.load_merged(path, tc.ReIDNet("resnet50", 100))).eval()
        models[tag], models[tag + "_r8"] = m, rounded(m)
    torch.manual_seed(0)
    _, synth = bs._compressed(tc.ReIDNet("resnet50", 100).eval().backbone, size, 0.35, round_to=8, residual=True)
    models["synthetic_r8"] = synth.eval()
    flops = {k: cdd_plugin.profile(m, x)["flops"] for k, m in models.items()}
    models = {k: bs._fold_bn(m) for k, m in models.items()}
    for k, m in models.items():
        convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
        print(f"{k:14s} FLOPs {flops[k] / 1e9:.3f} G (x{flops['dense'] / flops[k]:.2f}); widths "
              + " ".join(str(c.out_channels) for c in convs), flush=True)
    for b in (1, 32):
        t = latency_table(models, (3, *size), batches=(b,), rounds=8 if b == 1 else 4, runs=2)[f"batch{b}"]
        for rt in ("torch", "ort"):
            for k in models:
                if k == "dense":
                    continue
                d, r, fac = t[f"{rt}_dense"], t[f"{rt}_{k}"], flops["dense"] / flops[k]
                print(f"b{b:<3d}{rt:6s}{k:14s} dense {d:8.1f} ms  merged {r:8.1f} ms  speed-up x{d / r:.2f}  "
                      f"/ FLOPs factor {fac:.2f} = {d / r / fac:.2f}", flush=True)


if __name__ == "__main__":
    main()
