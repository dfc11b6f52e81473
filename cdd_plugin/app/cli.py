"""The ``cdd`` command: ``demo``, ``profile``, ``merge`` and ``report``.

Thin wrappers over the public API (docs/API.md). Every user error ends the command with
a one-line message that names the fix and a non-zero exit status (1; 2 for usage
errors); ``--debug`` (or ``CDD_DEBUG=1``) shows the traceback instead.

Architectures (``--arch``) are looked up in :data:`ARCH_BUILDERS` by the text before the
first colon:

* ``demo``                    the demo's network (``cdd_plugin.app.demo.DemoNet``; its settings
                              are read from the file's meta data when present)
* ``torchvision:<name>``      e.g. ``torchvision:resnet50`` (random init, ``--num-classes``)
* ``fastreid:<config.yml>``, ``mmpretrain:<config.py>``: delegated to the integration
  package ``cdd_plugin.integrations.<name>``, which provides
  ``cli_arch(spec: str, num_classes: int | None = None)`` returning the dense student
  (an ``nn.Module``) or a dict with ``model`` and optionally ``input`` (C, H, W),
  ``example_inputs`` (``fn(batch) -> inputs``), ``forward_fn`` and ``customized_pruners``
  (what ``insert_dgc`` needs for that framework).

Other code can add a family with :func:`register_arch`.
"""
from __future__ import annotations

import argparse
import math
import importlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

logger = logging.getLogger("cdd_plugin.app.cli")

PROG = "cdd"


def _int_at_least(low: int, what: str):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give {what}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"{v} is too small; give {what}")
        return v
    return parse


def _finite(low: float = -math.inf, high: float = math.inf, what: str = "a finite number", open_low: bool = False,
            open_high: bool = False):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; give {what}") from None
        if not math.isfinite(v) or v < low or v > high or (open_low and v == low) or (open_high and v == high):
            raise argparse.ArgumentTypeError(f"{text} is out of range; give {what}")
        return v
    return parse


class CLIError(Exception):
    """A user error: printed as one line, exit status 1."""


# ====================================================================== architectures


@dataclass
class Arch:
    """A freshly built dense model plus what surgery and profiling need to run it."""

    model: Any
    input: Optional[Tuple[int, ...]] = None          # default example input shape (C, H, W), without batch
    example_inputs: Optional[Callable[[int], Any]] = None  # batch -> example inputs (overrides ``input``)
    forward_fn: Optional[Callable] = None
    customized_pruners: Optional[dict] = None

    def inputs(self, batch: int, shape: Optional[Tuple[int, ...]]):
        import torch

        shape = shape or self.input
        if shape is not None:
            if self.example_inputs is not None and shape == self.input:
                return self.example_inputs(batch)
            return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
        if self.example_inputs is not None:
            return self.example_inputs(batch)
        raise CLIError("no input size known for this model; pass --input CxHxW, e.g. --input 3x256x128")


ArchBuilder = Callable[[str, dict], Arch]
ARCH_BUILDERS: Dict[str, ArchBuilder] = {}
INTEGRATIONS = ("fastreid", "mmpretrain")


def register_arch(family: str, builder: ArchBuilder) -> None:
    """Make ``--arch <family>:<spec>`` build models with ``builder(spec, options)``.

    ``options`` holds ``num_classes`` (or None) and ``meta`` (the file's meta data, or {})."""
    ARCH_BUILDERS[family] = builder


def _build_demo(spec: str, options: dict) -> Arch:
    from .demo import build_demo_net

    meta = options.get("meta") or {}
    kwargs = dict(meta.get("arch_kwargs") or {}) if meta.get("arch") == "demo" else {}
    if spec:
        raise CLIError(f"--arch demo takes no specification (got 'demo:{spec}'); use --arch demo")
    if options.get("num_classes"):
        kwargs["num_classes"] = int(options["num_classes"])
    try:
        model = build_demo_net(**kwargs)
    except TypeError as exc:
        raise CLIError(f"the file's demo settings {kwargs} do not fit this version of cdd_plugin ({exc}); "
                       "re-run `cdd demo` to produce a new file") from exc
    shape = tuple(meta["input"]) if isinstance(meta.get("input"), list) else (3, 32, 32)
    return Arch(model, input=shape)


def _build_torchvision(spec: str, options: dict) -> Arch:
    import torchvision

    if not spec:
        raise CLIError("--arch torchvision needs a model name, e.g. --arch torchvision:resnet50")
    names = torchvision.models.list_models(module=torchvision.models)
    if spec not in names:
        close = [n for n in names if spec.lower() in n.lower()][:5]
        hint = f" (close: {', '.join(close)})" if close else ""
        raise CLIError(f"torchvision has no classification model '{spec}'{hint}; see "
                       "torchvision.models.list_models()")
    kwargs = {"weights": None}
    if options.get("num_classes"):
        kwargs["num_classes"] = int(options["num_classes"])
    return Arch(torchvision.models.get_model(spec, **kwargs), input=(3, 224, 224))


def _build_integration(family: str) -> ArchBuilder:
    def build(spec: str, options: dict) -> Arch:
        module_name = f"cdd_plugin.integrations.{family}"
        try:
            mod = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and (exc.name == module_name or module_name.startswith(exc.name + ".")):
                raise CLIError(f"the {family} integration is not installed ({module_name} is missing); "
                               f"reinstall cdd_plugin with `pip install -e '.[{family}]'`") from exc
            raise CLIError(f"the {family} integration cannot be imported: {exc}; install its dependencies with "
                           f"`pip install -e '.[{family}]'`") from exc
        except ImportError as exc:
            raise CLIError(f"the {family} integration cannot be imported: {exc}; install its dependencies with "
                           f"`pip install -e '.[{family}]'`") from exc
        builder = getattr(mod, "cli_arch", None)
        if builder is None:
            raise CLIError(f"the {family} integration has no builder for the command line "
                           f"({module_name}.cli_arch(spec, num_classes=None) is missing); use "
                           f"--arch demo or torchvision:<name>, or the {family} tools")
        if not spec:
            raise CLIError(f"--arch {family} needs a config file, e.g. --arch {family}:path/to/config")
        try:
            built = builder(spec, num_classes=options.get("num_classes"))
        except CLIError:
            raise
        except FileNotFoundError as exc:
            raise CLIError(f"--arch {family}:{spec}: {exc}") from exc
        except Exception as exc:  # a malformed config file, unknown keys, ...: one line naming the file
            raise CLIError(f"--arch {family}:{spec}: the {family} config cannot be built ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:300] if str(exc) else ''}); check that file") from exc
        if isinstance(built, Arch):
            return built
        if isinstance(built, dict):
            if "model" not in built:
                raise CLIError(f"{module_name}.cli_arch returned a dict without 'model'")
            shape = built.get("input")
            return Arch(built["model"], input=tuple(shape) if shape is not None else None,
                        example_inputs=built.get("example_inputs"), forward_fn=built.get("forward_fn"),
                        customized_pruners=built.get("customized_pruners"))
        return Arch(built)

    return build


register_arch("demo", _build_demo)
register_arch("torchvision", _build_torchvision)
for _family in INTEGRATIONS:
    register_arch(_family, _build_integration(_family))


def build_arch(arch: str, *, num_classes: Optional[int] = None, meta: Optional[dict] = None) -> Arch:
    family, _, spec = arch.partition(":")
    builder = ARCH_BUILDERS.get(family)
    if builder is None:
        known = ", ".join(["demo", "torchvision:<name>"] + [f"{f}:<config>" for f in INTEGRATIONS])
        raise CLIError(f"unknown --arch '{arch}'; use one of: {known}")
    return builder(spec, {"num_classes": num_classes, "meta": meta or {}})


def parse_shape(text: Optional[str]) -> Optional[Tuple[int, ...]]:
    """'3x256x128' -> (3, 256, 128)."""
    if text is None:
        return None
    parts = text.lower().replace("*", "x").replace(",", "x").split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) < 1:
        raise CLIError(f"--input '{text}' is not a size; write CxHxW, e.g. --input 3x256x128")
    return dims


def _meta_shape(meta: dict) -> Optional[Tuple[int, ...]]:
    for key in ("input", "input_size"):
        v = meta.get(key)
        if isinstance(v, (list, tuple)) and len(v) in (2, 3) and all(isinstance(x, int) for x in v):
            return tuple(v) if len(v) == 3 else (3,) + tuple(v)
    return None


# ====================================================================== files


def _load_safe(path: str, what: str) -> Any:
    import torch

    if not os.path.isfile(path):
        raise CLIError(f"{what} '{path}' not found; check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated / unsafe files
        msg = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise CLIError(f"{what} '{path}' is not a safe (weights-only) torch file: it pickles Python objects "
                           f"({msg}); re-save it as a plain state dict, torch.save(model.state_dict(), path)") from exc
        raise CLIError(f"{what} '{path}' cannot be read: truncated or not a torch file ({type(exc).__name__}: "
                       f"{msg}); copy or save it again") from exc


def _state_dict_from(ckpt: Any, path: str) -> Tuple[dict, dict]:
    """(state dict, meta) from a raw state dict or a {'model': ...} / {'state_dict': ...} wrapper."""
    import torch

    if not isinstance(ckpt, dict):
        raise CLIError(f"'{path}' holds a {type(ckpt).__name__}, not a state dict; save model.state_dict()")
    if ckpt.get("format") == "cdd_plugin.merged":
        raise CLIError(f"'{path}' is already a merged model (cdd_plugin.save_merged); inspect it with "
                       "`cdd profile`, there is nothing left to merge")
    meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), dict) else {}
    for key in ("model", "state_dict", "student"):
        if isinstance(ckpt.get(key), dict) and any(isinstance(v, torch.Tensor) for v in ckpt[key].values()):
            return ckpt[key], meta
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt, meta
    raise CLIError(f"'{path}' has no state dict (keys: {sorted(map(str, ckpt))[:6]}); expected a raw state dict or "
                   "a dict with a 'model' or 'state_dict' entry")


def _check_out(out: str, force: bool, *inputs: str) -> Path:
    path = Path(out)
    for src in inputs:
        if os.path.exists(src) and path.exists() and os.path.samefile(src, path):
            raise CLIError(f"--out '{out}' is the input file; choose another --out (the input is never overwritten)")
    if path.is_dir():
        raise CLIError(f"--out '{out}' is a folder; give a file name, e.g. {path / 'model_merged.pth'}")
    if path.exists() and not force:
        raise CLIError(f"--out '{out}' exists; pass --force to replace it or choose another name")
    return path


# ====================================================================== commands


def cmd_demo(args: argparse.Namespace) -> int:
    from . import demo
    from .. import report

    overrides = {"out": args.out, "seed": args.seed, "student_epochs": args.epochs,
                 "teacher_epochs": args.teacher_epochs, "lasso": args.lasso, "flops_target": args.flops_target,
                 "threads": args.threads, "ids": args.ids, "mask_start_epoch": args.mask_start}
    if args.no_latency:
        overrides["latency"] = False
    cfg = demo.DemoConfig.for_run(args.data, quick=args.quick, model=args.model, **overrides)
    summary = demo.run_demo(cfg, progress=args.progress)
    print()
    print(f"CDD demo ({cfg.data}{', quick' if cfg.quick else ''}): {summary['config']['protocol']}")
    print(report.format_table(summary))
    shape = "x".join(str(v) for v in [3, *cfg.input_size])
    print(f"(params / FLOPs / latency of each model in deployable form, BatchNorms folded; FLOPs = MACs per "
          f"{shape} image, torch-pruning's counter; latency = median CPU milliseconds at batch "
          f"{' / '.join(map(str, cfg.latency_batches))}, {summary['config']['threads']} thread(s))")
    red = summary["flops_reduction"]
    rows = {r["name"]: r for r in summary["rows"]}
    gap = rows["student_merged"]["metrics"]["mAP"] - rows["student_unmerged"]["metrics"]["mAP"]
    if cfg.quick:
        print(f"quick run (a smoke test of the pipeline; the targets apply to the full `cdd demo`): {red:.1%} fewer "
              f"FLOPs, mAP {gap:+.2f} points")
    else:
        print(f"targets: >= 50% fewer FLOPs than the heavy student: {'met' if red >= 0.5 else 'NOT met'} ({red:.1%}); "
              f"mAP within 1 point of it: {'met' if abs(gap) <= 1.0 else 'NOT met'} ({gap:+.2f})")
    print(f"settings: lasso={cfg.lasso} (paper 0.004, larger for a run of {summary['iterations']} iterations), "
          f"ratio={cfg.ratio}, FLOPs target {cfg.flops_target:.0%}; see {Path(cfg.out) / 'demo.log'}")
    print(f"wrote {Path(cfg.out)}/: summary.json, history.jsonl, model_merged.pth, channels.png, history.png "
          f"({summary['config']['wall_time_s']:.0f} s)")
    return 0


def _load_merged_model(args: argparse.Namespace):
    """The merged file of ``args.merged`` on a fresh dense model of its architecture: (model, arch,
    arch_name, input shape, a builder of the dense model)."""
    import cdd_plugin
    from ..export import read_merged

    if not os.path.isfile(args.merged):
        raise CLIError(f"merged model '{args.merged}' not found; write one with `cdd merge` or `cdd demo`")
    try:
        payload = read_merged(args.merged)
    except (ValueError, FileNotFoundError) as exc:
        raise CLIError(f"{exc}") from exc
    meta = payload.get("meta") or {}
    arch_name = args.arch or (meta.get("arch") if isinstance(meta.get("arch"), str) else None)
    if not arch_name:
        raise CLIError(f"'{args.merged}' does not record its architecture; pass --arch (demo, torchvision:<name>, "
                       "fastreid:<config.yml>, mmpretrain:<config.py>)")
    num_classes = args.num_classes or (meta.get("num_classes") if isinstance(meta.get("num_classes"), int) else None)
    arch = build_arch(arch_name, num_classes=num_classes, meta=meta)
    shape = parse_shape(args.input) or _meta_shape(meta) or arch.input
    try:
        model = cdd_plugin.load_merged(args.merged, arch.model)
    except (ValueError, RuntimeError) as exc:
        raise CLIError(f"'{args.merged}' does not fit --arch {arch_name}: {str(exc).splitlines()[0][:300]}; pass "
                       "the architecture the model was trained with") from exc
    def dense():  # the same architecture, not compressed
        return build_arch(arch_name, num_classes=num_classes, meta=meta).model

    return model, arch, arch_name, shape, dense


def cmd_profile(args: argparse.Namespace) -> int:
    import torch

    import cdd_plugin

    model, arch, arch_name, shape, _ = _load_merged_model(args)
    x = arch.inputs(args.batch, shape)
    try:
        prof = cdd_plugin.profile(model, x, latency=args.latency, runs=args.runs, forward_fn=arch.forward_fn)
    except RuntimeError as exc:
        raise CLIError(f"the model does not run on input {tuple(x.shape)}: {str(exc).splitlines()[0][:200]}; "
                       "pass the --input size it was trained with") from exc
    result = {"file": args.merged, "arch": arch_name, "input": list(x.shape), "params": int(prof["params"]),
              "flops": int(prof["flops"]), "latency_ms": prof.get("latency_ms"), "threads": torch.get_num_threads()}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.merged}  ({arch_name}, input {'x'.join(map(str, x.shape))})")
    print(f"  params   {result['params']:>14,d}  ({result['params'] / 1e6:.3f} M)")
    print(f"  FLOPs    {result['flops']:>14,d}  ({result['flops'] / 1e6:.3f} M MACs, per image)")
    if args.latency:
        print(f"  latency  {result['latency_ms']:>14.3f}  ms (batch {args.batch}, median of {args.runs}, "
              f"{result['threads']} thread(s))")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    import cdd_plugin
    from ..deploy import ExportError, export_onnx, latency_pair

    if os.path.exists(args.out) and not args.force:
        raise CLIError(f"'{args.out}' exists; pass --force to replace it")
    model, arch, arch_name, shape, build_dense = _load_merged_model(args)
    if arch.forward_fn is not None:
        raise CLIError(f"--arch {arch_name} needs a custom forward (its model does not take one image batch); "
                       "export it from Python with cdd_plugin.export_onnx on the embedding network")
    x = arch.inputs(1, shape)
    try:
        res = export_onnx(model, args.out, x, opset=args.opset)
    except ExportError as exc:
        raise CLIError(str(exc)) from exc
    print(f"{args.out}: ONNX (opset {args.opset}, dynamic batch) of {args.merged}; onnxruntime matches PyTorch "
          f"within {res['max_rel_diff']:.1e} (relative)")
    if args.latency:
        dense = build_dense()  # the same architecture, not compressed
        batches = sorted(set(args.batches))
        lat = latency_pair(dense, model, tuple(x.shape[1:]), batches=batches, rounds=args.rounds,
                           runs=args.runs)
        factor = cdd_plugin.profile(dense, x)["flops"] / max(1, cdd_plugin.profile(model, x)["flops"])
        folded = lat["bn_folded"]
        basis = ("both models with their BatchNorms folded into their convolutions, as onnxruntime runs them"
                 if all(folded.values()) else
                 f"BatchNorms NOT folded in the {' and '.join(k for k, v in folded.items() if not v)} model "
                 "(torch.fx cannot trace it): PyTorch's speed-up may read high")
        print(f"latency, medians of {args.rounds} interleaved rounds, {torch.get_num_threads()} thread(s), FLOPs "
              f"factor x{factor:.2f}\n  ({basis}; /FLOPs = speed-up / FLOPs factor, 1.00: latency follows FLOPs)")
        print("  batch    PyTorch dense   merged  speed-up  /FLOPs    onnxruntime dense   merged  speed-up  /FLOPs")
        for b in batches:
            r = lat[f"batch{b}"]
            st, so = r["torch_dense"] / r["torch_merged"], r["ort_dense"] / r["ort_merged"]
            print(f"  {b:>5}  {r['torch_dense']:>12.1f} ms {r['torch_merged']:>6.1f} ms   x{st:.2f}   {st / factor:5.2f}"
                  f"    {r['ort_dense']:>14.1f} ms {r['ort_merged']:>6.1f} ms   x{so:.2f}   {so / factor:5.2f}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    import torch

    import cdd_plugin

    out = _check_out(args.out, args.force, args.checkpoint)
    ckpt = _load_safe(args.checkpoint, "checkpoint")
    sd, meta = _state_dict_from(ckpt, args.checkpoint)
    prefix = args.prefix if args.prefix is not None else (meta.get("prefix") or "")
    if prefix:
        if not any(k.startswith(prefix) for k in sd):
            raise CLIError(f"no key of '{args.checkpoint}' starts with --prefix '{prefix}' (e.g. {next(iter(sd))!r}); "
                           "fix or drop --prefix")
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    dgc_keys = [k for k in sd if k.endswith("cdd_dgc.weight")]
    if not dgc_keys:
        raise CLIError(f"'{args.checkpoint}' has no DGC weights (no '*.cdd_dgc.weight' keys): it is a dense model, "
                       "not a student trained with CDD; nothing to merge")
    arch_name = args.arch or (meta.get("arch") if isinstance(meta.get("arch"), str) else None)
    if not arch_name:
        raise CLIError("pass --arch (demo, torchvision:<name>, fastreid:<config.yml>, mmpretrain:<config.py>): the "
                       "checkpoint does not record its architecture")
    num_classes = args.num_classes or (meta.get("num_classes") if isinstance(meta.get("num_classes"), int) else None)
    arch = build_arch(arch_name, num_classes=num_classes, meta=meta)
    shape = parse_shape(args.input) or _meta_shape(meta) or arch.input
    x2 = arch.inputs(2, shape)
    # the placement the student was trained with (sites, residual groups): recorded in the meta, else the
    # one whose compactors are exactly the checkpoint's (the authors' placement first)
    wanted = {k for k in sd if k.endswith("cdd_dgc.weight")}
    sites_options = [meta["sites"]] if meta.get("sites") in ("paper", "all") else ["paper", "all"]
    residual_options = [meta["residual"]] if isinstance(meta.get("residual"), bool) else [False, True]
    placements = [(s, r) for s in sites_options for r in residual_options]
    model = state = None
    for sites, residual in placements:
        candidate = arch.model if model is None else build_arch(arch_name, num_classes=num_classes, meta=meta).model
        cfg = cdd_plugin.CDDConfig(threshold=args.threshold, sites=sites, round_to=args.round_to, residual=residual)
        try:
            st = cdd_plugin.insert_dgc(candidate, x2, cfg, forward_fn=arch.forward_fn,
                                       customized_pruners=arch.customized_pruners)
        except cdd_plugin.SurgeryError as exc:
            if (sites, residual) == placements[-1] and state is None:
                raise CLIError(f"surgery on --arch {arch_name} failed: {str(exc).splitlines()[0]}") from exc
            continue
        model, state = candidate, st
        if {k for k in candidate.state_dict() if k.endswith("cdd_dgc.weight")} == wanted:
            break
    missing, unexpected = _key_diff(model.state_dict(), sd)
    if missing or unexpected:
        hint = _prefix_hint(sd, model.state_dict())
        raise CLIError(
            f"the checkpoint does not match --arch {arch_name} with DGCs inserted at input {'x'.join(map(str, shape or ()))}"
            f": {len(missing)} missing key(s) (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})"
            f"; {hint}")
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise CLIError(f"the checkpoint's tensors do not fit --arch {arch_name}: {_first_mismatch(exc)}; pass the "
                       "architecture (and --num-classes) the student was trained with") from exc
    model.eval()
    merged = cdd_plugin.merge(model)
    # "before": the same trained network in deployable form (BatchNorms and DGCs folded, no channel removed)
    before = cdd_plugin.profile(cdd_plugin.merge(model, threshold=0.0), arch.inputs(1, shape))
    after = cdd_plugin.profile(merged, arch.inputs(1, shape))
    with torch.no_grad():
        y0, y1 = _first_tensor(model(x2)), _first_tensor(merged(x2))
    err = float((y0 - y1).abs().max() / y0.abs().max().clamp_min(1e-12)) if y0 is not None and y1 is not None \
        else float("nan")
    save_meta = dict(meta, arch=arch_name, input=list(shape) if shape else None, source=os.path.abspath(args.checkpoint),
                     threshold=args.threshold)
    save_meta.pop("prefix", None)
    cdd_plugin.save_merged(merged, str(out), meta=save_meta)
    print(f"merged {len(state.sites)} DGC site(s) of '{args.checkpoint}' ({arch_name}) -> {out}")
    print(f"  {'':8} {'params':>14} {'FLOPs':>16}")
    print(f"  {'before':8} {before['params']:>14,d} {before['flops']:>16,d}")
    print(f"  {'after':8} {after['params']:>14,d} {after['flops']:>16,d}")
    print(f"  reduction: {1 - after['flops'] / before['flops']:.1%} FLOPs, {1 - after['params'] / before['params']:.1%}"
          f" params; channels kept {sum(state.kept_channels().values())}/{state.summary()['channels_total']}; "
          f"output difference {err:.1e} (relative to the largest output)")
    print("  (before: the trained student with BatchNorms and DGCs folded and no channel removed)")
    return 0


def _first_tensor(out):
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return _first_tensor(out[0])
    if isinstance(out, dict) and out:
        return _first_tensor(next(iter(out.values())))
    return None


def _key_diff(expected: dict, got: dict) -> Tuple[List[str], List[str]]:
    exp, have = set(expected), set(got)
    return sorted(exp - have), sorted(have - exp)


def _prefix_hint(sd: dict, expected: dict) -> str:
    """Guess a prefix that would make the keys match (e.g. 'student.' or 'module.')."""
    target = next((k for k in expected if k.endswith("cdd_dgc.weight")), None)
    for k in sd:
        if target and k.endswith(target) and k != target:
            return f"the keys look prefixed: pass --prefix {k[: -len(target)]}"
    return ("pass the --arch, --input size and --num-classes the student was trained with (surgery must see the "
            "same network), or --prefix if its keys are prefixed")


def _first_mismatch(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln]
    return (lines[0] if lines else str(exc).splitlines()[0])[:300]


def cmd_report(args: argparse.Namespace) -> int:
    from .. import report

    path = report.find_summary(args.run_dir)
    summary = report.load_summary(path)
    run_dir = path.parent
    history = report.load_history(run_dir / "history.jsonl")
    print(f"{path} ({summary['framework']}, {summary['iterations']} iterations"
          f"{', ' + str(len(history)) + ' evaluations in history.jsonl' if history else ''})")
    print(report.format_table(summary))  # the table first: a plot that cannot be written never hides it
    if args.no_plots:
        return 0
    try:
        written = report.write_plots(run_dir, summary, history)
    except OSError as exc:
        raise CLIError(f"the table is above, but the plots cannot be written to '{run_dir}' ({exc.strerror or exc}); "
                       "pass --no-plots, or copy the run folder somewhere writable") from exc
    if written:
        print("plots: " + ", ".join(written))
    else:
        print("no plots: the summary has no 'channels' and there is no history.jsonl")
    return 0


# ====================================================================== parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Capacity Dynamic Distillation (CDD, CVPR 2023) with RGGR: run the demo, merge a "
        "trained student, profile and report.",
        epilog="Run `cdd <command> --help` for the options of a command. Set CDD_DEBUG=1 for tracebacks.")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors in the log")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", help="the whole pipeline end to end on a small real data set (CPU, minutes)",
                       description="Train a teacher, distil it into a heavy student of the same architecture with "
                       "DGCs and RGGR, merge, and compare the three models (retrieval mAP / R@1, params, FLOPs, CPU "
                       "latency). Default data: scikit-learn's bundled handwritten digits (real 8x8 scans, no "
                       "download), class-level retrieval on a held-out third. Writes OUT/summary.json, "
                       "history.jsonl, model_merged.pth, channels.png and history.png.")
    d.add_argument("--out", default="runs/demo", help="output folder [default: runs/demo]; files of an earlier run "
                   "there are moved to OUT/previous/<time>/")
    d.add_argument("--seed", type=int, default=0, help="random seed; the same seed (and --threads) gives the same "
                   "results [default: 0]")
    d.add_argument("--epochs", type=_int_at_least(1, "at least one epoch"), default=None, help="student (distillation) epochs [default: 20, quick: 4]")
    d.add_argument("--teacher-epochs", type=_int_at_least(1, "at least one epoch"), default=None, help="teacher epochs [default: 10; market1501: 12; quick: 2]")
    d.add_argument("--mask-start", type=_int_at_least(0, "an epoch >= 0"), default=None, help="RGGR warm-up in epochs: masks may change from "
                   "this student epoch on [default: 2; market1501: 3; quick: 1]")
    d.add_argument("--quick", action="store_true", help="a much shorter run with a smaller network (< 1 minute; "
                   "used by the tests)")
    d.add_argument("--model", choices=("cnn", "vit"), default="cnn", help="the teacher and heavy student: 'cnn' (a "
                   "small bottleneck ResNet) or 'vit' (a small vision transformer: its MLPs are compacted) "
                   "[default: cnn]")
    d.add_argument("--data", default="digits", metavar="SPEC", help="'digits' (bundled with scikit-learn) or "
                   "'market1501:PATH' (a subset of Market-1501, re-ID protocol, 128x64 input) [default: digits]")
    d.add_argument("--ids", type=_int_at_least(2, "at least 2 identities"), default=None, help="market1501: identities in the subset, for train and test "
                   "each [default: 64]")
    d.add_argument("--lasso", type=_finite(0.0, what="a finite lasso >= 0, e.g. 0.02"), default=None, help="group-lasso strength [default: 0.02; the paper's "
                   "0.004 is made for ~50k iterations]")
    d.add_argument("--flops-target", type=_finite(0.0, 1.0, "a kept FLOPs fraction in (0, 1), e.g. 0.4", True, True), default=None, help="stop masking once the merged student keeps "
                   "this fraction of the heavy student's FLOPs [default: 0.4]")
    d.add_argument("--threads", type=_int_at_least(1, "at least one CPU thread"), default=None, help="CPU threads [default: half the cores, at most 4]")
    d.add_argument("--no-latency", action="store_true", help="skip the latency measurements")
    d.add_argument("--progress", choices=("auto", "always", "never"), default="auto",
                   help="progress bars: auto = only on a terminal [default: auto]")
    d.set_defaults(func=cmd_demo)

    pr = sub.add_parser("profile", help="params, FLOPs and latency of a merged model file",
                        description="Load a merged model (cdd_plugin.save_merged) onto a freshly built dense model "
                        "of its architecture and count params / FLOPs (MACs, torch-pruning's counter), optionally "
                        "measuring CPU latency.")
    pr.add_argument("merged", metavar="MERGED.pth", help="a merged model file")
    pr.add_argument("--arch", help="demo | torchvision:<name> | fastreid:<config.yml> | mmpretrain:<config.py> "
                    "[default: recorded in the file]")
    pr.add_argument("--input", metavar="CxHxW", help="input size, e.g. 3x256x128 [default: recorded in the file]")
    pr.add_argument("--num-classes", type=_int_at_least(1, "the number of classes (>= 1)"), help="classes of the dense model to build (the merged file's "
                    "classifier replaces it anyway)")
    pr.add_argument("--latency", action="store_true", help="also measure the median CPU forward time")
    pr.add_argument("--batch", type=_int_at_least(1, "a batch size >= 1"), default=1, help="batch size of the measurement (default 1)")
    pr.add_argument("--runs", type=_int_at_least(1, "at least one timed run"), default=20, help="timed forward passes for --latency (default 20)")
    pr.add_argument("--threads", type=_int_at_least(1, "at least one CPU thread"), help="CPU threads for --latency [default: half the cores, at most 4]")
    pr.add_argument("--json", action="store_true", help="print one JSON object")
    pr.set_defaults(func=cmd_profile)

    e = sub.add_parser("export", help="export a merged model file to ONNX, checked with onnxruntime",
                       description="Load a merged model (as `cdd profile` does), export it to ONNX with a dynamic "
                       "batch axis, check onnxruntime's output against PyTorch's, and optionally time both runtimes "
                       "against the dense architecture (interleaved rounds).")
    e.add_argument("merged", metavar="MERGED.pth", help="a merged model file")
    e.add_argument("--out", required=True, help="the .onnx file to write")
    e.add_argument("--arch", help="demo | torchvision:<name> | fastreid:<config.yml> | mmpretrain:<config.py> "
                   "[default: recorded in the file]")
    e.add_argument("--input", metavar="CxHxW", help="input size, e.g. 3x256x128 [default: recorded in the file]")
    e.add_argument("--num-classes", type=_int_at_least(1, "the number of classes (>= 1)"), help="classes of the dense "
                   "model to build")
    e.add_argument("--opset", type=_int_at_least(13, "an ONNX opset >= 13"), default=17, help="ONNX opset [default: 17]")
    e.add_argument("--latency", action="store_true", help="also time PyTorch and onnxruntime, dense vs merged")
    e.add_argument("--batches", type=_int_at_least(1, "a batch size >= 1"), nargs="+", default=[1, 32],
                   help="batch sizes of --latency [default: 1 32]")
    e.add_argument("--rounds", type=_int_at_least(1, "at least one round"), default=5, help="interleaved rounds "
                   "[default: 5]")
    e.add_argument("--runs", type=_int_at_least(1, "at least one run"), default=3, help="calls per round [default: 3]")
    e.add_argument("--threads", type=_int_at_least(1, "at least one CPU thread"), help="CPU threads [default: half the "
                   "cores, at most 4]")
    e.add_argument("--force", action="store_true", help="replace --out if it exists")
    e.set_defaults(func=cmd_export)

    m = sub.add_parser("merge", help="merge a trained student checkpoint (with DGCs) into a plain narrower model",
                       description="Rebuild the dense student, insert DGCs exactly as in training (surgery is "
                       "deterministic for an architecture and input size), load the checkpoint (weights-only), fold "
                       "BN + DGCs, cut the zero channels and save the merged model in the safe format.")
    m.add_argument("checkpoint", metavar="CHECKPOINT", help="state dict of the student with DGCs (raw, or under "
                   "'model' / 'state_dict')")
    m.add_argument("--arch", help="demo | torchvision:<name> | fastreid:<config.yml> | mmpretrain:<config.py> "
                   "[default: recorded in the checkpoint's meta]")
    m.add_argument("--input", metavar="CxHxW", help="the training input size, e.g. 3x256x128")
    m.add_argument("--out", required=True, help="merged model file to write")
    m.add_argument("--prefix", help="strip this prefix from the keys (e.g. 'student.' or 'module.')")
    m.add_argument("--num-classes", type=_int_at_least(1, "the number of classes (>= 1)"), help="classes of the student's classifier")
    m.add_argument("--threshold", type=_finite(0.0, what="a merge threshold > 0, e.g. 1e-5", open_low=True), default=1e-5, help="remove channels whose DGC row norm is below this "
                   "(default 1e-5)")
    m.add_argument("--round-to", type=_int_at_least(1, "a channel multiple >= 1, e.g. 8"), default=1,
                   help="keep a multiple of this many channels in every cut layer (8 or 16 suit CPU/GPU kernels; "
                   "the extra rows are the largest the cut would remove, so the merge stays exact) [default: 1]")
    m.add_argument("--force", action="store_true", help="replace --out if it exists")
    m.set_defaults(func=cmd_merge)

    r = sub.add_parser("report", help="print a run's results table and (re)draw its plots",
                       description="Read RUN_DIR/summary.json (or cdd_summary.json, schema cdd_summary/v1) and "
                       "RUN_DIR/history.jsonl, print the table and write channels.png / history.png.")
    r.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (e.g. runs/demo) or its summary file")
    r.add_argument("--no-plots", action="store_true", help="only print the table")
    r.set_defaults(func=cmd_report)
    return p


class _TqdmHandler(logging.Handler):
    """Log lines that do not break progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover
            self.handleError(record)


def _setup_logging(quiet: bool) -> None:
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    log = logging.getLogger("cdd_plugin")
    log.handlers = [h for h in log.handlers if not isinstance(h, _TqdmHandler)] + [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


def _user_errors() -> tuple:
    from ..config import ConfigError
    from .demo import DemoError
    from ..merge import MergeError
    from ..report import ReportError
    from ..surgery import SurgeryError

    return (CLIError, DemoError, ReportError, ConfigError, MergeError, SurgeryError, FileNotFoundError,
            NotADirectoryError, PermissionError, IsADirectoryError, OSError)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get("CDD_DEBUG", "") not in ("", "0")
    _setup_logging(args.quiet)
    import warnings

    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    try:
        if args.command in ("merge", "profile", "export"):
            import torch

            from .demo import default_threads

            # a fully subscribed CPU makes OpenMP threads wait on each other: leave headroom
            torch.set_num_threads(getattr(args, "threads", None) or default_threads())
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as exc:
        if debug:
            raise
        msg = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
        print(f"{PROG} {args.command}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
