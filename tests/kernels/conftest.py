"""Fixtures for the kernel tests: seeded RNGs, and Triton's interpreter switched on per test."""

import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def seed_rngs():
    """Every test starts from the same random state, whatever ran before it."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def one_thread():
    """The kernel tests' tensors are small: on a loaded 2-core machine a second thread only adds
    synchronisation stalls (measured: a chunked fused-linear test took 11.5 s on two threads,
    0.6 s on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def triton_interpreter(monkeypatch):
    """Run the Triton kernels on CPU tensors through triton's interpreter, for this test only.

    `fused_kd_loss` reads TRITON_INTERPRET when it is called, so the variable is set here rather
    than for the whole session: other tests in the same process (the pipeline's CPU training)
    keep the fast reference path. The interpreter evaluates IEEE edge cases (log 0, inf - inf in
    branches a `tl.where` then discards) with numpy, whose warnings are noise here.
    """
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        yield


@pytest.fixture
def cuda():
    """The CUDA device, for tests marked @pytest.mark.gpu; skips the test without one."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")
