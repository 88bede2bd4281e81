import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
if not torch.cuda.is_available():  # Triton kernels run in the interpreter (set before any kernel is defined)
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
