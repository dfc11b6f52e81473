"""The trade-off study's plumbing end to end (benchmarks/bench_tradeoff.py --preset smoke) on a
generated Market-1501 folder: pretraining, teacher, KD, the recipe with its validation choice of
the lasso, ResRep's row with its end cut, the light student, the report, and the cache. The study's
claims rest on this code (rows compared at equal FLOPs, reruns reproducing every figure), so these
are what the test asserts; accuracy at smoke size means nothing and is not asserted."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from synthetic import write_market1501

ROOT = Path(__file__).resolve().parents[1]
ROWS = "kd_heavy,cdd_rggr,cdd_norm,light"


def _study(data: Path, out: Path, cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), CDD_BENCH_CACHE=str(cache))
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_tradeoff.py"), "--preset", "smoke",
                           "--data", str(data), "--out", str(out), "--rows", ROWS, "--threads", "2",
                           "--progress", "never"], cwd=str(out.parent), env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    work = tmp_path_factory.mktemp("tradeoff")
    # the smoke preset draws 8 study + 4 validation + 8 pretraining identities from the training split
    data = write_market1501(work / "Market-1501-v15.09.15", train_ids=20, test_ids=8, train_images=8,
                            gallery_images=4, seed=3)
    cache = work / "cache"
    first = _study(data, work / "run1", cache)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return data, work, cache, first


def _rows(out: Path) -> dict:
    res = json.loads((out / "results.json").read_text())
    return {r["row"]: r for r in res["rows"]}, res


def test_study_runs_every_requested_row_and_compares_them_at_equal_flops(study):
    _, work, _, _ = study
    rows, res = _rows(work / "run1")
    assert set(rows) == {"teacher", "kd_heavy", "cdd_rggr", "cdd_norm", "light"}
    for name, r in rows.items():
        assert 0.0 <= r["mAP"] <= 100.0 and r["flops"] > 0, (name, r)
    assert rows["kd_heavy"]["flops_vs_heavy"] == pytest.approx(1.0)
    # the recipe stops masking at its FLOPs target, and the rows it is compared with are matched to it
    recipe = rows["cdd_rggr"]["flops_vs_heavy"]
    assert recipe <= res["settings"]["flops_target"] + 0.01
    for other in ("cdd_norm", "light"):
        assert rows[other]["flops_vs_heavy"] == pytest.approx(recipe, abs=0.02), other
    # every CDD candidate is reported with its validation figure, and the choice is the best of them
    cands = res["lasso_selection"]
    chosen = [c for c in cands if c["chosen"]]
    assert len(chosen) == 1 and all("val_mAP" in c and "test_mAP" in c for c in cands), cands
    eligible = [c for c in cands if c["reduction"] >= res["settings"]["min_reduction"]] or cands
    assert chosen[0]["val_mAP"] == max(c["val_mAP"] for c in eligible)
    md = (work / "run1" / "results.md").read_text()
    assert all(r["label"] in md for r in rows.values())


def test_a_rerun_from_the_cache_reproduces_every_figure_without_training(study):
    data, work, cache, first = study
    second = _study(data, work / "run2", cache)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    a, _ = _rows(work / "run1")
    b, _ = _rows(work / "run2")
    assert set(a) == set(b)
    for name in a:
        for key in ("mAP", "rank1", "val_mAP", "flops", "params"):
            assert a[name].get(key) == b[name].get(key), (name, key)
    log1 = first.stdout + first.stderr + (work / "run1" / "run.log").read_text()
    log2 = second.stdout + second.stderr + (work / "run2" / "run.log").read_text()
    assert "it 12/12" in log1  # the first run trained ...
    assert "it 12/12" not in log2  # ... the second only read the cache
