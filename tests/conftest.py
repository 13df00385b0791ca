import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of many tiny-model calls (`pytestmark = pytest.mark.usefixtures(
    "one_thread")`): they gain nothing from a second thread, and on a shared 2-core CPU a second spinning thread
    slows them several-fold (up to ~20x measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shared_data():
    path = SHARED / "data"
    if not path.is_dir():
        pytest.skip("../shared/data is absent")
    return path


@pytest.fixture()
def tiny_pipe():
    from pipeline.models import tiny_pipeline

    return tiny_pipeline(seed=0)
