"""Shared pytest fixtures."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist


@pytest.fixture(scope="session")
def single_process_group():
    """A one-rank gloo process group (e.g. the TP group of a model run in this single process)."""
    from magi_train.parallel.groups import init_distributed

    init_distributed()
    return dist.new_group([0])


@pytest.fixture
def one_thread():
    """One intra-op thread: bit-reproducible CPU results; the previous setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """Every test under tests/distributed/ spawns 2-4 gloo ranks: mark it `multirank`, so that `make test-fast`
    (unit tests only) can leave the multi-process tests to `make test`."""
    for item in items:
        if "distributed" in item.path.parts:
            item.add_marker(pytest.mark.multirank)
