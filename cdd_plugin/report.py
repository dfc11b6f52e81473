"""Run reports: read a run's ``summary.json`` (schema ``cdd_summary/v1``) and ``history.jsonl``,
print the results table and (re)draw the plots.

Written by the demo and the FastReID / MMPretrain adapters alike:

* ``summary.json`` (or ``cdd_summary.json``)::

    {"schema": "cdd_summary/v1", "framework": "demo" | "fastreid" | "mmpretrain",
     "config": {...} | "path/to/config", "iterations": int,
     "rows": [{"name": "teacher" | "student_unmerged" | "student_merged",
               "metrics": {"mAP": 0-100, "R@1": 0-100, ...}, "params": int, "flops": int,
               "latency_ms": float | null}, ...],
     "flops_reduction": float, "params_reduction": float, "predicted_flops": int,
     "cdd": CDDState.summary(),
     "channels": [{"layer": str, "before": int, "after": int}, ...]   # optional: channel plot}

* ``history.jsonl`` (optional): one JSON object per evaluation with ``iteration`` and any
  of ``mAP``, ``R@1`` (0-100), ``flops`` (merged FLOPs now), ``flops_planned`` (once every
  masked channel is zero), ``flops_dense``, ``phase`` ("teacher" / "student").

Plots: ``channels.png`` (output channels per layer before / after merge, from
``channels``) and ``history.png`` (retrieval mAP and FLOPs over training).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, List, Optional, Sequence

from .files import atomic_open

logger = logging.getLogger("cdd_plugin.report")

SCHEMA = "cdd_summary/v1"
SUMMARY_NAMES = ("summary.json", "cdd_summary.json")
ROW_NAMES = ("teacher", "student_unmerged", "student_merged")
ROW_LABELS = {"teacher": "teacher", "student_unmerged": "heavy student (before merge)",
              "student_merged": "merged student"}


class ReportError(ValueError):
    """A run folder or summary file cannot be used; the message names the fix."""


# ---------------------------------------------------------------------------------- reading


def find_summary(run_dir: os.PathLike | str) -> Path:
    """The summary file of a run folder (``summary.json`` or ``cdd_summary.json``), or a file path itself."""
    path = Path(run_dir)
    if path.is_file():
        return path
    if not path.is_dir():
        raise ReportError(f"run folder not found: '{run_dir}'; pass the folder a run wrote (e.g. runs/demo)")
    for name in SUMMARY_NAMES:
        if (path / name).is_file():
            return path / name
    raise ReportError(f"no {' or '.join(SUMMARY_NAMES)} in '{run_dir}': the run did not finish, or this is not a "
                      "run folder (run `cdd demo --out DIR` or an integration's training first)")


def validate_summary(summary: Any, source: str = "summary") -> dict:
    """Check the ``cdd_summary/v1`` schema; raise :class:`ReportError` naming the first problem."""
    def bad(why: str) -> ReportError:
        return ReportError(f"{source} is not a valid {SCHEMA} summary: {why}")

    if not isinstance(summary, dict):
        raise bad(f"expected a JSON object, got {type(summary).__name__}")
    if summary.get("schema") != SCHEMA:
        raise bad(f"'schema' is {summary.get('schema')!r}, expected {SCHEMA!r}")
    for key, types in (("framework", str), ("iterations", int), ("rows", list), ("flops_reduction", (int, float)),
                       ("params_reduction", (int, float)), ("predicted_flops", int), ("cdd", dict)):
        if key not in summary:
            raise bad(f"missing key '{key}'")
        if not isinstance(summary[key], types) or isinstance(summary[key], bool):
            raise bad(f"'{key}' has type {type(summary[key]).__name__}")
    if "config" not in summary:
        raise bad("missing key 'config'")
    for i, row in enumerate(summary["rows"]):
        if not isinstance(row, dict):
            raise bad(f"rows[{i}] is not an object")
        for key in ("name", "metrics", "params", "flops", "latency_ms"):
            if key not in row:
                raise bad(f"rows[{i}] has no '{key}'")
        if not isinstance(row["metrics"], dict):
            raise bad(f"rows[{i}].metrics is not an object")
        if not isinstance(row["params"], int) or not isinstance(row["flops"], int):
            raise bad(f"rows[{i}] params / flops must be integers")
        if row["latency_ms"] is not None and not isinstance(row["latency_ms"], (int, float)):
            raise bad(f"rows[{i}].latency_ms must be a number or null")
        by = row.get("latency_ms_by_batch")
        if by is not None and (not isinstance(by, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) or v is None for v in by.values())):
            raise bad(f"rows[{i}].latency_ms_by_batch must map batch sizes to numbers")
    channels = summary.get("channels")
    if channels is not None:
        if not isinstance(channels, list) or not all(
                isinstance(c, dict) and isinstance(c.get("layer"), str)
                and all(isinstance(c.get(k), int) and not isinstance(c.get(k), bool) for k in ("before", "after"))
                for c in channels):
            raise bad("'channels' must be a list of {layer, before, after} objects with integer channel counts")
    names = [r["name"] for r in summary["rows"]]
    missing = [n for n in ("student_unmerged", "student_merged") if n not in names]
    if missing:
        raise bad(f"no row named {missing[0]!r} (rows: {names})")
    return summary


def load_summary(path: os.PathLike | str) -> dict:
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except UnicodeDecodeError:
        raise ReportError(f"{path} is not a text (JSON) summary; it looks like a binary file (a .pth?). Pass a run "
                          "folder or its summary.json / cdd_summary.json; inspect merged models with `cdd profile`") \
            from None
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path} is not valid JSON ({exc}); the run was probably interrupted while writing it: "
                          "rerun it") from exc
    return validate_summary(data, str(path))


def load_history(path: os.PathLike | str) -> List[dict]:
    """Records of ``history.jsonl``; a damaged line (a run killed mid-write) is skipped with a warning."""
    records = []
    path = Path(path)
    if not path.is_file():
        return records
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("%s:%d is not valid JSON; skipped", path, lineno)
                continue
            if isinstance(rec, dict):
                records.append(rec)
    return records


# ---------------------------------------------------------------------------------- table


def _fmt_count(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def format_table(summary: dict) -> str:
    """The results table: one line per model with its metrics, params, FLOPs and latency."""
    rows = summary["rows"]
    keys: List[str] = []
    for r in rows:
        for k, v in r["metrics"].items():
            if k not in keys and isinstance(v, (int, float)):
                keys.append(k)
    lat_keys: List[str] = []
    for r in rows:
        for b in (r.get("latency_ms_by_batch") or {}):
            if b not in lat_keys:
                lat_keys.append(b)
    lat_keys = sorted(lat_keys, key=lambda b: int(b) if str(b).isdigit() else 0)
    head = [("model", 29)] + [(k, 7) for k in keys] + [("params", 9), ("FLOPs", 9)]
    head += [(f"ms@b{b}", 8) for b in lat_keys] if lat_keys else [("latency ms", 10)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(head))]
    for r in rows:
        cells = [ROW_LABELS.get(r["name"], r["name"]).ljust(29)]
        cells += [(f"{r['metrics'][k]:.2f}" if isinstance(r["metrics"].get(k), (int, float)) else "-").rjust(7)
                  for k in keys]
        cells += [_fmt_count(r["params"]).rjust(9), _fmt_count(r["flops"]).rjust(9)]
        if lat_keys:
            by = r.get("latency_ms_by_batch") or {}
            cells += [(f"{by[b]:.2f}" if by.get(b) is not None else "-").rjust(8) for b in lat_keys]
        else:
            cells += [("-" if r["latency_ms"] is None else f"{r['latency_ms']:.2f}").rjust(10)]
        lines.append("  ".join(cells))
    by_name = {r["name"]: r for r in rows}
    u, m = by_name.get("student_unmerged"), by_name.get("student_merged")
    tail = [f"merged vs heavy student: {summary['flops_reduction']:.1%} fewer FLOPs, "
            f"{summary['params_reduction']:.1%} fewer params"]
    if u and m:
        deltas = [f"{k} {m['metrics'][k] - u['metrics'][k]:+.2f}" for k in keys
                  if isinstance(u["metrics"].get(k), (int, float)) and isinstance(m["metrics"].get(k), (int, float))]
        if deltas:
            tail[0] += ", " + ", ".join(deltas) + " points"
    t = by_name.get("teacher")
    if t and m:
        deltas = [f"{k} {m['metrics'][k] - t['metrics'][k]:+.2f}" for k in keys
                  if isinstance(t["metrics"].get(k), (int, float)) and isinstance(m["metrics"].get(k), (int, float))]
        if deltas:
            tail.append("merged student vs teacher: " + ", ".join(deltas) + " points")
    if summary.get("predicted_flops") and m and abs(summary["predicted_flops"] - m["flops"]) > 1e-3 * m["flops"]:
        tail.append(f"note: CDD predicted {summary['predicted_flops']:,} FLOPs, the merged model has {m['flops']:,}")
    return "\n".join(lines + tail)


# ---------------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(records: Sequence[dict], path: os.PathLike | str, title: str = "CDD training",
                 mask_start: Optional[int] = None) -> Optional[str]:
    """PNG with retrieval mAP / R@1 (left) and the student's FLOPs (right) over training iterations.

    Teacher records (``phase == "teacher"``) are drawn dashed on the metric panel when present.
    Returns the path, or None when there is nothing to plot.
    """
    student = [r for r in records if r.get("phase", "student") != "teacher" and "iteration" in r]
    teacher = [r for r in records if r.get("phase") == "teacher" and "iteration" in r]
    if not student and not teacher:
        return None
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for recs, style, who in ((teacher, "--", "teacher"), (student, "-", "student")):
        for key, colour in (("mAP", "#2a5caa"), ("R@1", "#d1762b")):
            pts = [(r["iteration"], r[key]) for r in recs if isinstance(r.get(key), (int, float))]
            if pts:
                ax1.plot(*zip(*pts), style, color=colour, marker="o", ms=3, label=f"{who} {key}")
    ax1.set_xlabel("iteration (of each phase)")
    ax1.set_ylabel("retrieval metric (%)")
    ax1.set_title("retrieval on the held-out split")
    ax1.grid(alpha=0.3)
    if ax1.lines:
        ax1.legend(fontsize=8)
    dense = next((r["flops_dense"] for r in student if r.get("flops_dense")), None)
    scale, unit = (dense / 100.0, "% of the dense student") if dense else (1e6, "MFLOPs")
    for key, colour, label in (("flops", "#2a5caa", "merged now (rows below threshold cut)"),
                               ("flops_planned", "#8fa8d6", "planned (all masked rows cut)")):
        pts = [(r["iteration"], r[key] / scale) for r in student if isinstance(r.get(key), (int, float))]
        if pts:
            ax2.plot(*zip(*pts), "-", color=colour, marker="o", ms=3, label=label)
    if mask_start is not None and ax2.lines:
        ax2.axvline(mask_start, color="#999999", ls=":", lw=1)
        ax2.text(mask_start, 0.02, " masks start", color="#666666", fontsize=8, transform=ax2.get_xaxis_transform())
    ax2.set_xlabel("student iteration")
    ax2.set_ylabel(f"FLOPs ({unit})")
    ax2.set_title("FLOPs of the student merge() would produce")
    ax2.grid(alpha=0.3)
    if ax2.lines:
        ax2.legend(fontsize=8)
    else:
        ax2.text(0.5, 0.5, "no FLOPs in the history", ha="center", va="center", transform=ax2.transAxes)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def write_plots(run_dir: os.PathLike | str, summary: Optional[dict] = None,
                history: Optional[Sequence[dict]] = None) -> List[str]:
    """(Re)draw ``channels.png`` and ``history.png`` in ``run_dir``; return the files written."""
    from .profile import plot_channels

    run_dir = Path(run_dir)
    if summary is None:
        summary = load_summary(find_summary(run_dir))
    if history is None:
        history = load_history(run_dir / "history.jsonl")
    written = []
    title = f"CDD ({summary.get('framework', '?')})"
    channels = summary.get("channels")
    if isinstance(channels, list) and channels:
        written.append(plot_channels(channels, str(run_dir / "channels.png"),
                                     title=f"{title}: output channels per layer, before / after merge"))
    if history:
        config = summary.get("config")
        cdd_cfg = config.get("cdd") if isinstance(config, dict) else None
        mask_start = cdd_cfg.get("mask_start") if isinstance(cdd_cfg, dict) else None
        out = plot_history(history, run_dir / "history.png", title=f"{title}: retrieval and FLOPs over training",
                           mask_start=mask_start if isinstance(mask_start, int) else None)
        if out:
            written.append(out)
    return written


def build_summary(framework: str, config: Any, iterations: int, rows: Sequence[dict], state, **extra) -> dict:
    """The ``cdd_summary/v1`` record every run writes (demo, FastReID, MMPretrain).

    ``rows`` hold ``student_unmerged`` and ``student_merged`` (and usually ``teacher``);
    the reductions compare the merged student with the unmerged one."""
    by = {r["name"]: r for r in rows}
    if "student_unmerged" not in by or "student_merged" not in by:
        raise ReportError("a summary needs the rows 'student_unmerged' and 'student_merged'")
    dense, small = by["student_unmerged"], by["student_merged"]
    summary = {
        "schema": SCHEMA,
        "framework": framework,
        "config": config,
        "iterations": int(iterations),
        "rows": list(rows),
        "flops_reduction": 1.0 - small["flops"] / dense["flops"] if dense["flops"] else 0.0,
        "params_reduction": 1.0 - small["params"] / dense["params"] if dense["params"] else 0.0,
        "predicted_flops": int(state.predicted_flops()),
        "cdd": state.summary(),
    }
    summary.update(extra)
    return summary


def _jsonable(obj: Any):
    if hasattr(obj, "item") and callable(obj.item):   # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist") and callable(obj.tolist):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def write_summary(summary: dict, path: os.PathLike | str) -> None:
    """Validate and write atomically (a crash never leaves half a summary behind)."""
    validate_summary(summary, "the summary to write")
    with atomic_open(path, "w") as fh:
        json.dump(summary, fh, indent=2, default=_jsonable)
        fh.write("\n")


__all__ = ["SCHEMA", "ReportError", "build_summary", "find_summary", "format_table", "load_history", "load_summary", "plot_history",
           "validate_summary", "write_plots", "write_summary"]
