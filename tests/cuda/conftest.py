"""The CUDA set: every test here is marked `cuda` and skipped, with the reason, where no CUDA device is
present (never run on the CPU in its place). Run it with `pytest tests/cuda` or `pytest -m cuda`."""
import os
import sys

import pytest
import torch

# the shared helpers live one folder up (tests/helpers.py)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NO_CUDA = "no CUDA device: the CUDA set runs only where torch.cuda.is_available()"


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.cuda)
            if not torch.cuda.is_available():
                item.add_marker(pytest.mark.skip(reason=NO_CUDA))


@pytest.fixture(autouse=True)
def strict_float32():
    """Each test starts with TF32 off and leaves the global flags as it found them."""
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
