"""Deployment: ONNX export of a merged model, checked against PyTorch with onnxruntime, and
latency of the two runtimes measured side by side.

``export_onnx`` writes the file atomically (a failed export or check leaves no file and keeps a
previous one), with a dynamic batch axis, and refuses to keep an export whose onnxruntime output
differs from PyTorch's (relative difference above ``tolerance``) on the example batch and on a
batch of another size.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from .graph import flat_tensors


class ExportError(RuntimeError):
    """The export failed or its check did; the message says why and what to do."""


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - installed with the pinned stack
        raise ExportError("onnxruntime is not installed: `pip install onnxruntime` (it checks and times the "
                          "exported file), or export with check=False") from exc
    return onnxruntime


def ort_session(path: str, threads: Optional[int] = None):
    """An onnxruntime CPU session (``threads`` intra-op threads; default: torch's thread count)."""
    ort = _onnxruntime()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads or torch.get_num_threads())
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = float(b.abs().max()) if b.numel() else 0.0
    return float((a - b).abs().max()) / max(scale, 1e-12) if b.numel() else 0.0


def export_onnx(model: nn.Module, path: str, example_inputs: torch.Tensor, *, opset: int = 17,
                dynamic_batch: bool = True, check: bool = True, tolerance: float = 1e-4,
                input_name: str = "images") -> Dict[str, Any]:
    """Export ``model`` (a merged network, or any plain module taking one image batch) to ONNX at
    ``path`` and, with ``check``, run the file with onnxruntime on ``example_inputs`` and on a batch
    of another size and compare with PyTorch. Returns ``{"path", "outputs", "max_rel_diff"}``."""
    if not isinstance(model, nn.Module):
        raise ExportError(f"export_onnx needs an nn.Module, got {type(model).__name__}")
    if not isinstance(example_inputs, torch.Tensor) or not example_inputs.is_floating_point():
        raise ExportError("example_inputs must be a floating image batch, e.g. torch.randn(1, 3, 256, 128)")
    from .graph import find_dgcs
    if find_dgcs(model):
        raise ExportError("the model still has DGCs: export the merged network (cdd_plugin.merge(model)), which "
                          "is smaller and faster")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(folder):
        raise ExportError(f"cannot write '{path}': the folder '{folder}' does not exist")
    was_training = model.training
    model.eval()
    x = example_inputs.detach().cpu().float()
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        with torch.no_grad():
            reference = flat_tensors(model(x))
            names = [f"output{i}" if len(reference) > 1 else "output" for i in range(len(reference))]
            axes = {n: {0: "batch"} for n in [input_name] + names} if dynamic_batch else None
            torch.onnx.export(model, (x,), tmp, input_names=[input_name], output_names=names, opset_version=opset,
                              dynamic_axes=axes, dynamo=False)
        worst = 0.0
        if check:
            sess = ort_session(tmp)
            batches = [x]
            if dynamic_batch:
                g = torch.Generator().manual_seed(0)
                batches.append(torch.randn((x.shape[0] + 2,) + tuple(x.shape[1:]), generator=g))
            for xb in batches:
                with torch.no_grad():
                    want = flat_tensors(model(xb))
                got = sess.run(None, {input_name: xb.numpy()})
                if len(got) != len(want):
                    raise ExportError(f"the ONNX file returns {len(got)} outputs, PyTorch {len(want)}")
                for a, b in zip(got, want):
                    worst = max(worst, _relative(torch.from_numpy(a), b))
            if worst > tolerance:
                raise ExportError(f"onnxruntime's output differs from PyTorch's by {worst:.1e} (relative, tolerance "
                                  f"{tolerance:.0e}); the file was not written. Fix: try another opset (opset=...), "
                                  "or report the model")
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"ONNX export failed ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); nothing "
                          "was written") from exc
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        model.train(was_training)
    return {"path": path, "outputs": names, "max_rel_diff": worst}


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


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


def latency_pair(dense: nn.Module, merged: nn.Module, input_shape: Sequence[int], batches: Sequence[int] = (1, 32),
                 rounds: int = 5, runs: int = 3, folder: Optional[str] = None) -> Dict[str, Dict[str, float]]:
    """Latency of ``dense`` and ``merged`` in PyTorch and in onnxruntime (exported and checked
    here), per batch size, all measured in alternation. Returns ``{f"batch{b}": {"torch_dense",
    "torch_merged", "ort_dense", "ort_merged"}}`` in milliseconds."""
    out: Dict[str, Dict[str, float]] = {}
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        x1 = torch.randn(1, *input_shape, generator=torch.Generator().manual_seed(0))
        sessions = {}
        for name, net in (("dense", dense), ("merged", merged)):
            p = os.path.join(tmp, f"{name}.onnx")
            export_onnx(net, p, x1)
            sessions[name] = ort_session(p)
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

            out[f"batch{b}"] = interleaved_latency({
                "torch_dense": torch_run(dense.eval()), "torch_merged": torch_run(merged.eval()),
                "ort_dense": ort_run(sessions["dense"]), "ort_merged": ort_run(sessions["merged"])},
                rounds=rounds, runs=runs)
    return out


__all__ = ["ExportError", "export_onnx", "interleaved_latency", "latency_pair", "ort_session"]
