"""The project's root on sys.path: the tests import dynat, evaluate, bench and models from the checkout
itself (nothing is installed); each pytest-xdist worker's threads; and a fixture for runs of dynat.main
inside the test's process."""
import os
import signal
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Under pytest-xdist (the README's `-n 2`) each worker takes its share of the cores: torch's default, every core
# in every process, oversubscribes them (the suite on 2 cores: 441 s with the default, 245 s with this).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture
def one_thread_and_signals():
    """For a run of dynat.main inside the test's process: one thread (tiny tensors), and the SIGINT/SIGTERM
    handlers that dynat.main installs replaced by the ones before it."""
    threads = torch.get_num_threads()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    for s, h in handlers.items():
        signal.signal(s, h)
