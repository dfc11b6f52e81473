"""Shared set-up for the FastReID integration tests: configs for small runs on the synthetic Market-1501
(the ``synthetic_market`` fixture of conftest.py)."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "fastreid" / "smoke"
TEACHER_YML = SMOKE / "teacher_R18_market_subset.yml"
CDD_YML = SMOKE / "cdd_R18_market_subset.yml"
MARKET_DIRNAME = "Market-1501-v15.09.15"


def datasets_root(market: Path) -> str:
    """FastReID's DATASETS.ROOT for that folder (it looks for <root>/Market-1501-v15.09.15, else <root>)."""
    return str(market.parent if market.name == MARKET_DIRNAME else market)


def smoke_cfg(config_file: Path, out_dir: Path, market: Path, *opts: str):
    """A small-run config: the shipped smoke yaml with the data root and output folder of this test."""
    from cdd_plugin.integrations.fastreid import load_config

    return load_config(str(config_file), ["DATASETS.ROOT", datasets_root(market), "OUTPUT_DIR", str(out_dir),
                                          *opts])

