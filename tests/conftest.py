"""Shared test setup: a private cache so tests never touch the user's ~/.cache/streamnode."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Set at import, before any test module imports streamnode, and inherited by subprocesses.
if "STREAMNODE_TEST_CACHE" not in os.environ:
    os.environ["STREAMNODE_TEST_CACHE"] = tempfile.mkdtemp(prefix="streamnode-test-cache-")
os.environ["STREAMNODE_CACHE"] = os.environ["STREAMNODE_TEST_CACHE"]
# No test may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The suite's tensors are tiny: intra-op threads gain nothing, and on a shared CPU every
    OpenMP barrier waits for a descheduled sibling (10–50× slower runs seen here)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    from streamnode.diffusion.tiny import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture(scope="session")
def tiny_components(tiny_model_path: Path):  # noqa: ANN201 - ModelComponents, imported lazily
    """The tiny model on the CPU in fp32, loaded once per session through the public loader."""
    from streamnode.diffusion.models import load_components

    return load_components("tiny", device="cpu", dtype="float32", cpu_threads=1)


@pytest.fixture(scope="session")
def tiny_sdxl_components():  # noqa: ANN201 - ModelComponents, imported lazily
    """The tiny SDXL-architecture model (two text encoders, text_time conditioning), CPU, fp32,
    loaded once per session through the public loader."""
    from streamnode.diffusion.models import load_components

    return load_components("tiny-sdxl", device="cpu", dtype="float32", cpu_threads=1)


@pytest.fixture(scope="module")
def components(tiny_components):  # noqa: ANN001, ANN201 - the engine tests' name for them
    return tiny_components
