"""torch.distributed (gloo, 2 CPU processes): every rank computes the masks of the global batch."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import cdd_plugin
from cdd_plugin import CDDConfig, RGGROptimizer

from nets import SmallNet

CFG = dict(criterion="rggr", ratio=0.7, k=2, queue_size=40, lasso=0.05, flops_target=0.5)
STEPS = 5


def _batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 5, (8,), generator=g)


def _build():
    torch.manual_seed(0)
    net = SmallNet()
    state = cdd_plugin.insert_dgc(net, torch.randn(2, 3, 16, 16), CDDConfig(sites="all", **CFG))
    # BatchNorm on running statistics: a sample's features do not depend on which rank's
    # batch it sits in, so one process over the global batch is an exact reference
    net.eval()
    return net, state


def _step(model, state, opt, x, y):
    state.capture(True)
    logits, _ = model(x)
    state.observe()
    opt.zero_grad()
    F.cross_entropy(logits, y).backward()
    opt.step()


def _run(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        net, state = _build()
        model = DDP(net)
        opt = RGGROptimizer(torch.optim.SGD(net.parameters(), lr=0.05), state)
        for step in range(STEPS):
            x, y = _batch(step)
            per = len(x) // world
            _step(model, state, opt, x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per])
        torch.save({"weights": {k: v.clone() for k, v in net.state_dict().items()},
                    "masks": {n: d.mask.clone() for n, d in state.compactors.items()},
                    "queues": {n: q.bank().clone() for n, q in state.queues.items()}}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_agree_with_each_other_and_with_one_process_over_the_global_batch(tmp_path):
    mp.spawn(_run, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    net, state = _build()
    opt = RGGROptimizer(torch.optim.SGD(net.parameters(), lr=0.05), state)
    for step in range(STEPS):
        _step(net, state, opt, *_batch(step))
    for n in r0["masks"]:
        assert torch.equal(r0["masks"][n], r1["masks"][n]), f"ranks disagree on {n}"
        assert torch.equal(r0["queues"][n], r1["queues"][n]), f"ranks hold different queues at {n}"
        assert torch.equal(r0["masks"][n], state.compactors[n].mask), f"{n} differs from the single-process run"
        assert torch.allclose(r0["queues"][n], state.queues[n].bank(), atol=1e-6)
    for k, v in net.state_dict().items():
        assert torch.allclose(r0["weights"][k], v, atol=1e-5), k
    assert any((m == 0).any() for m in r0["masks"].values()), "no channel was masked"
    # queues hold the whole global batch of every step (8 images x 5 steps = 40 = queue size)
    assert all(q.shape[0] == 8 * STEPS for q in r0["queues"].values())
