"""Per-iteration training time of CDD against FastReID's own Distiller, same teacher and student.

Both meta-architectures are built by FastReID from a config: ``Distiller`` (FastReID's
logit distillation, ``KD.MODEL_CONFIG`` / ``KD.MODEL_WEIGHTS``) and ``CDDDistiller`` (this
adapter: DGCs, feature + logit distillation, RGGR, the per-iteration ``CDDLogHook``
figures). Each gets FastReID's SGD optimizer (``contiguous=False``); CDD's is wrapped in
``RGGROptimizer``. The CDD memory queues are filled to ``--queue`` entries first, so the
retrieval step costs what it does in a long run. One iteration = forward, loss, backward,
optimizer step on the same fixed batch (data loading is the same for both and is left
out). The same CDD model is timed with its masks refreshed at every iteration (the
paper's ``MASK_INTERVAL 1``: a retrieval over every queue) and without a refresh (the
warm-up epochs, or the iterations between refreshes); the variants run one iteration at a
time in turn so that they share the machine's noise, and ratios of medians are printed,
with the amortised ratio for a few ``CDD.MASK_INTERVAL`` values.

    python benchmarks/bench_fastreid_overhead.py                 # R50 -> R50, 128x64, batch 16
    python benchmarks/bench_fastreid_overhead.py --threads 1         # steadier on a shared machine
    python benchmarks/bench_fastreid_overhead.py --depth 18x --size 256 128 --iters 20

The target is CDD / Distiller <= 1.15 on the CPU.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", default="50x", choices=["18x", "34x", "50x", "101x"], help="teacher and student depth")
    p.add_argument("--size", type=int, nargs=2, default=[128, 64], metavar=("H", "W"), help="input size")
    p.add_argument("--batch", type=int, default=16, help="images per iteration (4 per identity)")
    p.add_argument("--classes", type=int, default=751, help="identities (Market-1501 has 751)")
    p.add_argument("--queue", type=int, default=24000, help="CDD memory queue size (the paper's default)")
    p.add_argument("--iters", type=int, default=10, help="timed iterations per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations per variant")
    p.add_argument("--block", type=int, default=1, help="iterations per alternating block")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return p.parse_args(argv)


def base_cfg(args, cdd_node=True):
    from cdd_plugin.integrations.fastreid import add_cdd_config
    from fastreid.config import get_cfg

    cfg = add_cdd_config(get_cfg()) if cdd_node else get_cfg()  # FastReID's Distiller reads plain configs
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.DEPTH = args.depth
    cfg.MODEL.BACKBONE.FEAT_DIM = 512 if args.depth in ("18x", "34x") else 2048
    cfg.MODEL.BACKBONE.PRETRAIN = False
    cfg.MODEL.HEADS.NUM_CLASSES = args.classes
    cfg.MODEL.HEADS.WITH_BNNECK = True
    cfg.MODEL.LOSSES.NAME = ("CrossEntropyLoss", "TripletLoss")
    cfg.MODEL.LOSSES.CE.EPSILON = 0.1
    cfg.MODEL.LOSSES.TRI.HARD_MINING = True
    cfg.INPUT.SIZE_TRAIN = list(args.size)
    cfg.INPUT.SIZE_TEST = list(args.size)
    cfg.SOLVER.OPT = "SGD"
    cfg.SOLVER.BASE_LR = 0.01
    return cfg


def build(args, tmp):
    from cdd_plugin.integrations.fastreid import CDDTrainer
    from cdd_plugin.integrations.fastreid.meta_arch import find_cdd
    from fastreid.modeling.meta_arch import build_model
    from fastreid.solver import build_optimizer

    teacher_cfg = base_cfg(args, cdd_node=False)
    teacher = build_model(teacher_cfg)
    teacher_yml, teacher_pth = os.path.join(tmp, "teacher.yml"), os.path.join(tmp, "teacher.pth")
    with open(teacher_yml, "w") as f:
        f.write(teacher_cfg.dump())
    torch.save({"model": teacher.state_dict()}, teacher_pth)
    del teacher

    kd_cfg = base_cfg(args, cdd_node=False)
    kd_cfg.MODEL.META_ARCHITECTURE = "Distiller"
    kd_cfg.KD.MODEL_CONFIG = [teacher_yml]
    kd_cfg.KD.MODEL_WEIGHTS = [teacher_pth]
    kd = build_model(kd_cfg)
    kd_opt, _ = build_optimizer(kd_cfg, kd, contiguous=False)

    cdd_cfg = base_cfg(args)
    cdd_cfg.MODEL.META_ARCHITECTURE = "CDDDistiller"
    cdd_cfg.CDD.TEACHER.CONFIG = teacher_yml
    cdd_cfg.CDD.TEACHER.WEIGHTS = teacher_pth
    cdd_cfg.CDD.QUEUE_SIZE = args.queue
    cdd_cfg.CDD.MASK_START = 0
    cdd_cfg.CDD.MASK_START_UNIT = "iter"
    cdd = CDDTrainer.build_model(cdd_cfg)
    cdd_opt, _ = CDDTrainer.build_optimizer(cdd_cfg, cdd)
    state = find_cdd(cdd).state
    g = torch.Generator().manual_seed(0)
    for name, queue in state.queues.items():  # steady state of a long run: full queues
        queue.push(torch.rand(args.queue, queue.channels, generator=g))
    return (kd, kd_opt), (cdd, cdd_opt, state)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import cdd_plugin.integrations.fastreid  # noqa: F401  (FastReID compatibility + registration)
    from cdd_plugin.integrations.fastreid.hooks import CDDLogHook
    from fastreid.utils.events import EventStorage

    torch.manual_seed(0)
    ids = max(args.batch // 4, 2)
    images = torch.rand(args.batch, 3, *args.size) * 255.0
    targets = torch.arange(ids).repeat_interleave(args.batch // ids)[: args.batch]
    targets = torch.cat([targets, targets[: args.batch - len(targets)]])

    with tempfile.TemporaryDirectory() as tmp:
        (kd, kd_opt), (cdd, cdd_opt, state) = build(args, tmp)
        log_hook = CDDLogHook(state, 1)

        def step(model, opt, log=None):
            model.train()
            t0 = time.perf_counter()
            losses = model({"images": images.clone(), "targets": targets})  # Distiller normalises in place
            opt.zero_grad()
            sum(losses.values()).backward()
            opt.step()
            if log is not None:  # what CDDLogHook adds to every iteration (CDD.LOG_PERIOD 1)
                log.state.summary()
            return time.perf_counter() - t0

        def schedule(refresh: bool):
            # the same CDD model with masks refreshed at this iteration (RGGR's retrieval over the
            # full queues) or not (warm-up epochs, or iterations between refreshes)
            state.cfg.mask_start = 0 if refresh else 10 ** 9
            state.cfg.mask_interval = 1

        variants = {
            "fastreid_distiller": lambda: step(kd, kd_opt),
            "cdd_refresh": lambda: (schedule(True), step(cdd, cdd_opt, log_hook))[1],
            "cdd_no_refresh": lambda: (schedule(False), step(cdd, cdd_opt, log_hook))[1],
        }
        times = {k: [] for k in variants}
        with EventStorage(0):  # both log into FastReID's storage, as inside its trainer
            for name, run in variants.items():
                for _ in range(args.warmup):
                    run()
            while min(len(v) for v in times.values()) < args.iters:
                for name, run in variants.items():  # alternate, so all variants share the machine's noise
                    for _ in range(args.block):
                        times[name].append(run())
        masked = state.summary()["channels_total"] - sum(state.active_channels().values())

    med = {k: statistics.median(v[: args.iters]) for k, v in times.items()}
    base = med["fastreid_distiller"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ResNet-{args.depth[:-1]} teacher -> "
          f"ResNet-{args.depth[:-1]} student, input {args.size[0]}x{args.size[1]}, batch {args.batch}, "
          f"{args.classes} classes, CDD queue {args.queue} per site (full), {len(state.sites)} DGC sites")
    for k, v in times.items():
        v = v[: args.iters]
        print(f"  {k:<20} median {1000 * med[k]:9.1f} ms/iter  (min {1000 * min(v):.1f}, max {1000 * max(v):.1f}, "
              f"n={len(v)})  ratio {med[k] / base:.3f}")
    refresh = med["cdd_refresh"] - med["cdd_no_refresh"]
    print(f"  RGGR mask refresh alone: {1000 * refresh:.1f} ms; channels masked during the run: {masked}")
    spread = max(statistics.pstdev(v[: args.iters]) / statistics.mean(v[: args.iters]) for v in times.values())
    if refresh < 0 or spread > 0.15:
        print(f"  note: timings vary by up to {100 * spread:.0f}% between iterations (a busy machine); rerun with "
              "--threads 1 and more --iters before trusting the ratios")
    for n in (1, 10, 100):
        amortised = (med["cdd_no_refresh"] + refresh / n) / base
        print(f"  CDD.MASK_INTERVAL {n:<4} -> CDD / FastReID Distiller = {amortised:.3f} ({100 * (amortised - 1):+.1f}%)")
    ratio = med["cdd_refresh"] / base
    print(f"overhead ratio CDD (paper setting: refresh every iteration) / FastReID Distiller = {ratio:.3f} "
          f"({100 * (ratio - 1):+.1f}%; target <= +15%)")
    return ratio


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
