"""Fixtures shared by the test modules."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: intra-op threads only cost time (a lot when the cores are busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Names of the fused kernels called during the test (eager steps, and compiled ones through
    the op psiopt::fused_rows), in order."""
    from psiopt.optim import kernels

    calls = []
    real = kernels._call
    monkeypatch.setattr(kernels, "_call", lambda *args: calls.append(args[0]) or real(*args))
    return calls
