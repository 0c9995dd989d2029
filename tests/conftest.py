import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny_config():
    from qvlm.config import get_preset

    return get_preset("tiny")


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """A cache home of the test's own ($QVLM_CACHE): feature caches and probes never leak between tests.
    Whole files take it with `pytestmark = pytest.mark.usefixtures("private_cache")`."""
    monkeypatch.setenv("QVLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def tiny_images():
    """Eight visually distinct 32x32 images (fixed seed)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(8)]
