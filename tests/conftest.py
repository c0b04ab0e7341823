import os
import sys

import pytest
import torch
from hypothesis import settings

sys.path.insert(0, os.path.dirname(__file__))

# CI: derandomized, few examples. Before a stop: HYPOTHESIS_PROFILE=thorough python -m pytest -q
# (random, 25x the examples of each property and stateful test: hundreds for the cheap ones).
settings.register_profile("lora_fx", deadline=None, derandomize=True, print_blob=True)
settings.register_profile("thorough", deadline=None, derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "lora_fx"))

# The README's command runs the suite on pytest-xdist workers, one per core: each worker computes on
# one thread so that the workers do not contend for the cores (results are the same at the tests'
# tolerances).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
