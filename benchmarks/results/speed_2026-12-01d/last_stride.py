"""Batch-1 latency of the synthetic cut (bench_speed.py, round_to=8, with and without residual groups) on
ResNet-50 with the last stage at stride 2 (torchvision, the study) and at stride 1 (FastReID's and the
authors' re-ID default), every model BN-folded, timed in alternation.

    python benchmarks/results/speed_2026-12-01d/last_stride.py BATCH ROUNDS
"""
import os
import sys

import torch
import torchvision

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import bench_speed as bs  # noqa: E402
import cdd_plugin  # noqa: E402
from cdd_plugin.deploy import latency_table  # noqa: E402

torch.set_num_threads(2)
size = (256, 128)
b = int(sys.argv[1]); rounds = int(sys.argv[2])
def net(ls):
    torch.manual_seed(0)
    m = torchvision.models.resnet50()
    if ls == 1:
        m.layer4[0].conv2.stride = (1, 1); m.layer4[0].downsample[0].stride = (1, 1)
    m.fc = torch.nn.Identity()
    return m.eval()
x = torch.randn(1, 3, *size)
models, fac = {}, {}
for ls in (2, 1):
    d = net(ls)
    fd = cdd_plugin.profile(d, x)["flops"]
    models[f"dense{ls}"] = bs._fold_bn(d)
    for tag, resid in (("m", False), ("r", True)):
        _, mm = bs._compressed(d, size, 0.35, round_to=8, residual=resid)
        fac[f"{tag}{ls}"] = fd / cdd_plugin.profile(mm, x)["flops"]
        models[f"{tag}{ls}"] = bs._fold_bn(mm)
t = latency_table(models, (3, *size), batches=(b,), rounds=rounds, runs=2)[f"batch{b}"]
for ls in (2, 1):
    for tag in ("m", "r"):
        for rt in ("torch", "ort"):
            d, r = t[f"{rt}_dense{ls}"], t[f"{rt}_{tag}{ls}"]
            print(f"b{b} last_stride {ls} {'residual' if tag=='r' else 'plain   '} {rt:5s} dense {d:7.1f} merged {r:7.1f} x{d/r:.2f} / {fac[tag+str(ls)]:.2f} = {d/r/fac[tag+str(ls)]:.2f}", flush=True)
