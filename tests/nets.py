"""Networks and assertions shared by the tests (imported as ``nets``; conftest.py puts tests/ on the path)."""
import torch
import torch.nn.functional as F
from torch import nn

import cdd_plugin


class SmallNet(nn.Module):
    def __init__(self, width=16, classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, stride=2, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        emb = F.relu(self.bn3(self.conv3(x))).mean((2, 3))
        return self.fc(emb), emb



def randomise(model: nn.Module, state, frac=0.5, seed=0):
    """Train-like perturbation: non-identity DGCs, real BN statistics, half the channels zeroed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for d in state.compactors.values():
            d.weight.add_(0.05 * torch.randn(d.weight.shape, generator=g))
            n = int(frac * d.channels)
            d.zero_(torch.randperm(d.channels, generator=g)[:n].tolist())
    randomise_bn(model, g)


def randomise_bn(model: nn.Module, g=0):
    """Trained-like BatchNorm statistics and affine parameters (``g``: a generator or a seed)."""
    g = g if isinstance(g, torch.Generator) else torch.Generator().manual_seed(g)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)


def check_exact(model, state, x, rel=1e-4):
    """Merge; the merged output (the last one of a tuple) equals the trained one within ``rel`` of its
    largest value, no compactor is left, and the FLOPs are the predicted ones. Returns the merged model."""
    model.eval()
    with torch.no_grad():
        y = model(x)
    merged = cdd_plugin.merge(model)
    with torch.no_grad():
        y2 = merged(x)
    y, y2 = (y[-1], y2[-1]) if isinstance(y, (list, tuple)) else (y, y2)
    assert y.shape == y2.shape
    err = (y - y2).abs().max().item()
    assert err <= rel * y.abs().max().item(), f"merge changed the output by {err}"
    assert not any(isinstance(m, cdd_plugin.DGC) for m in merged.modules())
    flops = cdd_plugin.profile(merged, x[:1])["flops"]  # FLOPs per image, counted at batch 1
    assert flops == state.predicted_flops()
    return merged


