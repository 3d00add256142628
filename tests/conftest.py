"""Shared fixtures: GPU-marked tests skip without a GPU; every test gets a seed of its own.

A test's seed is derived from its node id (so a failure replays with the same inputs) and
mixed with ``AVSTFP_TEST_SEED`` (default 0; set another value for fresh inputs). The seed is
printed in the report of a failing test.
"""
import os
import zlib

import pytest
import torch

# The one place the tests choose the Triton mode: without a GPU the triton backend runs
# in the CPU interpreter (unless the caller set TRITON_INTERPRET itself).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    # Triton fixes at import time whether its kernels are interpreted.  Import them once
    # here, under this run's TRITON_INTERPRET, so that a test which flips the variable to
    # see a backend refuse the CPU cannot be the first importer and leave the kernels
    # half-set-up for the interpreter tests after it (the result would depend on order).
    if os.environ.get("TRITON_INTERPRET") == "1":
        try:
            import avstfp_fast.kernels.prompted_attention  # noqa: F401
        except ImportError:                 # no triton: its tests skip through why_not
            pass


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def test_seed(nodeid: str) -> int:
    base = int(os.environ.get("AVSTFP_TEST_SEED", "0"))
    return (zlib.crc32(nodeid.encode()) + base * 1_000_003) % 2**31


test_seed.__test__ = False


@pytest.fixture(autouse=True)
def _seed_and_precision(request):
    seed = test_seed(request.node.nodeid)
    request.node.user_properties.append(("seed", seed))
    torch.manual_seed(seed)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        seeds = [v for k, v in item.user_properties if k == "seed"]
        if seeds:
            rep.sections.append(("seed", f"torch seed {seeds[0]} (from the node id; "
                                 f"AVSTFP_TEST_SEED={os.environ.get('AVSTFP_TEST_SEED', '0')})"))
