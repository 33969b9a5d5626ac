"""Shared fixtures: ``one_thread`` (tiny tensors run several times faster on one intra-op thread of a shared CPU;
use it with ``pytestmark = pytest.mark.usefixtures("one_thread")`` or as an argument)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One torch intra-op thread for a module's tests (module scope: set before the module's own module-scoped
    fixtures when listed first, e.g. in ``pytestmark``), the previous count restored after them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
