"""Sharpness-aware unlearning (hyperparameters.sam_rho): the update is the forget loss's
gradient at the worst-case neighbour theta + rho * g / ||g||, the retain term's at theta;
with any method, adapter, accumulation and resume."""

from __future__ import annotations

import pytest
import torch
from engine_setup import StopAfter, setup_run, train

from core.engine.modeling import AdapterSpec
from core.engine.train import BatchStream, run_unlearning


class _SGD(torch.optim.SGD):
    """Plain SGD in AdamW's place: the step is then -lr x the gradient the loop built."""

    def __init__(self, params, lr, weight_decay=0.0):
        super().__init__(params, lr=lr)


def _gradient(wrapped, method, params, batch, retain_batch=None):
    """The loss gradient (forget; + retain KL when a retain batch is given) at the
    model's current weights, by hand."""
    from core.engine.train_step import _forget_loss, _forward_logits, _retain_term

    model = wrapped.model
    model.zero_grad(set_to_none=True)
    loss = _forget_loss(wrapped, method, params, _forward_logits(model, batch), batch)
    if retain_batch is not None:
        loss = loss + params.retain_weight * _retain_term(
            wrapped, params, retain_batch, torch.device("cpu")
        )
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in wrapped.trainable().items()}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("retain_loss", ["none", "kl"])
def test_the_update_is_the_gradient_at_the_worst_neighbour(fixture_dir, monkeypatch, retain_loss):
    monkeypatch.setattr(torch.optim, "AdamW", _SGD)
    rho, lr = 0.5, 0.1
    hp = {"max_steps": 1, "max_grad_norm": None, "learning_rate": lr, "retain_loss": retain_loss}
    adapter = AdapterSpec(type="full", layers=[1])

    # by hand: g at theta; delta = rho g / ||g||; the forget gradient at theta + delta,
    # the retain gradient at theta
    wrapped, tok, method, params, forget, retain = setup_run(fixture_dir, adapter, "npo", **hp)
    wrapped.model.train()
    batch = BatchStream(forget, params.batch_size, params.seed, tok.pad_token_id).batch(0)
    retain_batch = BatchStream(retain, params.batch_size, params.seed + 1, tok.pad_token_id).batch(
        0
    )
    theta = {n: p.detach().clone() for n, p in wrapped.trainable().items()}
    g = _gradient(wrapped, method, params.model_copy(update={"retain_loss": "none"}), batch)
    norm = torch.sqrt(sum((v**2).sum() for v in g.values()))
    with torch.no_grad():
        for name, p in wrapped.trainable().items():
            p.add_(rho * g[name] / norm)
    at_neighbour = _gradient(wrapped, method, params, batch)
    with torch.no_grad():
        for name, p in wrapped.trainable().items():
            p.copy_(theta[name])
    retain_grad = (
        _gradient(wrapped, method, params, batch, retain_batch)  # forget + retain at theta
        if retain_loss == "kl"
        else None
    )
    expected = {}
    for name in theta:
        step = at_neighbour[name]
        if retain_grad is not None:  # (forget + retain) at theta - forget at theta
            step = step + retain_grad[name] - g[name]
        expected[name] = theta[name] - lr * step

    ran = {}
    for sam_rho in (rho, 0.0):
        wrapped, tok, method, params, forget, retain = setup_run(
            fixture_dir, adapter, "npo", sam_rho=sam_rho, **hp
        )
        run_unlearning(wrapped, method, params, forget, pad_id=tok.pad_token_id, retain=retain)
        ran[sam_rho] = {n: p.detach() for n, p in wrapped.trainable().items()}
    for name, value in expected.items():
        torch.testing.assert_close(ran[rho][name], value, rtol=1e-4, atol=1e-6)
    plain = max((ran[0.0][n] - ran[rho][n]).abs().max().item() for n in expected)
    assert plain > 1e-3  # without it the update is another one


@pytest.mark.parametrize("adapter_type", ["lora", "full"])
@pytest.mark.parametrize("method_id", ["catnip", "rmu", "flat"])
def test_sam_trains_every_form_of_method(fixture_dir, adapter_type, method_id):
    wrapped, tok, method, params, forget, retain = setup_run(
        fixture_dir,
        AdapterSpec(type=adapter_type),
        method_id,
        sam_rho=0.05,
        gradient_accumulation_steps=2,
        batch_size=4,
    )
    result = train(fixture_dir, wrapped, tok, method, params, forget, retain)
    assert result.steps_done == 3 and all(
        torch.isfinite(torch.tensor(h.loss)) for h in result.history
    )


def test_sam_resumes_as_it_ran(fixture_dir, tmp_path):
    from core.errors import JobCancelled

    hp = {"max_steps": 4, "checkpoint_every": 2, "sam_rho": 0.05}

    def run(directory, events=None):
        wrapped, *rest = setup_run(fixture_dir, AdapterSpec(), "catnip", **hp)
        train(fixture_dir, wrapped, *rest, checkpoint_dir=directory, events=events)
        return wrapped.trainable()

    straight = run(tmp_path / "a")
    with pytest.raises(JobCancelled):
        run(tmp_path / "b", StopAfter(2))
    resumed = run(tmp_path / "b")
    for name, param in resumed.items():
        torch.testing.assert_close(param.detach(), straight[name].detach(), rtol=0, atol=1e-6)
