import os
import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def pytest_runtest_logreport(report):
    """With DCX_TEST_LOG set, append each test's outcome to that file as it comes ("passed
    tests/...::test[cuda]"), so a run cut short (benchmarks/gpu_check.sh caps it) still counts
    what ran. Written by the controller only, where pytest-xdist runs workers."""
    path = os.environ.get("DCX_TEST_LOG")
    if not path or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if report.when == "call" or report.outcome != "passed":
        reason = ""
        if report.skipped and isinstance(report.longrepr, tuple):
            reason = " " + str(report.longrepr[2]).replace("\n", " ")
        with open(path, "a") as f:
            f.write(f"{report.outcome} {report.nodeid}{reason}\n")
