import os

import pytest
import torch

# Kernels run in Triton's interpreter on machines without a GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _fresh_torch_state():
    """Each test draws its own fresh random inputs; threads kept to the machine's cores."""
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield


@pytest.fixture
def one_thread():
    """Tiny models: one thread is several times faster than two on a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def flash_config():
    """Change glalearn.flash.CONFIG for one test, restored afterwards."""
    from glalearn import flash

    saved = dict(flash.CONFIG)
    yield flash.CONFIG
    flash.CONFIG.clear()
    flash.CONFIG.update(saved)
