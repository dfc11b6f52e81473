"""Which PyTorch CPU inference form lifts the merged model's batch-1 speed-up? (experiment, not shipped)

    python benchmarks/results/speed_2026-12-01c/lat_levers.py [eager] [mkldnn_conv] [jit_ofi] [compile]
"""
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/ (bench_speed, tradeoff_common)
import torch  # noqa: E402
import torchvision  # noqa: E402
import cdd_plugin  # noqa: E402
from bench_speed import _compressed, _fold_bn  # noqa: E402
from cdd_plugin.deploy import interleaved_latency  # noqa: E402

torch.set_num_threads(2)
size = (256, 128)
keep = 0.35
torch.manual_seed(0)
dense = torchvision.models.resnet50().eval()
which = sys.argv[1:] or ["eager", "mkldnn_conv", "jit_ofi", "compile"]
res = _compressed(dense, size, keep, 8, residual=True)[1]
x1 = torch.randn(1, 3, *size)
fd = cdd_plugin.profile(dense, x1)["flops"]; fr = cdd_plugin.profile(res, x1)["flops"]
factor = fd / fr
print(f"FLOPs factor {factor:.3f}", flush=True)
models = {"dense": _fold_bn(dense), "res": _fold_bn(res)}


class MkldnnConv(torch.nn.Module):
    """a Conv2d that always takes oneDNN's path (PyTorch's heuristic sends small inputs at batch 1 to im2col)"""
    def __init__(self, c):
        super().__init__()
        self.w = c.weight.detach(); self.b = None if c.bias is None else c.bias.detach()
        self.p, self.s, self.d, self.g = c.padding, c.stride, c.dilation, c.groups
    def forward(self, x):
        return torch.mkldnn_convolution(x, self.w, self.b, self.p, self.s, self.d, self.g)


def force_mkldnn(m):
    m = copy.deepcopy(m)
    for mod in list(m.modules()):
        for cn, c in list(mod.named_children()):
            if isinstance(c, torch.nn.Conv2d):
                setattr(mod, cn, MkldnnConv(c))
    return m


def variants(kind, m):
    if kind == "eager":
        return m
    if kind == "mkldnn_conv":
        return force_mkldnn(m)
    if kind == "compile":
        import torch._inductor.config as ic
        ic.freezing = True
        return torch.compile(m)
    if kind == "jit_ofi":
        with torch.no_grad():
            t = torch.jit.trace(m, x1)
        return torch.jit.optimize_for_inference(torch.jit.freeze(t.eval()))
    raise ValueError(kind)


for kind in which:
    for b in (1, 32):
        xb = torch.randn(b, 3, *size)
        nets = {k: variants(kind, m) for k, m in models.items()}
        fns = {}
        for k, n in nets.items():
            def mk(n=n):
                def f():
                    with torch.no_grad():
                        n(xb)
                return f
            fns[k] = mk()
        t0 = time.time()
        for f in fns.values():
            f(); f()
        lat = interleaved_latency(fns, rounds=5 if b == 1 else 3, runs=5 if b == 1 else 2)
        sp = lat["dense"] / lat["res"]
        print(f"{kind:12s} b{b:<3d} dense {lat['dense']:7.2f} ms  residual-merged {lat['res']:7.2f} ms  "
              f"speed-up x{sp:.2f}  / FLOPs factor = {sp / factor:.2f}   (warm-up {time.time() - t0:.0f} s)",
              flush=True)
