import pytest
import torch

# Tests run small tensors: one thread avoids oversubscription when CI or the team runs in parallel.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    # One thread also for bit-identical comparisons: a test that changes it (the CLI's --threads)
    # must not leak its setting into the next.
    torch.manual_seed(0)
    yield
    torch.set_num_threads(1)
