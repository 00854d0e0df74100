"""Shared fixtures: tiny SD-shaped pipelines saved as folders, the prompt mirror, and the repo root on sys.path."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
# One intra-op thread (set before torch is imported; inherited by the notebook kernel and subprocesses): on a
# 2-core machine, idle OpenMP workers of one process spin and starve another (the notebook ran 30x slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")

SHARED_PROMPTS = os.path.normpath(os.path.join(ROOT, "..", "shared", "prompts"))
if os.path.isdir(SHARED_PROMPTS):
    # Benchmark prompt files come from this verified copy instead of the network (utils/prompts.py).
    os.environ.setdefault("MEMSHARP_PROMPT_MIRROR", SHARED_PROMPTS)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true",
                     help="also run the tests marked slow (long end-to-end runs; or set MEMSHARP_SLOW=1)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a long end-to-end run whose property a faster test also covers "
                            "in part; skipped unless --runslow or MEMSHARP_SLOW=1")


def pytest_collection_modifyitems(config, items):
    # The default run (CI, the README's command) stays within its time budget on 2 cores; the slow runs are
    # kept for release checks and for changes to the code they cover.
    if config.getoption("--runslow") or os.environ.get("MEMSHARP_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow end-to-end run: use --runslow or MEMSHARP_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def prompt_mirror():
    """The verified copy of the paper's prompt files beside the checkout (CI lays ../shared beside it)."""
    if not os.path.isdir(SHARED_PROMPTS):
        pytest.skip("no ../shared/prompts mirror beside this checkout")
    return SHARED_PROMPTS


def _saved_tiny(tmp_path_factory, prediction_type):
    from utils.demo.model import tiny_pipeline
    folder = tmp_path_factory.mktemp(f"tiny_{prediction_type}")
    tiny_pipeline(prediction_type=prediction_type, seed=0).save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def tiny_eps_dir(tmp_path_factory):
    """Folder of a tiny random epsilon-prediction SD pipeline (loads with from_pretrained)."""
    return _saved_tiny(tmp_path_factory, "epsilon")


@pytest.fixture(scope="session")
def tiny_v_dir(tmp_path_factory):
    """Folder of a tiny random v-prediction SD pipeline."""
    return _saved_tiny(tmp_path_factory, "v_prediction")


@pytest.fixture(scope="session")
def tiny_eps(tiny_eps_dir):
    import torch
    from utils.models.families import load_pipeline
    return load_pipeline(tiny_eps_dir, torch.device("cpu"), torch.float32)
