"""Selective updates and the attack in the loop inside the unlearning loop, on the
fixture model: one step of plain SGD in AdamW's place, checked against the update
derived by hand."""

from __future__ import annotations

import pytest
import torch
from engine_setup import setup_run

from core.engine.modeling import AdapterSpec
from core.engine.robust.selective import captured_inputs, linear_modules, principal_basis
from core.engine.train import BatchStream, _attack_stream, run_unlearning
from core.engine.train_step import _forget_loss, _forward_logits, _nll


class _SGD(torch.optim.SGD):
    """Plain SGD in AdamW's place: the step is then -lr x the gradient the loop built."""

    def __init__(self, params, lr, weight_decay=0.0):
        super().__init__(params, lr=lr)


LR = 0.1
HP = {"max_steps": 1, "max_grad_norm": None, "learning_rate": LR}
ADAPTER = AdapterSpec(type="full", layers=[1])


def _grads(wrapped, loss):
    wrapped.model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in wrapped.trainable().items()}
    wrapped.model.zero_grad(set_to_none=True)
    return grads


def _one_step(fixture_dir, **hp):
    wrapped, tok, method, params, forget, retain = setup_run(fixture_dir, ADAPTER, "ga", **HP, **hp)
    run_unlearning(wrapped, method, params, forget, pad_id=tok.pad_token_id, retain=retain)
    return {n: p.detach().clone() for n, p in wrapped.trainable().items()}


def test_the_attack_step_is_the_forget_gradient_at_the_relearned_weights(fixture_dir, monkeypatch):
    """theta_1 = theta - lr grad l_f(theta'), theta' = theta - eta grad NLL_split(theta):
    by hand, then by the loop; a plain step (theta - lr grad l_f(theta)) is another one."""
    monkeypatch.setattr(torch.optim, "AdamW", _SGD)
    eta = 0.5
    attack = {"every": 1, "lr": eta, "steps": 1, "split": 0.2}
    wrapped, tok, method, params, forget, retain = setup_run(
        fixture_dir, ADAPTER, "ga", attack_in_loop=attack, **HP
    )
    wrapped.model.train()
    named = wrapped.trainable()
    theta = {n: p.detach().clone() for n, p in named.items()}
    batch = BatchStream(forget, params.batch_size, params.seed, tok.pad_token_id).batch(0)
    attack_batch = _attack_stream(params, forget, tok.pad_token_id).batch(0)
    assert len(_attack_stream(params, forget, tok.pad_token_id).examples) == round(
        0.2 * len(forget)
    )
    g_attack = _grads(wrapped, _nll(wrapped.model, attack_batch))
    with torch.no_grad():
        for n, p in named.items():
            p.sub_(eta * g_attack[n])
    logits = _forward_logits(wrapped.model, batch)
    g_relearned = _grads(wrapped, _forget_loss(wrapped, method, params, logits, batch))
    expected = {n: theta[n] - LR * g_relearned[n] for n in theta}

    attacked = _one_step(fixture_dir, attack_in_loop=attack)
    plain = _one_step(fixture_dir)
    for name, value in expected.items():
        torch.testing.assert_close(attacked[name], value, rtol=1e-4, atol=1e-6)
    assert max((attacked[n] - plain[n]).abs().max().item() for n in expected) > 1e-3


def test_no_attack_on_the_steps_between(fixture_dir, monkeypatch):
    monkeypatch.setattr(torch.optim, "AdamW", _SGD)
    between = _one_step(fixture_dir, attack_in_loop={"every": 2, "lr": 0.5})
    plain = _one_step(fixture_dir)
    for name, value in plain.items():
        torch.testing.assert_close(between[name], value, rtol=1e-5, atol=1e-7)


def _retain_basis(wrapped, params, retain, pad_id, components):
    """Each trained linear weight's top principal directions of its retain inputs."""
    named = wrapped.trainable()
    batch = BatchStream(retain, params.batch_size, params.seed + 1, pad_id).batch(0)
    layers = linear_modules(wrapped.model, named)
    with captured_inputs(layers, lambda: batch["attention_mask"], 4096) as kept:
        with torch.no_grad():
            wrapped.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return {n: principal_basis(torch.cat(rows), components) for n, rows in kept.items()}


def test_a_projected_step_never_moves_a_layer_along_its_retain_inputs(fixture_dir, monkeypatch):
    monkeypatch.setattr(torch.optim, "AdamW", _SGD)
    k = 4
    wrapped, tok, method, params, forget, retain = setup_run(fixture_dir, ADAPTER, "ga", **HP)
    wrapped.model.train()
    theta = {n: p.detach().clone() for n, p in wrapped.trainable().items()}
    bases = _retain_basis(wrapped, params, retain, tok.pad_token_id, k)
    assert bases, "layer 1 has linear weights"
    projected = _one_step(fixture_dir, selective={"mode": "project", "components": k})
    plain = _one_step(fixture_dir)
    for name, basis in bases.items():
        step, plain_step = projected[name] - theta[name], plain[name] - theta[name]
        assert step.abs().max() > 0
        torch.testing.assert_close(step @ basis, torch.zeros_like(step @ basis), rtol=0, atol=1e-6)
        # on the complement the step is the plain one
        rest = torch.eye(basis.shape[0]) - basis @ basis.T
        torch.testing.assert_close(step @ rest, plain_step @ rest, rtol=1e-4, atol=1e-6)
        assert (plain_step @ basis).abs().max() > 1e-4  # the plain step does move along it
    for name in set(theta) - set(bases):  # norms: as the plain step
        torch.testing.assert_close(projected[name], plain[name], rtol=1e-5, atol=1e-7)


def test_a_masked_step_moves_only_where_the_retain_gradient_agrees(fixture_dir, monkeypatch):
    monkeypatch.setattr(torch.optim, "AdamW", _SGD)
    wrapped, tok, method, params, forget, retain = setup_run(fixture_dir, ADAPTER, "ga", **HP)
    wrapped.model.train()
    theta = {n: p.detach().clone() for n, p in wrapped.trainable().items()}
    batch = BatchStream(forget, params.batch_size, params.seed, tok.pad_token_id).batch(0)
    rbatch = BatchStream(retain, params.batch_size, params.seed + 1, tok.pad_token_id).batch(0)
    logits = _forward_logits(wrapped.model, batch)
    g_forget = _grads(wrapped, _forget_loss(wrapped, method, params, logits, batch))
    g_retain = _grads(wrapped, _nll(wrapped.model, rbatch))
    masked = _one_step(fixture_dir, selective={"mode": "mask"})
    kept = dropped = 0
    for name in theta:
        agree = torch.sign(g_forget[name]) == torch.sign(g_retain[name])
        expected = theta[name] - LR * g_forget[name] * agree
        torch.testing.assert_close(masked[name], expected, rtol=1e-4, atol=1e-7)
        kept, dropped = kept + int(agree.sum()), dropped + int((~agree).sum())
    assert kept > 0 and dropped > 0  # the mask does drop coordinates, and keeps some


@pytest.mark.parametrize("mode", ["both"])
def test_selective_with_a_retain_term_and_lora_trains(fixture_dir, mode):
    wrapped, tok, method, params, forget, retain = setup_run(
        fixture_dir,
        AdapterSpec(type="lora"),
        "catnip",
        selective={"mode": mode, "components": 2},
        attack_in_loop={"every": 2},
        retain_loss="kl",
        gradient_accumulation_steps=2,
        batch_size=4,
    )
    result = run_unlearning(wrapped, method, params, forget, pad_id=tok.pad_token_id, retain=retain)
    assert result.steps_done == 3
    assert all(torch.isfinite(torch.tensor(h.loss)) for h in result.history)
    assert "retain_kl" in result.history[0].terms


def test_selective_without_retain_data_is_refused(fixture_dir):
    wrapped, tok, method, params, forget, _ = setup_run(
        fixture_dir, ADAPTER, "ga", selective={"mode": "mask"}, **HP
    )
    with pytest.raises(ValueError, match="retain"):
        run_unlearning(wrapped, method, params, forget, pad_id=tok.pad_token_id)
