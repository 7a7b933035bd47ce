"""Shared test settings: offline, CPU, small thread count, caches inside the test session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# embedding cache inside the test session, not the user's ~/.cache
os.environ.setdefault("ANATOMY_LIGHTNING_CACHE", tempfile.mkdtemp(prefix="anatomy-lightning-test-cache-"))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present (only on the project's own machines)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls gain nothing from threads, and on a busy shared CPU they lose 10-30x to them.
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def standin(tmp_path_factory: pytest.TempPathFactory):
    """family -> folder of its tiny random-weight stand-in (model + processor, `save_pretrained`),
    built once per test session and shared by every test that runs that family."""
    from tests.support.standins import build_standin

    root = tmp_path_factory.mktemp("standins")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_standin(family, root / family)
        return built[family]

    return get
