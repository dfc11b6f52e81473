"""Shared set-up for the FastReID integration tests: where Market-1501 is, configs for small runs."""
from __future__ import annotations

import os
from pathlib import Path
import pytest

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "fastreid" / "smoke"
TEACHER_YML = SMOKE / "teacher_R18_market_subset.yml"
CDD_YML = SMOKE / "cdd_R18_market_subset.yml"
MARKET_DIRNAME = "Market-1501-v15.09.15"


def market1501_dir() -> Path:
    """The Market-1501 folder (env CDD_MARKET1501, default <repo>/../shared/data/Market-1501-v15.09.15).

    Missing data fails the test in CI (CI=true) and skips it elsewhere.
    """
    path = Path(os.environ.get("CDD_MARKET1501", REPO.parent / "shared" / "data" / MARKET_DIRNAME))
    if not (path / "bounding_box_train").is_dir():
        msg = (f"Market-1501 not found at {path} (set CDD_MARKET1501 to the folder holding bounding_box_train, "
               "query and bounding_box_test)")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def datasets_root(market: Path) -> str:
    """FastReID's DATASETS.ROOT for that folder (it looks for <root>/Market-1501-v15.09.15, else <root>)."""
    return str(market.parent if market.name == MARKET_DIRNAME else market)


def smoke_cfg(config_file: Path, out_dir: Path, market: Path, *opts: str):
    """A small-run config: the shipped smoke yaml with the data root and output folder of this test."""
    from cdd_plugin.integrations.fastreid import load_config

    return load_config(str(config_file), ["DATASETS.ROOT", datasets_root(market), "OUTPUT_DIR", str(out_dir),
                                          *opts])

