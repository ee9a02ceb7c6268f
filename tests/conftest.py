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


# The longest test files first, so that on two pytest workers (make test: -n 2 --dist loadfile, in collection
# order) the longest one does not start last while the other worker idles: the distillation run (about 6 min on
# one core), the other end-to-end programs, the multi-rank tests, then the unit tests.
FIRST = ("tests/e2e/test_distill_cli.py",)
DIRECTORY_ORDER = ("e2e", "distributed")


def _run_order(item) -> tuple:
    path = item.path.relative_to(item.config.rootpath).as_posix()
    if path in FIRST:
        return (0, FIRST.index(path))
    parts = item.path.parts
    for rank, directory in enumerate(DIRECTORY_ORDER, start=1):
        if directory in parts:
            return (rank, 0)
    return (len(DIRECTORY_ORDER) + 1, 0)


def pytest_collection_modifyitems(config, items):
    """Every test under tests/distributed/ spawns 2-4 gloo ranks: mark it `multirank`, so that `make test-fast`
    (unit tests only) can leave the multi-process tests to `make test`. Then order the files for two workers
    (a stable sort: within a file, and within a group of files, the collection order stays)."""
    for item in items:
        if "distributed" in item.path.parts:
            item.add_marker(pytest.mark.multirank)
    items.sort(key=_run_order)
