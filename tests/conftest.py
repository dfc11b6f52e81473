import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the tests' helper modules

from synthetic import MARKET_DIRNAME, write_market1501, write_sop  # noqa: E402

# Property tests: derandomised (the same examples on every run) in CI, exploring locally.
from hypothesis import settings as _hyp_settings  # noqa: E402

_hyp_settings.register_profile("ci", derandomize=True, print_blob=True)
_hyp_settings.register_profile("dev", print_blob=True)
_hyp_settings.load_profile("ci" if os.environ.get("CI", "").lower() == "true" else "dev")

# Deterministic, quiet CPU runs: two cores, no oversubscription between torch and BLAS.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_sessionfinish(session, exitstatus):
    session.config._cdd_exitstatus = int(exitstatus)


def pytest_unconfigure(config):
    """Leave with pytest's own status once every result is reported. A native thread pool
    (seen once: "terminate called without an active exception") can abort during interpreter
    teardown, after the last test, and would turn a green run into exit code 134."""
    status = getattr(config, "_cdd_exitstatus", None)
    if status is not None and os.environ.get("CDD_TEST_HARD_EXIT", "1") == "1":
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


@pytest.fixture(scope="session")
def synthetic_market(tmp_path_factory) -> Path:
    """A drawn, redistributable Market-1501 folder (tests/synthetic.py): 8 training identities x 20
    images, 8 test identities (2 queries, 6 gallery images each), distractors and junk, 6 cameras.
    FastReID's and MMPretrain's own loaders read it; so every integration test runs on any clone."""
    return write_market1501(tmp_path_factory.mktemp("synthetic") / MARKET_DIRNAME)


@pytest.fixture(scope="session")
def synthetic_sop(tmp_path_factory) -> Path:
    """A drawn Stanford Online Products folder: 6 training and 6 test classes, 4 JPEGs each."""
    return write_sop(tmp_path_factory.mktemp("synthetic_sop") / "Stanford_Online_Products")
