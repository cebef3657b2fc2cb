import os

import pytest
import torch

from helpers import deadline


def pytest_configure(config):
    config.addinivalue_line("markers", "alarm(seconds): fail the test (instead of hanging) after that many seconds")
    # Under pytest-xdist each worker gets one core's worth of threads; oversubscribing two cores with
    # 2 workers x 2 threads makes every test slower.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests: `pytestmark = pytest.mark.usefixtures("one_thread")`.

    Tensors this small: with several threads on a shared, loaded machine the OpenMP hand-offs cost more
    than the work (a 32x32 conv takes 30 ms instead of 0.5 ms).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def alarm(request):
    """A test (or module, via pytestmark) marked `alarm(seconds)` fails instead of blocking when it hangs."""
    marker = request.node.get_closest_marker("alarm")
    if marker is None:
        yield
        return
    with deadline(marker.args[0]):
        yield
