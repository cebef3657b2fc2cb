import os

import torch


def pytest_configure(config):
    # Under pytest-xdist each worker gets one core's worth of threads; oversubscribing two cores with
    # 2 workers x 2 threads makes every test slower.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
