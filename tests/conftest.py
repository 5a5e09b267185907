import pytest
import torch

# Tests run small tensors: one thread avoids oversubscription when CI or the team runs in parallel.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
