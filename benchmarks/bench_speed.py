"""Speed of every CDD stage, side by side in one run, as ratios.

    python benchmarks/bench_speed.py [--quick] [--memory] [--json PATH] [--arch resnet50] [--input 256x128] [--batch 16]
                                     [--sites all|paper] [--round-to N] [--residual]

1. training step: CDD + RGGR (DGCs, all losses, mask refresh every step) vs KD only
   (the same teacher, student and batch, no DGCs);
2. RGGR selection: vectorised vs the per-sample loop form;
3. latency of the merged student vs the unmerged student (with DGCs) vs the original
   dense student, set against the FLOPs ratio (channels zeroed to a 65% FLOPs cut by DGC
   norm, as at the end of CDD training: speed depends on shapes, not on how they were found);
   ``--residual`` adds the model whose residual streams are compacted too, cut to the same FLOPs;
4. time to merge a ResNet-50 and a ResNet-101;
5. peak training memory and checkpoint size of KD and CDD (placements, queue storage types,
   queues left out of checkpoints), each in its own process (``--memory`` runs only this).
"""
from __future__ import annotations

import argparse
import copy
import gc
import itertools
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import torchvision

import cdd_plugin
from cdd_plugin.distill import kd_loss, total_loss, triplet_loss
from cdd_plugin.rggr import select_unimportant, select_unimportant_loop
from tradeoff_common import ReIDNet  # the re-ID network of the trade-off study (same folder)


def _median_time(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


SITES = "all"  # --sites: the placement every measurement uses


def _variant_step(variant, teacher, x, y, queue, sites=None, queue_dtype="float32", checkpoint_queues=True,
                  pool=None):
    """A training step of one variant (built fresh): ``kd``, ``cdd`` (RGGR, masks refreshed
    every step) or ``cdd_no_refresh`` (criterion "none": compactors, taps, feature loss and
    lasso only). CDD queues are filled to their full size first, so a refresh searches all
    ``queue`` rows per site as in a long run (random rows: the cost does not depend on them).

    ``pool`` (optional): distinct input batches, one per step in turn, as in training. One batch
    repeated would queue identical teacher features, so every neighbour search would meet exact
    ties at its k-th neighbour and take the tie-breaking path that real data almost never needs."""
    student = copy.deepcopy(teacher).train().requires_grad_(True)  # CDDDistiller froze the shared teacher
    batches = itertools.cycle(pool if pool else [x])
    if variant == "kd":
        opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)

        def step():
            x = next(batches)
            with torch.no_grad():
                t_logits, _ = teacher(x)
            s_logits, s_emb = student(x)
            loss = (F.cross_entropy(s_logits, y, label_smoothing=0.1) + triplet_loss(s_emb, y)
                    + kd_loss(s_logits, t_logits, 2.0))
            opt.zero_grad()
            loss.backward()
            opt.step()
        step.checkpoint = lambda: {"model": student.state_dict(), "optimizer": opt.state_dict()}
        return step, None
    # no FLOPs target: the masks are refreshed at every step, never stopped by a met budget
    common = dict(queue_size=queue, sites=sites or SITES, queue_dtype=queue_dtype, checkpoint_queues=checkpoint_queues)
    cfg = (cdd_plugin.CDDConfig(mask_start=0, **common) if variant == "cdd"
           else cdd_plugin.CDDConfig(criterion="none", **common))
    state = cdd_plugin.insert_dgc(student, x[:2], cfg)
    gen = torch.Generator().manual_seed(1)
    for name, q in state.queues.items():
        q.push(torch.rand(queue, q.channels, generator=gen))
    distiller = cdd_plugin.CDDDistiller(student, teacher, state).train()
    opt = cdd_plugin.RGGROptimizer(torch.optim.SGD(cdd_plugin.param_groups(student, 0.01), lr=0.01, momentum=0.9),
                                   state)

    def step():
        losses = distiller(next(batches), y)
        opt.zero_grad()
        total_loss(losses).backward()
        opt.step()
    step.checkpoint = lambda: {"model": student.state_dict(), "optimizer": opt.state_dict()}
    return step, state


# --memory: (label, variant, placement, queue dtype, queues in checkpoints)
MEMORY_VARIANTS = [("KD", "kd", None, "float32", True),
                   ("CDD, authors' placement, float32 queues", "cdd", "paper", "float32", True),
                   ("CDD, authors' placement, bfloat16 queues", "cdd", "paper", "bfloat16", True),
                   ("CDD, authors' placement, queues left out", "cdd", "paper", "float32", False),
                   ("CDD, all sites, float32 queues", "cdd", "all", "float32", True),
                   ("CDD, all sites, bfloat16 queues", "cdd", "all", "bfloat16", True)]


def _memory_child(index, arch, size, batch, classes, queue, steps=2):
    """One variant in a fresh process: peak resident memory over ``steps`` training steps and
    the size of the checkpoint (model + optimizer state, which carries CDD's) it would write."""
    import resource
    import tempfile
    _, variant, sites, dtype, keep = MEMORY_VARIANTS[index]
    torch.manual_seed(0)
    teacher = ReIDNet(arch, classes).eval()
    x = torch.randn(batch, 3, *size)
    y = torch.arange(batch) % (batch // 4)
    step, _ = _variant_step(variant, teacher, x, y, queue, sites=sites, queue_dtype=dtype, checkpoint_queues=keep)
    for _ in range(steps):
        step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # kB on Linux
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ckpt.pth")
        torch.save(step.checkpoint(), path)
        size_b = os.path.getsize(path)
    return {"peak_rss_bytes": peak, "checkpoint_bytes": size_b}


def bench_memory(arch, size, batch, classes, queue):
    """Peak training memory and checkpoint size of every MEMORY_VARIANTS row, each in its own
    process (a process's peak never goes down, so variants cannot share one)."""
    import subprocess
    rows = []
    for i, (label, *_rest) in enumerate(MEMORY_VARIANTS):
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", str(i), "--arch", arch,
               "--input", f"{size[0]}x{size[1]}", "--batch", str(batch), "--queue", str(queue)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"memory measurement of {label!r} failed:\n{out.stderr[-2000:]}")
        rows.append({"variant": label, **json.loads(out.stdout.strip().splitlines()[-1])})
    kd = rows[0]
    for r in rows:
        r["checkpoint_extra_bytes"] = r["checkpoint_bytes"] - kd["checkpoint_bytes"]
        r["peak_rss_extra_bytes"] = r["peak_rss_bytes"] - kd["peak_rss_bytes"]
    return rows


def bench_step(arch, size, batch, classes, repeats, queue, rounds=3):
    """Step time of KD only, CDD + RGGR and CDD without refreshes.

    One student at a time: a variant is built, warmed up, timed for ``repeats`` steps and
    freed before the next one, in rounds (kd, cdd, no refresh, kd, ...) so that slow drifts
    of the machine hit all three. (Interleaving single steps of three live students in one
    process made whichever ran first after a switch ~0.5 s slower, an allocator effect that
    real training never sees.)"""
    torch.manual_seed(0)
    teacher = ReIDNet(arch, classes).eval()
    x = torch.randn(batch, 3, *size)
    y = torch.arange(batch) % (batch // 4)
    gen = torch.Generator().manual_seed(2)
    pool = [torch.randn(batch, 3, *size, generator=gen) for _ in range(2 + max(1, repeats // 2))]  # warm-up + timed
    times = {"kd": [], "cdd": [], "cdd_no_refresh": []}
    sites = 0
    for _ in range(rounds):
        for variant in times:
            step, state = _variant_step(variant, teacher, x, y, queue, pool=pool)
            if state is not None:
                sites = len(state.sites)
            times[variant].append(_median_time(step, max(1, repeats // 2), warmup=2))
            del step, state
            gc.collect()
    kd, cdd, no_refresh = (statistics.median(times[v]) for v in ("kd", "cdd", "cdd_no_refresh"))
    # what the compactors cost in FLOPs: a KD step is ~3 student forwards (fwd + bwd) + 1 teacher forward
    probe = copy.deepcopy(teacher)
    cdd_plugin.insert_dgc(probe, x[:2], cdd_plugin.CDDConfig(sites=SITES))
    f_student = cdd_plugin.profile(probe, x[:1], count_dgc=False)["flops"]
    f_dgc = cdd_plugin.profile(probe, x[:1])["flops"] - f_student
    return {"arch": arch, "input": list(size), "batch": batch, "sites": sites,
            "kd_step_s": kd, "cdd_step_s": cdd, "ratio": cdd / kd, "queue_size": queue,
            "cdd_no_refresh_step_s": no_refresh, "no_refresh_ratio": no_refresh / kd,
            "dgc_flops_per_image": f_dgc, "student_flops_per_image": f_student,
            "dgc_share_of_kd_step_flops": 3 * f_dgc / (4 * f_student)}


def bench_selection(batch, channels, bank, repeats):
    rows = []
    for C in channels:
        g = torch.Generator().manual_seed(C)
        profile = torch.logspace(0, -3, C)[torch.randperm(C, generator=g)]
        s = torch.rand(batch, C, generator=g) * profile
        t = torch.rand(batch, C, generator=g)
        b = torch.cat([torch.rand(bank - batch, C, generator=g), t])
        tv = _median_time(lambda: select_unimportant(s, t, b, 2, 0.5), repeats)
        tl = _median_time(lambda: select_unimportant_loop(s, t, b, 2, 0.5), max(1, repeats // 2), warmup=0)
        same = bool(torch.equal(select_unimportant(s, t, b, 2, 0.5), select_unimportant_loop(s, t, b, 2, 0.5)))
        rows.append({"channels": C, "vectorised_ms": tv * 1e3, "loop_ms": tl * 1e3, "speedup": tl / tv, "equal": same})
    return rows


def _compress(model, state, keep):
    """Zero the smallest DGC rows until merged FLOPs <= keep x dense (global ranking by the criteria's
    score; a residual group's channel is zeroed in every member)."""
    target = keep * state.dense_flops()
    order = sorted(((float(n), unit, c) for unit in state.units
                    for c, n in enumerate(state.unit_scores(unit).tolist())))
    kept = {u: state.unit_channels(u) for u in state.units}
    chosen = {u: [] for u in kept}
    for _, unit, c in order:
        if state.predicted_flops(kept) <= target:
            break
        if kept[unit] > 1:
            kept[unit] -= 1
            chosen[unit].append(c)
    for unit, chans in chosen.items():
        for name in state.units[unit]:
            state.compactors[name].zero_(chans)


def _compressed(dense, size, keep, round_to=1, residual=False):
    """(student with DGCs cut to ``keep`` of the FLOPs, its merged model)."""
    torch.manual_seed(0)
    student = copy.deepcopy(dense)
    state = cdd_plugin.insert_dgc(student, torch.randn(1, 3, *size),
                                  cdd_plugin.CDDConfig(sites=SITES, round_to=round_to, residual=residual))
    with torch.no_grad():
        for d in state.compactors.values():
            d.weight.add_(0.01 * torch.randn_like(d.weight))
    _compress(student, state, keep)
    return student, cdd_plugin.merge(student)


def _fold_bn(model):
    """``model`` with every BatchNorm that follows a convolution folded into it (a copy; the library's
    ``fold_batchnorms``, torch.fx's fusion)."""
    from cdd_plugin.deploy import fold_batchnorms
    return fold_batchnorms(model)


def bench_latency(arch, size, batches, keep, runs, round_to=1, compare_residual=False):
    """Merged latency against the dense network, and against the FLOPs factor; with ``compare_residual``
    also the model whose residual streams are compacted too (``residual=True``), cut to the same FLOPs and
    timed in the same alternation."""
    from cdd_plugin.deploy import latency_table

    torch.manual_seed(0)
    dense = getattr(torchvision.models, arch)().eval()
    x = torch.randn(1, 3, *size)
    student, merged = _compressed(dense, size, keep, round_to)
    models = {"dense": dense, "merged": merged}
    if compare_residual:
        models["residual"] = _compressed(dense, size, keep, round_to, residual=True)[1]
    out = {"arch": arch, "input": list(size), "keep_target": keep, "round_to": round_to}
    f_dense = cdd_plugin.profile(dense, x)["flops"]
    flops = {k: cdd_plugin.profile(m, x)["flops"] for k, m in models.items() if k != "dense"}
    # Every model is timed in its deployable form, BatchNorms folded into the convolutions (torch.fx's
    # conv-BN fusion): merge folds the BatchNorms at its sites, so an unfolded dense network would pay
    # ~53 BatchNorm passes the merged one does not, and flatter the speed-up in PyTorch (onnxruntime
    # folds them in both on its own). The dense network as trained is timed too, for reference.
    models = {"dense": _fold_bn(dense), **{k: _fold_bn(m) for k, m in models.items() if k != "dense"},
              "dense_unfolded": dense}
    out["flops_dense"], out["flops_merged"] = f_dense, flops["merged"]
    out["flops_ratio"] = f_dense / flops["merged"]
    if compare_residual:
        out["flops_residual"] = flops["residual"]
        out["flops_ratio_residual"] = f_dense / flops["residual"]
        out["params"] = {k: cdd_plugin.profile(m, x)["params"] for k, m in models.items()}
    # PyTorch and onnxruntime, every model timed in alternation (medians of interleaved rounds)
    table = latency_table(models, (3, *size), batches=batches, rounds=max(3, runs // 2), runs=2,
                          fold_bn=False)  # folded above; dense_unfolded stays as trained
    for b in batches:
        xb = torch.randn(b, 3, *size)
        p = table[f"batch{b}"]
        t_unmerged = cdd_plugin.profile(student, xb, latency=True, runs=max(3, runs // 2))["latency_ms"]
        row = {"dense_ms": p["torch_dense"], "dense_unfolded_ms": p["torch_dense_unfolded"],
               "speedup_over_flops_ratio_vs_unfolded_dense": p["torch_dense_unfolded"] / p["torch_merged"]
               / out["flops_ratio"],
               "unmerged_ms": t_unmerged, "merged_ms": p["torch_merged"],
               "speedup_vs_dense": p["torch_dense"] / p["torch_merged"],
               "speedup_over_flops_ratio": p["torch_dense"] / p["torch_merged"] / out["flops_ratio"],
               "ort_dense_ms": p["ort_dense"], "ort_merged_ms": p["ort_merged"],
               "ort_speedup_vs_dense": p["ort_dense"] / p["ort_merged"],
               "ort_speedup_over_flops_ratio": p["ort_dense"] / p["ort_merged"] / out["flops_ratio"]}
        if compare_residual:
            fr = out["flops_ratio_residual"]
            row.update(residual_ms=p["torch_residual"], ort_residual_ms=p["ort_residual"],
                       residual_speedup_over_flops_ratio=p["torch_dense"] / p["torch_residual"] / fr,
                       ort_residual_speedup_over_flops_ratio=p["ort_dense"] / p["ort_residual"] / fr)
        out[f"batch{b}"] = row
    return out


def bench_merge(archs, size, repeats):
    rows = []
    for arch in archs:
        torch.manual_seed(0)
        model = getattr(torchvision.models, arch)()
        state = cdd_plugin.insert_dgc(model, torch.randn(1, 3, *size), cdd_plugin.CDDConfig(sites=SITES))
        _compress(model, state, 0.35)
        t = _median_time(lambda: cdd_plugin.merge(model), repeats, warmup=0)
        rows.append({"arch": arch, "merge_s": t})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes; finishes within ~3 minutes on 2 CPU cores")
    ap.add_argument("--json", help="write every figure to this JSON file")
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--input", default="256x128", help="HxW of the training/latency input")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--sites", choices=["all", "paper"], default="all", help="compactor placement: every exactly "
                    "foldable set (the figures in RESULTS.md) or the authors' one per residual block")
    ap.add_argument("--round-to", type=int, default=1, help="[3]: merged widths a multiple of this (8 or 16 suit "
                    "CPU kernels) [default: 1]")
    ap.add_argument("--residual", action="store_true", help="[3]: also the model with its residual streams "
                    "compacted (CDDConfig(residual=True)), cut to the same FLOPs and timed in the same alternation")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads of PyTorch and onnxruntime [default: "
                    "PyTorch's, here every core]; batch-1 serving usually runs 1 per worker process")
    ap.add_argument("--rounds", type=int, default=3, help="[1]: rounds of (KD, CDD, CDD without refresh) steps")
    ap.add_argument("--step-only", action="store_true", help="only [1] and [2]: the training step and the selection")
    ap.add_argument("--latency-only", action="store_true", help="only [3]: merged latency in PyTorch and onnxruntime")
    ap.add_argument("--memory", action="store_true", help="only [5]: peak training memory and checkpoint size")
    ap.add_argument("--queue", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    h, w = (int(v) for v in args.input.lower().split("x"))
    if args.threads is not None:
        if args.threads < 1:
            ap.error("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    if args.memory_child is not None:
        print(json.dumps(_memory_child(args.memory_child, args.arch, (h, w), args.batch, 751, args.queue)))
        return 0
    if args.quick:
        size, batch, repeats, queue, channels, runs = (128, 64), 8, 3, 4000, [64, 256], 5
    else:
        size, batch, repeats, queue, channels, runs = (h, w), args.batch, 5, 24000, [64, 256, 512], 10
    device = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, " \
             f"{torch.get_num_threads()} threads"
    print(f"cdd_plugin speed benchmark ({'quick' if args.quick else 'full'}) on {device}")
    res = {"device": device, "quick": args.quick}

    if args.memory:
        _report_memory(res, args.arch, size, batch, queue)
        return _write(res, args.json)
    global SITES
    SITES = args.sites
    if args.latency_only:
        _report_latency(res, args, size, runs)
        return _write(res, args.json)

    print(f"\n[1] training step, {args.arch} {size[0]}x{size[1]}, batch {batch}, queues full "
          f"(median of {args.rounds} rounds x {max(1, repeats // 2)} steps)")
    res["step"] = bench_step(args.arch, size, batch, 751, repeats, queue, rounds=args.rounds)
    s = res["step"]
    print(f"    KD only      {s['kd_step_s']:.3f} s/it\n    CDD + RGGR   {s['cdd_step_s']:.3f} s/it   "
          f"({s['sites']} DGC sites, queue {queue})\n    ratio        {s['ratio']:.3f}  (target <= 1.10)\n"
          f"    CDD without mask refresh {s['cdd_no_refresh_step_s']:.3f} s/it (ratio {s['no_refresh_ratio']:.3f})\n"
          f"    the compactors alone: {s['dgc_flops_per_image'] / 1e6:.0f} MFLOPs per image on "
          f"{s['student_flops_per_image'] / 1e9:.2f} G = {100 * s['dgc_share_of_kd_step_flops']:.1f}% of a KD step's "
          "FLOPs (3 student passes + 1 teacher forward)")

    print(f"\n[2] RGGR selection, B=64, N={24000 if not args.quick else 24000}, K=2")
    res["selection"] = bench_selection(64, channels, 24000, 3)
    for r in res["selection"]:
        print(f"    C={r['channels']:<4} vectorised {r['vectorised_ms']:8.1f} ms   loop {r['loop_ms']:9.1f} ms   "
              f"x{r['speedup']:.1f}   equal={r['equal']}")

    if args.step_only:
        return _write(res, args.json)
    _report_latency(res, args, size, runs)

    print("\n[4] time to merge")
    res["merge"] = bench_merge(["resnet50", "resnet101"] if not args.quick else ["resnet50"], size, 1 if args.quick else 3)
    for r in res["merge"]:
        print(f"    {r['arch']:<10} {r['merge_s']:.2f} s  (target < 5 s for resnet50)")
    _report_memory(res, args.arch, size, batch, queue)
    return _write(res, args.json)


def _report_latency(res, args, size, runs):
    print(f"\n[3] latency, {args.arch} {size[0]}x{size[1]}, channels cut to ~35% of the FLOPs"
          + (f", widths rounded to {args.round_to}" if args.round_to > 1 else "")
          + "; PyTorch and onnxruntime (CPU), dense and merged timed in alternation, BatchNorms folded in both")
    res["latency"] = bench_latency(args.arch, size, [1, 32] if not args.quick else [1, 8], 0.35, runs,
                                   round_to=args.round_to, compare_residual=args.residual)
    L = res["latency"]
    print(f"    FLOPs dense {L['flops_dense'] / 1e9:.3f} G, merged {L['flops_merged'] / 1e9:.3f} G "
          f"(reduction x{L['flops_ratio']:.2f})")
    for key in [k for k in L if k.startswith("batch")]:
        r = L[key]
        print(f"    {key:<8} PyTorch      dense {r['dense_ms']:8.1f} ms  unmerged {r['unmerged_ms']:8.1f} ms  merged "
              f"{r['merged_ms']:8.1f} ms  speed-up x{r['speedup_vs_dense']:.2f} = "
              f"{r['speedup_over_flops_ratio']:.2f} of the FLOPs reduction (target >= 0.8)")
        print(f"    {'':<8} PyTorch, dense with its BatchNorms unfolded {r['dense_unfolded_ms']:8.1f} ms: "
              f"{r['speedup_over_flops_ratio_vs_unfolded_dense']:.2f} of the FLOPs reduction (not a fair baseline)")
        print(f"    {'':<8} onnxruntime  dense {r['ort_dense_ms']:8.1f} ms  {'':>23}merged "
              f"{r['ort_merged_ms']:8.1f} ms  speed-up x{r['ort_speedup_vs_dense']:.2f} = "
              f"{r['ort_speedup_over_flops_ratio']:.2f} of the FLOPs reduction (target >= 0.8)")
        if "residual_ms" in r:
            print(f"    {'':<8} residual=True: PyTorch merged {r['residual_ms']:8.1f} ms = "
                  f"{r['residual_speedup_over_flops_ratio']:.2f} of its FLOPs reduction (without: "
                  f"{r['speedup_over_flops_ratio']:.2f}); onnxruntime {r['ort_residual_ms']:8.1f} ms = "
                  f"{r['ort_residual_speedup_over_flops_ratio']:.2f} (without: {r['ort_speedup_over_flops_ratio']:.2f})")
    if "flops_residual" in L:
        print(f"    residual=True: FLOPs {L['flops_residual'] / 1e9:.3f} G (x{L['flops_ratio_residual']:.2f}); params "
              + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in L["params"].items()))


def _report_memory(res, arch, size, batch, queue):
    print(f"\n[5] peak training memory and checkpoint size, {arch} {size[0]}x{size[1]}, batch {batch}, queues full "
          f"at {queue} (each variant in its own process)")
    res["memory"] = bench_memory(arch, size, batch, 751, queue)
    mb = 2 ** 20
    for r in res["memory"]:
        print(f"    {r['variant']:<44} peak RSS {r['peak_rss_bytes'] / mb:7.0f} MiB ({r['peak_rss_extra_bytes'] / mb:+6.0f})"
              f"   checkpoint {r['checkpoint_bytes'] / mb:6.0f} MiB ({r['checkpoint_extra_bytes'] / mb:+6.0f} vs KD)")
    print("    target: the authors' placement's checkpoint at most 250 MB (238 MiB) larger than KD's")


def _write(res, path):
    if path:
        with open(path, "w") as f:
            json.dump(res, f, indent=2)
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
