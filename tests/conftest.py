from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def fixture_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo benchmark (~70k-parameter Llama that knows 200 facts), built once."""
    import torch

    from core.demo import build_model

    torch.set_num_threads(2)
    directory = tmp_path_factory.mktemp("fixture")
    info = build_model(directory, "fixture", seed=0)
    assert min(info["accuracy"].values()) >= 0.95, info
    return directory
