"""Process set-up shared by the CLI and the workers: offline Hugging Face libraries
without progress bars, and the torch thread count."""

from __future__ import annotations

import logging
import os


def quiet_libraries() -> None:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import datasets  # lm-eval's MC sets: no "Generating test split" bar per evaluation

    datasets.disable_progress_bars()
    for name in ("lm_eval", "datasets", "evaluate"):
        logging.getLogger(name).setLevel(logging.ERROR)


def set_torch_threads(threads: int) -> None:
    """0 keeps torch's default (all cores). A worker process should own its cores: two
    processes that each use every core slow each other down several times over."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def set_loss_backend(name: str) -> None:
    """The token log-prob backend of this process (core.engine.losses: auto, eager, compiled,
    triton); ValueError names the valid ones."""
    from core.engine import losses

    losses.set_backend(name)  # type: ignore[arg-type]
