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

    from core.demo.build import build_model

    torch.set_num_threads(2)
    directory = tmp_path_factory.mktemp("fixture")
    info = build_model(directory, "fixture", seed=0, reference=True)
    assert min(info["accuracy"].values()) >= 0.95, info
    return directory


@pytest.fixture
def compare_loss_backends():
    """Runs catnip_loss (beta 1.5) forward+backward on the eager backend and another
    (default: compiled) and checks they agree: finite loss and gradient, equal loss,
    gradients equal to the dtype's precision. Returns the other backend's gradient
    (float32) for further checks. Leaves the process on the backend it found."""
    import torch

    from core.engine import losses
    from core.engine.losses import catnip_loss, set_backend

    found = losses.get_backend()

    def compare(logits, labels, dtype, backend="compiled", token_stride=1):
        results = {}
        for name in ("eager", backend):
            set_backend(name)
            # a new leaf per backend: logits.to(its own dtype) would be logits itself, so
            # the two backwards would add up in one .grad and compare it with itself
            x = logits.detach().to(dtype, copy=True).requires_grad_(True)
            loss = catnip_loss(x, labels, beta=1.5, token_stride=token_stride)
            loss.backward()
            results[name] = (loss.detach().float(), x.grad.float())
        (loss_e, grad_e), (loss_o, grad_o) = results["eager"], results[backend]
        assert torch.isfinite(loss_o) and torch.isfinite(grad_o).all()
        assert loss_o.item() == pytest.approx(loss_e.item(), rel=1e-5)
        tolerance = 1e-6 if dtype == torch.float32 else 1e-2  # bf16 grads are rounded to 8 bits
        assert torch.allclose(grad_o, grad_e, atol=tolerance, rtol=tolerance)
        return grad_o

    yield compare
    set_backend(found)
