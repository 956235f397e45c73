"""CATNIP and baselines: hand-computed values, eq. 9's gradient, extremes, masking."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from core.engine import losses
from core.engine.losses import IGNORE_INDEX, logprobs, set_backend, strided_mask, token_logprobs
from core.losses import catnip_loss  # the contract's import path


def _two_token_logits(margins: list[float], vocab: int = 3) -> torch.Tensor:
    """[1, len(margins), vocab]: target 0 has logit m, the others 0."""
    x = torch.zeros(1, len(margins), vocab, dtype=torch.float64)
    for t, m in enumerate(margins):
        x[0, t, 0] = m
    return x


def test_catnip_hand_computed_value():
    """Two tokens, V = 3, target logit m, others 0:
        z = e^m / (e^m + 2),  1 - z = 2 / (e^m + 2),  log z - log(1-z) = m - log 2
        per token: softplus(beta * (m - log 2)); loss = mean of the two.
    m = 0: softplus(-beta log 2) = log(1 + 2^-beta); beta = 1 -> log 1.5.
    m = log 2: softplus(0) = log 2.  Loss = (log 1.5 + log 2) / 2 = log(3) / 2.
    """
    logits = _two_token_logits([0.0, math.log(2.0)])
    labels = torch.zeros(1, 2, dtype=torch.long)
    loss = catnip_loss(logits, labels, beta=1.0)
    assert loss.item() == pytest.approx(math.log(3.0) / 2, abs=1e-12)


def test_catnip_beta_scales_inside_softplus():
    """beta = 2, m = 0: softplus(-2 log 2) = log(1 + 1/4) = log 1.25."""
    loss = catnip_loss(_two_token_logits([0.0]), torch.zeros(1, 1, dtype=torch.long), beta=2.0)
    assert loss.item() == pytest.approx(math.log(1.25), abs=1e-12)


@pytest.mark.parametrize(
    "masked",
    [[(0, slice(0, 2)), (1, slice(4, None))], [(1, slice(5, None))], []],
    ids=["prompt-and-padding", "one-padding-position", "every-row-counts"],
)
def test_gradient_matches_eq9_closed_form(masked):
    """Autograd gradient == (1/|y|) sum_i beta z^b/(z^b + (1-z)^b) * grad log z_i, per sample,
    then mean over samples (eq. 9), on random logits with a prompt and padding mask (the
    backward gathers the counted rows), with one position masked and with none (at 90% of
    the rows or more it writes every row straight into the gradient)."""
    torch.manual_seed(0)
    B, T, V, beta = 3, 6, 7, 1.7
    logits = torch.randn(B, T, V, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    for row, positions in masked:
        labels[row, positions] = IGNORE_INDEX
    catnip_loss(logits, labels, beta=beta).backward()

    x = logits.detach().clone().requires_grad_(True)
    logz = F.log_softmax(x, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    z = logz.detach().exp()
    weight = beta * z**beta / (z**beta + (1 - z) ** beta)
    mask = (labels != IGNORE_INDEX).double()
    per_sample = mask / mask.sum(1, keepdim=True) / B
    (weight * per_sample * logz).sum().backward()
    torch.testing.assert_close(logits.grad, x.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("margin", [100.0, 200.0])
def test_extreme_margins_stay_finite(dtype, margin):
    """z rounds to 1: log(1 - z) must come from the other tokens' mass, not 1 - exp(log z).
    With V = 32 and the target at +margin: log z - log(1-z) = margin - log 31 exactly."""
    x = torch.zeros(2, 4, 32, dtype=dtype)
    x[..., 5] = margin
    x.requires_grad_(True)
    labels = torch.full((2, 4), 5)
    loss = catnip_loss(x, labels, beta=2.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert loss.item() == pytest.approx(2.0 * (margin - math.log(31)), rel=1e-5)
    # and a confident wrong token: z -> 0, loss -> 0, gradient finite
    x2 = torch.zeros(1, 1, 32, dtype=dtype)
    x2[..., 0] = margin
    x2.requires_grad_(True)
    loss2 = catnip_loss(x2, torch.tensor([[5]]), beta=2.0)
    loss2.backward()
    assert torch.isfinite(x2.grad).all() and loss2.item() == pytest.approx(0.0, abs=1e-6)


def test_token_logprobs_exact_where_naive_cancels():
    """float32, margin 40: naive log(1 - exp(log z)) gives -inf; ours gives -40 - 0."""
    x = torch.zeros(1, 1, 2)
    x[0, 0, 0] = 40.0
    logp, log1m = token_logprobs(x, torch.tensor([[0]]))
    naive = torch.log1p(-torch.exp(F.log_softmax(x, -1)[0, 0, 0]))
    assert torch.isinf(naive)
    assert log1m.item() == pytest.approx(-40.0, abs=1e-5)
    assert logp.item() == pytest.approx(0.0, abs=1e-6)


def test_padding_invariance():
    """Extra padded positions (and a fully padded sample) change neither loss nor grads."""
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 9, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 9, (2, 5))
    padded = torch.cat([logits.detach(), torch.randn(2, 3, 9, dtype=torch.float64)], dim=1)
    padded = torch.cat([padded, torch.randn(1, 8, 9, dtype=torch.float64)], dim=0)
    padded.requires_grad_(True)
    padded_labels = torch.full((3, 8), IGNORE_INDEX)
    padded_labels[:2, :5] = labels
    a = catnip_loss(logits, labels, beta=1.3)
    b = catnip_loss(padded, padded_labels, beta=1.3)
    assert a.item() == pytest.approx(b.item(), abs=1e-12)
    a.backward()
    b.backward()
    torch.testing.assert_close(padded.grad[:2, :5], logits.grad)
    assert padded.grad[:, 5:].abs().max() == 0 and padded.grad[2].abs().max() == 0


def test_per_sample_mean_is_length_robust():
    """A sample's weight does not grow with its length: the mean of per-sample means."""
    x = torch.zeros(2, 4, 3, dtype=torch.float64)
    labels = torch.tensor([[0, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX], [0, 0, 0, 0]])
    x[1, :, 0] = math.log(2.0)  # sample 2 tokens: softplus(0) = log 2 each
    loss = catnip_loss(x, labels, beta=1.0)  # sample 1: log 1.5 (see hand-computed test)
    assert loss.item() == pytest.approx((math.log(1.5) + math.log(2.0)) / 2, abs=1e-12)


def test_stride_semantics():
    """Of each sample's counted positions, in order, those with index % stride == 0."""
    labels = torch.tensor(
        [
            [IGNORE_INDEX, 1, 1, 1, 1, 1, 1, IGNORE_INDEX],
            [1, 1, 1, IGNORE_INDEX, 1, IGNORE_INDEX, 1, 1],
        ]
    )
    mask = strided_mask(labels, 3)
    assert mask.tolist() == [
        [False, True, False, False, True, False, False, False],
        [True, False, False, False, True, False, False, False],
    ]
    with pytest.raises(ValueError):
        strided_mask(labels, 0)


def test_stride_equals_masking_by_hand():
    torch.manual_seed(2)
    logits = torch.randn(2, 8, 5, dtype=torch.float64)
    labels = torch.randint(0, 5, (2, 8))
    manual = labels.clone()
    manual[strided_mask(labels, 2) == 0] = IGNORE_INDEX
    assert catnip_loss(logits, labels, beta=1.0, token_stride=2).item() == pytest.approx(
        catnip_loss(logits, manual, beta=1.0).item(), abs=1e-12
    )


def test_no_counted_tokens_gives_zero_with_graph():
    x = torch.randn(1, 3, 4, requires_grad=True)
    loss = catnip_loss(x, torch.full((1, 3), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0 and x.grad.abs().max() == 0


def test_baselines_hand_computed():
    """One sample, two tokens with log z = log 0.5 each; reference log z = log 0.25 each.
    GA: mean log z = log 0.5.
    NPO (beta=1): -(2) log sigmoid(-(2 log .5 - 2 log .25)) = -2 log sigmoid(-2 log 2)
                  = -2 log(1 / (1 + 4)) = 2 log 5.
    SimNPO (beta=2, gamma=0.5): -(1) log sigmoid(-(2/2)(2 log .5) - .5) = softplus(-(2 log 2 - .5)).
    CATNIP_ref (beta=1): softplus(log .5 - log .25) = softplus(log 2) = log 3 per token.
    catnip_seq (beta=1): log z - log(1-z) = 0 per token -> softplus(0) = log 2.
    """
    logp = torch.full((1, 2), math.log(0.5), dtype=torch.float64)
    log1m = torch.full((1, 2), math.log(0.5), dtype=torch.float64)
    ref = torch.full((1, 2), math.log(0.25), dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    assert losses.ga_from_logprobs(logp, mask).item() == pytest.approx(math.log(0.5))
    assert losses.npo_from_logprobs(logp, ref, mask, 1.0).item() == pytest.approx(2 * math.log(5))
    assert losses.simnpo_from_logprobs(logp, mask, 2.0, 0.5).item() == pytest.approx(
        F.softplus(torch.tensor(-(2 * math.log(2) - 0.5), dtype=torch.float64)).item()
    )
    assert losses.catnip_ref_from_logprobs(logp, ref, mask, 1.0).item() == pytest.approx(
        math.log(3)
    )
    assert losses.catnip_seq_from_logprobs(logp, log1m, mask, 1.0).item() == pytest.approx(
        math.log(2)
    )
    assert losses.nll_from_logprobs(logp, mask).item() == pytest.approx(-math.log(0.5))


def test_kl_retain_zero_for_identical_and_positive_otherwise():
    torch.manual_seed(3)
    a = torch.randn(2, 3, 5, requires_grad=True)
    labels = torch.zeros(2, 3, dtype=torch.long)
    assert losses.kl_retain_loss(a, a.detach(), labels).item() == pytest.approx(0.0, abs=1e-6)
    b = torch.randn(2, 3, 5)
    kl = losses.kl_retain_loss(a, b, labels)
    expected = (
        F.kl_div(F.log_softmax(b, -1), F.log_softmax(a, -1), log_target=True, reduction="none")
        .sum(-1)
        .mean()
    )
    assert kl.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("chunk_rows", [3, 1000], ids=["chunks-of-3-rows", "one-chunk"])
def test_kl_retain_matches_the_formula_and_autograd(monkeypatch, chunk_rows):
    """The chunked KL equals sum_v q (log q - log r) over counted positions, per-sample
    mean then mean over samples; its hand-written backward passes gradcheck (float64);
    the reference gets no gradient; a masked position with NaN logits changes nothing."""
    monkeypatch.setattr(
        logprobs, "CHUNK_ELEMENTS", {"cpu": chunk_rows * 9, "default": chunk_rows * 9}
    )
    torch.manual_seed(5)
    logits = torch.randn(3, 5, 9, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(3, 5, 9, dtype=torch.float64, requires_grad=True)
    labels = torch.zeros(3, 5, dtype=torch.long)
    labels[0, :2] = IGNORE_INDEX
    labels[2] = IGNORE_INDEX  # a sample with no counted position does not count
    logq, logr = F.log_softmax(logits, -1), F.log_softmax(ref, -1)
    kl = (logq.exp() * (logq - logr)).sum(-1)
    mask = (labels != IGNORE_INDEX).double()
    expected = ((kl * mask).sum(1) / mask.sum(1).clamp(min=1))[:2].mean()
    loss = losses.kl_retain_loss(logits, ref, labels)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    loss.backward()
    assert ref.grad is None
    (expected_grad,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(logits.grad, expected_grad, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda x: losses.kl_retain_loss(x, ref.detach(), labels),
        (logits.detach().clone().requires_grad_(True),),
    )
    poisoned = logits.detach().clone()
    poisoned[2, 0] = float("nan")
    assert losses.kl_retain_loss(poisoned, ref, labels).item() == pytest.approx(
        loss.item(), rel=1e-12
    )


@pytest.mark.parametrize("masked", ["none", "last-positions", "prompts"])
def test_chunking_does_not_change_results(monkeypatch, masked):
    """Chunks of 7 rows give the single-chunk loss and gradient: when every row counts,
    when only each sample's last position does not (the dense backward), and when
    prompts do not (the gathered backward); rows that do not count get a zero gradient."""
    torch.manual_seed(4)
    x = torch.randn(3, 50, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (3, 50))
    if masked == "last-positions":
        labels[:, -1] = IGNORE_INDEX
    if masked == "prompts":
        labels[:, :9] = IGNORE_INDEX
        labels[2, 30:] = IGNORE_INDEX
    full = catnip_loss(x, labels, beta=1.5)
    (g_full,) = torch.autograd.grad(full, x)
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", {"cpu": 7 * 11, "default": 7 * 11})  # 7 rows
    chunked = catnip_loss(x, labels, beta=1.5)
    (g_chunked,) = torch.autograd.grad(chunked, x)
    assert full.item() == pytest.approx(chunked.item(), abs=1e-12)
    torch.testing.assert_close(g_full, g_chunked)
    assert torch.all(g_chunked[labels == IGNORE_INDEX] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_backend_matches_eager(dtype, compare_loss_backends):
    """The torch.compile backend gives the eager loss and gradient: random rows, a
    margin-200 row (z rounds to 1), a confident wrong token, masked positions and a
    fully masked sample."""
    torch.manual_seed(3)
    logits = torch.randn(3, 6, 40)
    logits[0, 1, 7] = 200.0
    logits[1, 2, 3] = 200.0
    labels = torch.randint(0, 40, (3, 6))
    labels[0, 1], labels[1, 2] = 7, 9
    labels[0, :1] = IGNORE_INDEX
    labels[2] = IGNORE_INDEX
    grad_c = compare_loss_backends(logits, labels, dtype)
    assert (grad_c[2] == 0).all() and (grad_c[0, 0] == 0).all()  # masked rows get nothing
    labels = labels.clamp(min=0)
    compare_loss_backends(logits, labels, dtype)  # every row counts
    labels[1, -1] = IGNORE_INDEX
    grad_c = compare_loss_backends(logits, labels, dtype)  # 17 of 18 rows count: dense
    assert (grad_c[1, -1] == 0).all()


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="valid: auto, eager, compiled, triton"):
        set_backend("fused")


def test_triton_backend_needs_triton_and_cuda(monkeypatch):
    """auto runs CPU logits on the eager backend; triton is refused where Triton is not
    installed, and on CPU tensors (outside Triton's interpreter) with a clear error.
    Triton versions are compared by their numeric parts (auto needs TRITON_VERIFIED)."""
    x, labels = torch.randn(2, 3, 10), torch.randint(0, 10, (2, 3))
    assert losses.get_backend() == "auto" and not losses.use_triton(x)
    assert losses.version_tuple("3.6.0+git9a8b7c") == (3, 6, 0) >= losses.TRITON_VERIFIED
    assert losses.version_tuple("3.0.0") < losses.TRITON_VERIFIED <= losses.version_tuple("3.10rc1")
    monkeypatch.setattr(losses.backend, "triton_installed", lambda: False)
    with pytest.raises(ValueError, match="needs the triton package"):
        set_backend("triton")
    monkeypatch.setattr(losses.backend, "triton_installed", lambda: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    set_backend("triton")
    try:
        with pytest.raises(ValueError, match="runs on CUDA tensors, not cpu"):
            catnip_loss(x, labels)
    finally:
        set_backend("auto")


def test_the_eager_cpu_losses_run_on_their_own_thread_count(monkeypatch):
    """The eager row loops run on set_cpu_threads' count (default 1) and give the same
    loss and gradients as on the process's threads; the process's count is put back."""
    from core.engine.losses import get_cpu_threads, kl_retain_loss, set_cpu_threads
    from core.engine.losses.backend import cpu_threads

    assert get_cpu_threads() == 1
    seen: list[int] = []
    for name in ("_chunked_forward", "_chunked_backward"):
        original = getattr(logprobs, name)

        def spy(*args, _original=original):
            seen.append(torch.get_num_threads())
            return _original(*args)

        monkeypatch.setattr(logprobs, name, spy)
    torch.manual_seed(0)
    logits = torch.randn(2, 24, 500)
    labels = torch.randint(0, 500, (2, 24))
    ref = logits + torch.randn_like(logits)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = {}
        for threads in (1, None):
            set_cpu_threads(threads)
            seen.clear()
            x = logits.clone().requires_grad_(True)
            loss = catnip_loss(x, labels, beta=1.5) + kl_retain_loss(x, ref, labels)
            loss.backward()
            results[threads] = (loss.detach(), x.grad)
            assert seen == [threads or 2] * 2, seen  # the forward and the backward
            assert torch.get_num_threads() == 2
        assert torch.allclose(results[1][0], results[None][0], rtol=1e-6)
        assert torch.allclose(results[1][1], results[None][1], rtol=1e-5, atol=1e-8)
        with cpu_threads(torch.device("meta")):  # other devices are left alone
            assert torch.get_num_threads() == 2
        with pytest.raises(ValueError, match="at least 1"):
            set_cpu_threads(0)
    finally:
        set_cpu_threads(1)
        torch.set_num_threads(before)
