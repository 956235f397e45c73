"""Robust and selective forgetting, by hand on tensors and tiny models: shrink-and-perturb
interpolates exactly; distillation reproduces its teacher; the projection removes exactly
the named subspace and leaves its complement; the mask keeps only agreeing coordinates;
the attack in the loop's gradient is the forget gradient at the relearned weights."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from core.engine.data import Example
from core.engine.robust.attack_loop import relearned
from core.engine.robust.distill import (
    distill,
    distill_kl,
    fresh_init,
    next_token_mask,
    shrink_and_perturb,
)
from core.engine.robust.selective import (
    captured_inputs,
    linear_modules,
    mask_gradients,
    principal_basis,
    project_gradients,
    project_off,
    sign_agreement,
)
from core.engine.spec.robust import RobustifySpec


def _tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


# --- shrink and perturb ----------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.6, 1.0])
def test_shrink_and_perturb_interpolates_exactly(alpha):
    model = _tiny_llama(1)
    # the trained weights differ from any init: make them so
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    init = {n: p.detach().clone() for n, p in fresh_init(model, seed=7).named_parameters()}
    shrink_and_perturb(model, alpha, seed=7)
    for name, after in model.named_parameters():
        expected = (1 - alpha) * before[name].double() + alpha * init[name].double()
        torch.testing.assert_close(after.double(), expected, rtol=0, atol=1e-6)
        if alpha == 0.0:
            assert torch.equal(after, before[name])
        if alpha == 1.0:
            assert torch.equal(after, init[name])


def test_the_fresh_init_is_the_seeds_and_leaves_the_global_rng_alone():
    model = _tiny_llama(1)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = dict(fresh_init(model, seed=7).named_parameters())
    assert torch.equal(torch.random.get_rng_state(), state)
    b = dict(fresh_init(model, seed=7).named_parameters())
    c = dict(fresh_init(model, seed=8).named_parameters())
    weight = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(a[weight], b[weight])
    assert not torch.equal(a[weight], c[weight])
    assert not torch.equal(a[weight], dict(model.named_parameters())[weight])


# --- distillation ----------------------------------------------------------------


def test_distill_kl_by_hand():
    """Two positions over V = 2, the second masked out: KL = sum p_t (log p_t - log p_s)."""
    teacher = torch.log(torch.tensor([[[0.75, 0.25], [0.5, 0.5]]]))
    student = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]))
    expected = 0.75 * torch.log(torch.tensor(0.75 / 0.5)) + 0.25 * torch.log(
        torch.tensor(0.25 / 0.5)
    )
    got = distill_kl(student, teacher, torch.tensor([[1, 0]]))
    torch.testing.assert_close(got, expected)
    assert float(distill_kl(teacher, teacher, torch.tensor([[1, 1]]))) == pytest.approx(0, abs=1e-7)
    mask = next_token_mask(torch.tensor([[1, 1, 1, 0]]))
    assert mask.tolist() == [[1, 1, 0, 0]]


def _distill_set(count: int, length: int, seed: int) -> list[Example]:
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(1, 32, (count, length), generator=generator).tolist()
    return [Example(input_ids=row, labels=row) for row in rows]


def _kl_on(student, teacher, examples):
    ids = torch.tensor([e.input_ids for e in examples])
    attention = torch.ones_like(ids)
    with torch.no_grad():
        s = student(input_ids=ids, attention_mask=attention).logits
        t = teacher(input_ids=ids, attention_mask=attention).logits
    return float(distill_kl(s, t, next_token_mask(attention))), (s.argmax(-1) == t.argmax(-1))


def test_distillation_reproduces_the_teacher_on_the_distillation_set():
    teacher = _tiny_llama(3)
    with torch.no_grad():  # a sharper teacher than a fresh init: something to copy
        teacher.lm_head.weight.mul_(30)
    student = _tiny_llama(3)
    student.load_state_dict(teacher.state_dict())
    shrink_and_perturb(student, 1.0, seed=11)  # all the way to a fresh init
    examples = _distill_set(8, 12, seed=0)
    kl_before, _ = _kl_on(student, teacher, examples)
    options = RobustifySpec(alpha=1.0, steps=300, learning_rate=1e-2, batch_size=8)
    result = distill(student, teacher, examples, options, pad_id=0)
    kl_after, agree = _kl_on(student, teacher, examples)
    assert result.steps_done == 300
    assert kl_before > 0.5, kl_before
    assert kl_after < 0.02 * kl_before, (kl_before, kl_after, agree.float().mean())
    assert agree[:, :-1].float().mean() > 0.97
    # and the teacher is untouched
    assert all(not p.requires_grad for p in teacher.parameters())


# --- selective updates -------------------------------------------------------------


def _orthonormal(d: int, k: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator))
    return q[:, :k], q[:, k:]


def test_the_projection_removes_exactly_the_named_subspace():
    basis, complement = _orthonormal(10, 3, seed=0)
    grad = torch.randn(6, 10, generator=torch.Generator().manual_seed(1))
    projected = project_off(grad, basis)
    torch.testing.assert_close(projected @ basis, torch.zeros(6, 3), rtol=0, atol=1e-6)
    torch.testing.assert_close(projected @ complement, grad @ complement)
    # removing nothing changes nothing; removing everything leaves nothing
    torch.testing.assert_close(project_off(grad, torch.zeros(10, 0)), grad)
    full, _ = _orthonormal(10, 10, seed=0)
    torch.testing.assert_close(project_off(grad, full), torch.zeros(6, 10), rtol=0, atol=1e-5)


def test_the_principal_basis_spans_the_rows_subspace():
    basis, _ = _orthonormal(10, 2, seed=2)
    rows = torch.randn(50, 2, generator=torch.Generator().manual_seed(3)) @ basis.T
    found = principal_basis(rows, 2)
    torch.testing.assert_close(found @ found.T, basis @ basis.T, rtol=0, atol=1e-5)
    assert principal_basis(rows, 99).shape == (10, 10)  # k capped at min(N, d)


def test_a_layers_gradient_loses_exactly_the_retain_inputs_directions():
    """A linear layer on retain inputs confined to a 3-d subspace S: its forget gradient,
    projected with the captured inputs, is 0 on S and unchanged on S's complement."""
    layer = torch.nn.Sequential(torch.nn.Linear(8, 4, bias=False))
    named = dict(layer.named_parameters())
    inside, outside = _orthonormal(8, 3, seed=4)
    retain = (torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(5)) @ inside.T).float()
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    with captured_inputs(linear_modules(layer, named), lambda: mask, 4096) as kept:
        with torch.no_grad():
            layer(retain)
    assert sum(len(r) for r in kept["0.weight"]) == 7  # the 7 real tokens only
    forget = torch.randn(3, 8, generator=torch.Generator().manual_seed(6))
    layer(forget).pow(2).sum().backward()
    original = named["0.weight"].grad.clone()
    project_gradients(named, kept, components=3)
    grad = named["0.weight"].grad
    torch.testing.assert_close(grad @ inside, torch.zeros(4, 3), rtol=0, atol=1e-5)
    torch.testing.assert_close(grad @ outside, original @ outside, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(original @ inside, torch.zeros(4, 3), atol=1e-3)


def test_the_mask_keeps_only_the_agreeing_coordinates():
    forget = torch.tensor([1.0, -2.0, 3.0, 0.0, -1.0, 0.5])
    retain = torch.tensor([2.0, -1.0, -1.0, 5.0, 0.0, 0.1])
    assert sign_agreement(forget, retain).tolist() == [1.0, -2.0, 0.0, 0.0, 0.0, 0.5]
    named = {"w": torch.nn.Parameter(torch.zeros(6)), "v": torch.nn.Parameter(torch.zeros(2))}
    named["w"].grad, named["v"].grad = forget.clone(), torch.tensor([1.0, -1.0])
    mask_gradients(named, {"w": retain, "v": None})
    assert named["w"].grad.tolist() == [1.0, -2.0, 0.0, 0.0, 0.0, 0.5]
    assert named["v"].grad.tolist() == [0.0, 0.0]  # no retain gradient: nothing agrees


# --- the attack in the loop --------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2])
def test_the_attack_in_the_loop_takes_the_forget_gradient_at_the_relearned_weights(steps):
    """l_a(w) = 1/2 ||w - a||^2 (the attacker pulls w to a), l_f(w) = 1/2 ||w - c||^2.
    One SGD step: w' = w - eta (w - a); k steps: w_k - a = (1 - eta)^k (w - a). The
    first-order meta-gradient is grad l_f(w_k) = w_k - c, where the plain one is w - c."""
    w0, a, c, eta = (
        torch.tensor([1.0, -2.0]),
        torch.tensor([3.0, 1.0]),
        torch.tensor([0.5, 0.5]),
        0.25,
    )
    w = torch.nn.Parameter(w0.clone())
    named = {"w": w}
    with relearned(named, lambda _i: 0.5 * (w - a).pow(2).sum(), eta, steps):
        relearned_w = w.detach().clone()
        (0.5 * (w - c).pow(2).sum()).backward()
    expected_w = a + (1 - eta) ** steps * (w0 - a)
    torch.testing.assert_close(relearned_w, expected_w)
    torch.testing.assert_close(w.grad, expected_w - c)
    assert not torch.allclose(w.grad, w0 - c)  # the plain gradient
    assert torch.equal(w.detach(), w0)  # the weights are back
