"""Deployment: ONNX export of a merged model, checked against PyTorch with onnxruntime, and
latency of the two runtimes measured side by side.

``export_onnx`` writes the file atomically (a failed export or check leaves no file and keeps a
previous one), with a dynamic batch axis, and refuses to keep an export whose onnxruntime output
differs from PyTorch's (relative difference above ``tolerance``) on the example batch and on a
batch of another size.
"""
from __future__ import annotations

import io
import os
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from .files import atomic_open
from .graph import find_dgcs, flat_tensors


class ExportError(RuntimeError):
    """The export failed or its check did; the message says why and what to do."""


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - installed with the pinned stack
        raise ExportError("onnxruntime is not installed: `pip install onnxruntime` (it checks and times the "
                          "exported file), or export with check=False") from exc
    return onnxruntime


def ort_session(model: Union[str, bytes], threads: Optional[int] = None):
    """An onnxruntime CPU session on an ONNX file or its bytes (``threads`` intra-op threads;
    default: torch's thread count)."""
    ort = _onnxruntime()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads or torch.get_num_threads())
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = float(b.abs().max()) if b.numel() else 0.0
    return float((a - b).abs().max()) / max(scale, 1e-12) if b.numel() else 0.0


def onnx_bytes(model: nn.Module, example_inputs: torch.Tensor, *, opset: int = 17, dynamic_batch: bool = True,
               check: bool = True, tolerance: float = 1e-4, input_name: str = "images") -> Dict[str, Any]:
    """The ONNX serialisation of ``model`` in memory, checked with onnxruntime as ``export_onnx``
    describes. Returns ``{"onnx": bytes, "outputs", "max_rel_diff"}``; changes nothing on disk."""
    if not isinstance(model, nn.Module):
        raise ExportError(f"export_onnx needs an nn.Module, got {type(model).__name__}")
    if not isinstance(example_inputs, torch.Tensor) or not example_inputs.is_floating_point():
        raise ExportError("example_inputs must be a floating image batch, e.g. torch.randn(1, 3, 256, 128)")
    if find_dgcs(model):
        raise ExportError("the model still has DGCs: export the merged network (cdd_plugin.merge(model)), which "
                          "is smaller and faster")
    was_training = model.training
    model.eval()
    x = example_inputs.detach().cpu().float()
    try:
        with torch.no_grad():
            reference = flat_tensors(model(x))
            names = [f"output{i}" if len(reference) > 1 else "output" for i in range(len(reference))]
            axes = {n: {0: "batch"} for n in [input_name] + names} if dynamic_batch else None
            buf = io.BytesIO()
            torch.onnx.export(model, (x,), buf, input_names=[input_name], output_names=names, opset_version=opset,
                              dynamic_axes=axes, dynamo=False)
        data = buf.getvalue()
        worst = 0.0
        if check:
            sess = ort_session(data)
            batches = [x]
            if dynamic_batch:
                g = torch.Generator().manual_seed(0)
                batches.append(torch.randn((x.shape[0] + 2,) + tuple(x.shape[1:]), generator=g))
            for xb in batches:
                with torch.no_grad():
                    want = flat_tensors(model(xb))
                got = sess.run(None, {input_name: xb.numpy()})
                if len(got) != len(want):
                    raise ExportError(f"the ONNX file returns {len(got)} outputs, PyTorch {len(want)}; report the "
                                      "model")
                for a, b in zip(got, want):
                    worst = max(worst, _relative(torch.from_numpy(a), b))
            if worst > tolerance:
                raise ExportError(f"onnxruntime's output differs from PyTorch's by {worst:.1e} (relative, tolerance "
                                  f"{tolerance:.0e}); the file was not written. Fix: try another opset (opset=...), "
                                  "or report the model")
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"ONNX export failed ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); nothing "
                          "was written. Fix: export the merged network of a supported architecture, or report it") \
            from exc
    finally:
        model.train(was_training)
    return {"onnx": data, "outputs": names, "max_rel_diff": worst}


def export_onnx(model: nn.Module, path: str, example_inputs: torch.Tensor, **kwargs: Any) -> Dict[str, Any]:
    """Export ``model`` (a merged network, or any plain module taking one image batch) to ONNX at
    ``path`` and, with ``check``, run it with onnxruntime on ``example_inputs`` and on a batch of
    another size and compare with PyTorch (``opset``, ``dynamic_batch``, ``check``, ``tolerance``,
    ``input_name``: see ``onnx_bytes``). The file is written atomically and only once the check
    passed. Returns ``{"path", "outputs", "max_rel_diff"}``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ExportError(f"cannot write '{path}': the folder '{folder}' does not exist; create it or choose "
                          "another path")
    res = onnx_bytes(model, example_inputs, **kwargs)
    with atomic_open(path, "wb") as fh:
        fh.write(res["onnx"])
    return {"path": path, "outputs": res["outputs"], "max_rel_diff": res["max_rel_diff"]}


def interleaved_latency(runners: Dict[str, Callable[[], Any]], rounds: int = 5, runs: int = 5,
                        warmup: int = 2) -> Dict[str, float]:
    """Median milliseconds per call of each runner, measured in alternation (round r times every
    runner once in turn), so drifting machine load hits all of them alike. Each runner gets one
    untimed call when its turn starts: the first call after switching models pays for caches and
    the allocator (measured here at up to 2x), which is not the model's own cost."""
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for k, fn in runners.items():
            fn()
            t0 = time.perf_counter()
            for _ in range(runs):
                fn()
            times[k].append((time.perf_counter() - t0) * 1000.0 / runs)
    return {k: statistics.median(v) for k, v in times.items()}


def fold_batchnorms(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every BatchNorm that directly follows a convolution folded
    into it (torch.fx's conv-BN fusion; onnxruntime does the same to a file when it loads it). This is
    the form to time a dense network in against a merged one: ``merge`` folds the BatchNorms at its
    sites, so an unfolded dense network pays for BatchNorm passes the merged one does not, and its
    speed-up looks larger than it is. ``model`` itself is not changed. Raises ``ExportError`` if
    torch.fx cannot trace the model (data-dependent control flow)."""
    import copy

    import torch.fx.experimental.optimization as fx_opt

    work = copy.deepcopy(model).eval()
    try:
        return fx_opt.fuse(work, inplace=True)
    except Exception as exc:
        raise ExportError(f"torch.fx cannot trace {type(model).__name__} to fold its BatchNorms "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); time it as it is "
                          "(fold_bn=False) and read PyTorch's speed-up as an upper bound") from exc


def latency_table(models: Dict[str, nn.Module], input_shape: Sequence[int], batches: Sequence[int] = (1, 32),
                  rounds: int = 5, runs: int = 3, fold_bn: bool = True) -> Dict[str, Any]:
    """Latency of every named model in PyTorch and in onnxruntime (exported and checked here, in
    memory), per batch size, all measured in alternation. Returns ``{f"batch{b}": {f"torch_{name}",
    f"ort_{name}", ...}}`` in milliseconds, and ``"bn_folded": {name: bool}``.

    With ``fold_bn`` every model is timed with its BatchNorms folded into its convolutions
    (``fold_batchnorms``), the form onnxruntime runs and the only fair basis for a dense network
    against a merged one; a model torch.fx cannot trace is timed as it is and marked ``False``."""
    out: Dict[str, Any] = {"bn_folded": {}}
    if fold_bn:
        folded = {}
        for name, net in models.items():
            try:
                folded[name] = fold_batchnorms(net)
                out["bn_folded"][name] = True
            except ExportError:
                folded[name] = net
                out["bn_folded"][name] = False
        models = folded
    else:
        out["bn_folded"] = {name: False for name in models}
    x1 = torch.randn(1, *input_shape, generator=torch.Generator().manual_seed(0))
    sessions = {name: ort_session(onnx_bytes(net, x1)["onnx"]) for name, net in models.items()}
    for b in batches:
        xb = torch.randn(b, *input_shape, generator=torch.Generator().manual_seed(b))
        feed = {"images": xb.numpy()}

        def torch_run(net):
            def fn():
                with torch.no_grad():
                    net(xb)
            return fn

        def ort_run(sess):
            return lambda: sess.run(None, feed)

        fns = {}
        for name, net in models.items():
            fns[f"torch_{name}"] = torch_run(net.eval())
            fns[f"ort_{name}"] = ort_run(sessions[name])
        out[f"batch{b}"] = interleaved_latency(fns, rounds=rounds, runs=runs)
    return out


def latency_pair(dense: nn.Module, merged: nn.Module, input_shape: Sequence[int], batches: Sequence[int] = (1, 32),
                 rounds: int = 5, runs: int = 3, fold_bn: bool = True) -> Dict[str, Any]:
    """``latency_table`` of a dense and a merged model: ``{f"batch{b}": {"torch_dense", "torch_merged",
    "ort_dense", "ort_merged"}, "bn_folded": {...}}`` in milliseconds."""
    return latency_table({"dense": dense, "merged": merged}, input_shape, batches, rounds, runs, fold_bn)


__all__ = ["ExportError", "export_onnx", "fold_batchnorms", "interleaved_latency", "latency_pair", "latency_table",
           "onnx_bytes", "ort_session"]
