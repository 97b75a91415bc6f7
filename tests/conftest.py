import os
import sys

# Tests import the flat modules of the repository root (unet.py, sd.py, ...), toy/ and bench/.
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path[:0] = [ROOT, os.path.join(ROOT, "toy"), os.path.join(ROOT, "bench")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Modules of tiny models run on one thread: thousands of small ops, where OpenMP's spinning makes a
    shared 2-core machine ~10-100x slower with two. Use: pytestmark = pytest.mark.usefixtures("one_thread")."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
