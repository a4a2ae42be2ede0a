"""The unit tier: pure and fast (the whole tier runs in under a minute on the 2-core CI machine). Nothing here starts
Ray, DeepSpeed's process groups or a server; a test that needs one belongs in tests/integration."""

from __future__ import annotations

import sys

import pytest


def _ray_up() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def _process_group_up() -> bool:
    return "torch.distributed" in sys.modules and sys.modules["torch.distributed"].is_initialized()


@pytest.fixture(autouse=True)
def _stays_a_unit_test():
    before = _ray_up(), _process_group_up()
    yield
    if _ray_up() and not before[0]:
        pytest.fail("a unit test started Ray: move it to tests/integration")
    if _process_group_up() and not before[1]:
        pytest.fail("a unit test started a torch.distributed process group: move it to tests/integration")
