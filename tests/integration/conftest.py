"""The integration tests run tiny models: one intra-op thread each (on a shared CPU, spinning OpenMP threads
cost 50-100 ms per new tensor shape, more than the work)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
