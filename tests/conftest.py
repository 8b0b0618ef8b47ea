from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter (set before any kernel module is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from specattn.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from specattn.engine.engine import LLMEngine
from specattn.engine.loader import ModelFiles, load_model_files

CAPITAL_QUESTION = "What is the capital of France? Answer in one sentence."


@pytest.fixture(scope="session")
def smollm_files() -> ModelFiles:
    """The embedded model, dequantized once per run (later loads hit the on-disk cache)."""
    return load_model_files(None)


@pytest.fixture(scope="session")
def make_engine(smollm_files):
    """Build engines over the shared embedded-model weights with a chosen cache and scheduler."""

    def make(num_pages: int = 512, page_size: int = 16, max_num_seqs: int = 64, max_num_batched_tokens: int = 512,
             async_scheduling: bool = True, **kw):
        cfg = EngineConfig(
            cache=CacheConfig(page_size=page_size, num_pages=num_pages),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                      async_scheduling=async_scheduling),
            **kw,
        )
        return LLMEngine(cfg, smollm_files)

    return make


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
