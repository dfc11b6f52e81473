import os

import torch

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
