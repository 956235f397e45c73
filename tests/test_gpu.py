"""The CUDA path (bf16, LoRA and full). Marked `gpu`: CI (no GPU) deselects these with
-m "not gpu"; run them where a GPU is: pytest -m gpu. They fail, not skip, without CUDA."""

from __future__ import annotations

import math

import pytest
import torch
from engine_setup import setup_run

from core.losses import catnip_loss
from core.methods import METHODS

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _need_cuda():
    assert torch.cuda.is_available(), "these tests need a CUDA device (deselect with -m 'not gpu')"


@pytest.mark.parametrize("margin", [100.0, 200.0])
def test_bf16_extremes_on_cuda(margin):
    x = torch.zeros(4, 64, 32000, dtype=torch.bfloat16, device="cuda")
    x[..., 7] = margin
    x.requires_grad_(True)
    labels = torch.full((4, 64), 7, device="cuda")
    loss = catnip_loss(x, labels, beta=2.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert loss.item() == pytest.approx(2 * (margin - math.log(31999)), rel=1e-3)


def test_cuda_matches_cpu_fp32():
    torch.manual_seed(0)
    x = torch.randn(2, 50, 1000)
    labels = torch.randint(0, 1000, (2, 50))
    labels[0, :10] = -100
    cpu = x.clone().requires_grad_(True)
    gpu = x.cuda().requires_grad_(True)
    a = catnip_loss(cpu, labels, beta=1.5)
    b = catnip_loss(gpu, labels.cuda(), beta=1.5)
    a.backward()
    b.backward()
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    torch.testing.assert_close(cpu.grad, gpu.grad.cpu(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_backend_matches_eager_on_cuda(dtype, compare_loss_backends):
    """The torch.compile backend (Triton kernels on CUDA) gives the eager loss and
    gradient, with margin-200 rows and masked positions."""
    torch.manual_seed(0)
    logits = torch.randn(2, 64, 32000, device="cuda")
    labels = torch.randint(0, 32000, (2, 64), device="cuda")
    logits[0, 5, labels[0, 5]] = 200.0
    labels[1, :16] = -100
    grad_c = compare_loss_backends(logits, labels, dtype)
    assert (grad_c[1, :16] == 0).all()


@pytest.mark.parametrize("method_id", sorted(METHODS))
@pytest.mark.parametrize("adapter_type", ["lora", "full"])
def test_methods_train_bf16_on_cuda(fixture_dir, method_id, adapter_type):
    from core.modeling import AdapterSpec
    from core.unlearn import run_unlearning

    wrapped, tok, method, params, forget, _ = setup_run(
        fixture_dir, AdapterSpec(type=adapter_type), method_id, device=CUDA)
    assert next(wrapped.model.parameters()).dtype == torch.bfloat16
    before = {n: p.detach().clone() for n, p in wrapped.trainable().items()}
    result = run_unlearning(wrapped, method, params, forget, pad_id=tok.pad_token_id)
    assert all(math.isfinite(h.loss) for h in result.history)
    assert any(not torch.equal(p.detach(), before[n]) for n, p in wrapped.trainable().items())


def test_retain_kl_on_cuda_matches_cpu():
    """The chunked retain KL (loss and gradient) on CUDA equals the CPU's, fp32."""
    from core.losses import kl_retain_loss

    torch.manual_seed(1)
    x, ref = torch.randn(2, 40, 3000), torch.randn(2, 40, 3000)
    labels = torch.zeros(2, 40, dtype=torch.long)
    labels[0, :10] = -100
    cpu, gpu = x.clone().requires_grad_(True), x.cuda().requires_grad_(True)
    loss_cpu, loss_gpu = kl_retain_loss(cpu, ref, labels), kl_retain_loss(gpu, ref.cuda(), labels.cuda())
    loss_cpu.backward()
    loss_gpu.backward()
    assert loss_gpu.item() == pytest.approx(loss_cpu.item(), rel=1e-5)
    torch.testing.assert_close(gpu.grad.cpu(), cpu.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("retain_loss", ["nll", "kl"])
@pytest.mark.parametrize("adapter_type", ["lora", "full"])
def test_retain_terms_train_bf16_on_cuda(fixture_dir, retain_loss, adapter_type):
    """CATNIP with a retain term (NLL, or KL to the reference) on a bf16 model."""
    from core.modeling import AdapterSpec
    from core.unlearn import run_unlearning

    wrapped, tok, method, params, forget, retain = setup_run(
        fixture_dir, AdapterSpec(type=adapter_type), "catnip", device=CUDA,
        retain_loss=retain_loss, retain_weight=0.5)
    result = run_unlearning(wrapped, method, params, forget, pad_id=tok.pad_token_id, retain=retain)
    terms = result.history[-1].terms
    assert set(terms) == {"forget", f"retain_{retain_loss}"}
    assert all(math.isfinite(v) for v in terms.values()) and terms[f"retain_{retain_loss}"] >= 0
