import os
import warnings

import pytest

# Tests never reach a model hub: every model is built in the test.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")


@pytest.fixture(scope="session", autouse=True)
def _stop_distributed_pools():
    yield
    from tests import harness

    harness.shutdown()
