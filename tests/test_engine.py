"""The unlearning loop on the fixture model: every method, LoRA and full, resume, outputs."""

from __future__ import annotations

import math

import pytest
import torch
from engine_setup import StopAfter, setup_run, train

from core.engine.events import Events
from core.engine.modeling import AdapterSpec, load_base, save_output, wrap
from core.engine.spec.methods import METHODS
from core.engine.train import run_unlearning

CPU = torch.device("cpu")


@pytest.mark.parametrize("method_id", sorted(METHODS))
@pytest.mark.parametrize("adapter_type", ["lora", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_method_trains(fixture_dir, method_id, adapter_type, dtype):
    """Finite loss; trainable parameters change; frozen ones do not. In fp32 and in bf16
    (the GPU's dtype, here on the CPU: the dtype paths run in CI, the CUDA ones in
    tests/test_gpu.py)."""
    chosen = adapter_type == "full" and not METHODS[method_id].chooses_parameters
    adapter = AdapterSpec(type=adapter_type, layers=[1] if chosen else None)
    wrapped, tok, method, params, forget, retain = setup_run(
        fixture_dir, adapter, method_id, dtype=dtype
    )
    before = {n: p.detach().clone() for n, p in wrapped.model.named_parameters()}
    trainable = set(wrapped.trainable())
    assert trainable and len(trainable) < len(before)
    result = train(fixture_dir, wrapped, tok, method, params, forget, retain)
    assert set(wrapped.trainable()) == trainable  # reference passes leave what trains alone
    assert result.steps_done == 3
    assert all(torch.isfinite(torch.tensor(h.loss)) for h in result.history)
    for name, param in wrapped.model.named_parameters():
        changed = not torch.equal(param.detach(), before[name])
        if name in trainable:
            # LoRA B starts at zero: every adapter matrix moves after a step
            assert changed, f"trainable {name} did not change"
        else:
            assert not changed, f"frozen {name} changed"


@pytest.mark.parametrize("retain_loss", ["nll", "kl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("adapter_type", ["lora", "full"])
def test_retain_terms(fixture_dir, retain_loss, dtype, adapter_type):
    wrapped, tok, method, params, forget, retain = setup_run(
        fixture_dir,
        AdapterSpec(type=adapter_type),
        "npo",
        dtype=dtype,
        retain_loss=retain_loss,
        retain_weight=0.5,
    )
    result = run_unlearning(wrapped, method, params, forget, pad_id=tok.pad_token_id, retain=retain)
    terms = result.history[-1].terms
    assert set(terms) == {"forget", f"retain_{retain_loss}"}
    assert terms[f"retain_{retain_loss}"] >= 0


def test_lora_reference_is_the_same_model_without_adapter(fixture_dir):
    wrapped, tok, method, params, forget, _ = setup_run(fixture_dir, AdapterSpec(), "npo")
    assert wrapped.reference is None  # no copy for LoRA
    run_unlearning(wrapped, method, params, forget, pad_id=tok.pad_token_id)
    base, _ = load_base(fixture_dir / "model", CPU)
    ids = torch.tensor([forget[0].input_ids])
    with wrapped.reference_mode() as reference:
        torch.testing.assert_close(reference(input_ids=ids).logits, base(input_ids=ids).logits)


def test_reference_only_when_needed(fixture_dir):
    wrapped, *_ = setup_run(fixture_dir, AdapterSpec(type="full"), "catnip")
    assert wrapped.reference is None and wrapped.reference_layers is None
    wrapped, *_ = setup_run(fixture_dir, AdapterSpec(type="full"), "npo")
    assert wrapped.reference is not None


def test_chosen_layers_reference_copies_only_those_layers(fixture_dir):
    """Full weights of chosen layers: the reference is the model with frozen copies of
    those layers swapped in, not a copy of the whole model, and NPO trains exactly as
    with a whole-model copy (same losses, same weights)."""
    import copy

    from core.engine.modeling import Wrapped, decoder_layers

    adapter = AdapterSpec(type="full", layers=[1])
    wrapped, tok, method, params, forget, _ = setup_run(fixture_dir, adapter, "npo", max_steps=4)
    assert wrapped.reference is None and set(wrapped.reference_layers) == {1}
    copied = sum(p.numel() for p in wrapped.reference_layers[1].parameters())
    assert copied == sum(p.numel() for p in decoder_layers(wrapped.model)[1].parameters())
    assert (
        copied < sum(p.numel() for p in wrapped.model.parameters()) / 2
    )  # 1 of 2 layers, no embeddings
    initial = copy.deepcopy(wrapped.model).eval().requires_grad_(False)
    whole, *_ = setup_run(fixture_dir, adapter, "npo", max_steps=4)
    whole = Wrapped(whole.model, adapter, reference=initial)  # a whole-model copy instead

    swapped = run_unlearning(wrapped, method, params, forget, pad_id=tok.pad_token_id)
    copied_run = run_unlearning(whole, method, params, forget, pad_id=tok.pad_token_id)
    assert [h.loss for h in swapped.history] == [h.loss for h in copied_run.history]
    assert all(
        torch.equal(p, q)
        for p, q in zip(wrapped.model.parameters(), whole.model.parameters(), strict=True)
    )
    # the live layer is back in place, training, and the copy still holds the initial weights
    assert decoder_layers(wrapped.model)[1] is not wrapped.reference_layers[1]
    assert wrapped.model.training is False  # the loop ends in eval mode
    ids = torch.tensor([forget[0].input_ids])
    with wrapped.reference_mode() as reference:
        torch.testing.assert_close(reference(input_ids=ids).logits, initial(input_ids=ids).logits)


@pytest.mark.parametrize("adapter_type", ["lora", "full"])
def test_resume_equals_uninterrupted(fixture_dir, tmp_path, adapter_type):
    """Stop at step 3 of 6 (a cancel), resume from the checkpoint: same weights to 1e-6."""
    hp = {
        "max_steps": 6,
        "checkpoint_every": 3,
        "lr_scheduler": "cosine",
        "warmup_steps": 2,
        "batch_size": 16,
    }
    adapter = AdapterSpec(type=adapter_type, dropout=0.1 if adapter_type == "lora" else 0.0)

    wrapped, tok, method, params, forget, _ = setup_run(fixture_dir, adapter, "catnip", **hp)
    run_unlearning(
        wrapped, method, params, forget, pad_id=tok.pad_token_id, checkpoint_dir=tmp_path / "a"
    )
    straight = {n: p.detach().clone() for n, p in wrapped.trainable().items()}

    from core.errors import JobCancelled

    wrapped, tok, method, params, forget, _ = setup_run(fixture_dir, adapter, "catnip", **hp)
    with pytest.raises(JobCancelled):
        run_unlearning(
            wrapped,
            method,
            params,
            forget,
            pad_id=tok.pad_token_id,
            checkpoint_dir=tmp_path / "b",
            events=StopAfter(3),
        )
    assert (tmp_path / "b" / "step-0000003" / "state.json").is_file()
    wrapped, tok, method, params, forget, _ = setup_run(fixture_dir, adapter, "catnip", **hp)
    resumed = run_unlearning(
        wrapped, method, params, forget, pad_id=tok.pad_token_id, checkpoint_dir=tmp_path / "b"
    )
    assert [h.step for h in resumed.history] == [4, 5, 6]
    for name, param in wrapped.trainable().items():
        torch.testing.assert_close(param.detach(), straight[name], rtol=0, atol=1e-6)


def test_a_checkpoint_resumes_only_its_own_run(fixture_dir, tmp_path):
    """Rerunning into the same checkpoint directory with another learning rate, method,
    adapter or forget set is refused before anything is restored (neither the other
    run's weights resumed nor a KeyError on other parameter names). What leaves the
    maths alone (checkpoint_every, gradient checkpointing) may change."""
    from core.errors import SpecError

    hp = {"max_steps": 4, "checkpoint_every": 2}
    wrapped, tok, method, params, forget, _ = setup_run(fixture_dir, AdapterSpec(), "catnip", **hp)
    run_unlearning(
        wrapped, method, params, forget, pad_id=tok.pad_token_id, checkpoint_dir=tmp_path
    )
    for adapter, method_id, change, examples in (
        (AdapterSpec(), "catnip", {"learning_rate": 2e-3}, None),
        (AdapterSpec(), "npo", {}, None),
        (AdapterSpec(type="full"), "catnip", {}, None),
        (AdapterSpec(), "catnip", {}, slice(1, None)),
    ):
        wrapped, tok, method, params, forget, _ = setup_run(
            fixture_dir, adapter, method_id, **hp, **change
        )
        before = {n: p.detach().clone() for n, p in wrapped.trainable().items()}
        with pytest.raises(SpecError, match="is from another run") as error:
            run_unlearning(
                wrapped,
                method,
                params,
                forget[examples] if examples else forget,
                pad_id=tok.pad_token_id,
                checkpoint_dir=tmp_path,
            )
        assert error.value.code == "checkpoint_mismatch"
        assert all(torch.equal(p, before[n]) for n, p in wrapped.trainable().items())
    wrapped, tok, method, params, forget, _ = setup_run(
        fixture_dir,
        AdapterSpec(),
        "catnip",
        max_steps=4,
        checkpoint_every=3,
        gradient_checkpointing=True,
    )
    resumed = run_unlearning(
        wrapped, method, params, forget, pad_id=tok.pad_token_id, checkpoint_dir=tmp_path
    )
    assert resumed.steps_done == 4 and resumed.history == []  # the finished run, resumed at its end


def test_lora_adapter_round_trips_through_peft(fixture_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    wrapped, tok, method, params, forget, _ = setup_run(
        fixture_dir, AdapterSpec(merge=True), "catnip", max_steps=5, learning_rate=5e-3
    )
    run_unlearning(wrapped, method, params, forget, pad_id=tok.pad_token_id)
    written = save_output(wrapped, tok, tmp_path)
    assert (written["adapter"] / "adapter_config.json").is_file()
    assert (written["adapter"] / "adapter_model.safetensors").is_file()
    ids = torch.tensor([forget[0].input_ids])
    base = AutoModelForCausalLM.from_pretrained(fixture_dir / "model")
    base_logits = base(input_ids=ids).logits
    loaded = PeftModel.from_pretrained(base, written["adapter"]).eval()
    with torch.no_grad():
        expected = wrapped.model(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - base_logits).abs().max() > 1e-3  # the adapter changes the outputs
    merged = AutoModelForCausalLM.from_pretrained(written["model"])
    torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_full_weights_output_loads(fixture_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wrapped, tok, method, params, forget, _ = setup_run(fixture_dir, AdapterSpec(type="full"), "ga")
    run_unlearning(wrapped, method, params, forget, pad_id=tok.pad_token_id)
    written = save_output(wrapped, tok, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(written["model"])
    AutoTokenizer.from_pretrained(written["model"])
    ids = torch.tensor([forget[0].input_ids])
    torch.testing.assert_close(model(input_ids=ids).logits, wrapped.model(input_ids=ids).logits)


def _full_weight_update(fixture_dir, dtype, **hp):
    """The flat update of 40 full-weight CATNIP steps at the paper's lr (1e-5), in fp32."""
    wrapped, tok, method, params, forget, _ = setup_run(
        fixture_dir,
        AdapterSpec(type="full"),
        "catnip",
        dtype=dtype,
        max_steps=40,
        batch_size=16,
        learning_rate=1e-5,
        **hp,
    )
    before = {n: p.detach().float().clone() for n, p in wrapped.trainable().items()}
    run_unlearning(wrapped, method, params, forget, pad_id=tok.pad_token_id)
    assert all(p.dtype == dtype for p in wrapped.trainable().values())  # the model keeps its dtype
    return torch.cat(
        [(p.detach().float() - before[n]).flatten() for n, p in wrapped.trainable().items()]
    )


def test_bf16_full_weights_follow_the_fp32_update(fixture_dir):
    """Full weights in bf16 (the GPU default) with fp32 master weights move as in fp32:
    the update of 40 steps at lr 1e-5 has 0.99x the fp32 update's size and cosine 0.87
    with it (the rest is bf16 rounding of the result). Without masters (pure bf16) the
    steps round away: 0.20x the size, cosine 0.22, 6% of the weights ever moved."""
    fp32 = _full_weight_update(fixture_dir, torch.float32)
    masters = _full_weight_update(fixture_dir, torch.bfloat16)
    pure = _full_weight_update(fixture_dir, torch.bfloat16, master_weights=False)
    cosine = torch.nn.functional.cosine_similarity
    assert 0.9 < masters.norm() / fp32.norm() < 1.1 and cosine(masters, fp32, dim=0) > 0.8
    assert pure.norm() / fp32.norm() < 0.4 and cosine(pure, fp32, dim=0) < 0.4
    assert (pure != 0).float().mean() < 0.1 < 0.5 < (masters != 0).float().mean()


def test_bf16_resume_restores_the_master_weights(fixture_dir, tmp_path):
    """The checkpoint holds the fp32 masters, not the rounded bf16 weights: a bf16 run
    stopped at step 2 of 4 and resumed ends bit-identical to one that was not stopped."""
    hp = {"max_steps": 4, "checkpoint_every": 2, "learning_rate": 1e-5, "dtype": torch.bfloat16}
    wrapped, tok, method, params, forget, _ = setup_run(
        fixture_dir, AdapterSpec(type="full"), "catnip", **hp
    )
    run_unlearning(
        wrapped, method, params, forget, pad_id=tok.pad_token_id, checkpoint_dir=tmp_path / "a"
    )
    straight = {n: p.detach().clone() for n, p in wrapped.trainable().items()}

    class CancelAt2(Events):
        def should_cancel(self) -> bool:
            return (tmp_path / "b" / "step-0000002").is_dir()

    from core.errors import JobCancelled

    wrapped, tok, method, params, forget, _ = setup_run(
        fixture_dir, AdapterSpec(type="full"), "catnip", **hp
    )
    with pytest.raises(JobCancelled):
        run_unlearning(
            wrapped,
            method,
            params,
            forget,
            pad_id=tok.pad_token_id,
            checkpoint_dir=tmp_path / "b",
            events=CancelAt2(),
        )
    wrapped, tok, method, params, forget, _ = setup_run(
        fixture_dir, AdapterSpec(type="full"), "catnip", **hp
    )
    resumed = run_unlearning(
        wrapped, method, params, forget, pad_id=tok.pad_token_id, checkpoint_dir=tmp_path / "b"
    )
    assert [h.step for h in resumed.history] == [3, 4]
    assert all(torch.equal(p.detach(), straight[n]) for n, p in wrapped.trainable().items())


def test_deterministic_on_cpu(fixture_dir):
    runs = []
    for _ in range(2):
        wrapped, tok, method, params, forget, _ = setup_run(fixture_dir, AdapterSpec(), "catnip")
        run_unlearning(wrapped, method, params, forget, pad_id=tok.pad_token_id)
        runs.append({n: p.detach().clone() for n, p in wrapped.trainable().items()})
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name])


@pytest.mark.parametrize(
    ("adapter_type", "method_id"), [("lora", "catnip"), ("full", "catnip"), ("lora", "npo")]
)
def test_gradient_checkpointing_gives_the_same_weights(fixture_dir, adapter_type, method_id):
    """With checkpointing each decoder layer runs its forward again in the backward (so
    its activations were not kept), and training ends at the same weights; NPO's
    reference pass (the same LoRA model, adapter off, no grad) is not recomputed."""
    adapter = AdapterSpec(type=adapter_type)
    runs = {}
    for checkpointing in (False, True):
        wrapped, tok, method, params, forget, _ = setup_run(
            fixture_dir, adapter, method_id, gradient_checkpointing=checkpointing
        )
        # a module inside the checkpointed layer starts again on recomputation (a pre-hook:
        # torch stops a recomputation as soon as it has what the backward needs)
        mlp = next(m for n, m in wrapped.model.named_modules() if n.endswith("layers.0.mlp"))
        calls = []
        mlp.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        run_unlearning(wrapped, method, params, forget, pad_id=tok.pad_token_id)
        runs[checkpointing] = (
            {n: p.detach().clone() for n, p in wrapped.trainable().items()},
            len(calls),
        )
        assert not any(
            getattr(m, "gradient_checkpointing", False)  # off again after
            for m in wrapped.model.modules()
        )
    (plain, plain_calls), (checkpointed, checkpointed_calls) = runs[False], runs[True]
    passes = 2 if method.uses_reference else 1  # NPO also runs the reference forward
    assert plain_calls == passes * params.max_steps
    assert checkpointed_calls == (passes + 1) * params.max_steps  # + the recomputation
    for name, value in plain.items():
        torch.testing.assert_close(checkpointed[name], value, rtol=0, atol=1e-6)


def test_gradient_checkpointing_is_switched_off_after_a_cancel(fixture_dir):
    """A cancelled run (JobCancelled raised mid-loop) leaves no checkpointing behind."""
    from core.errors import JobCancelled

    class CancelAtOnce(Events):
        def should_cancel(self) -> bool:
            return True

    wrapped, tok, method, params, forget, _ = setup_run(
        fixture_dir, AdapterSpec(), "catnip", gradient_checkpointing=True
    )
    with pytest.raises(JobCancelled):
        run_unlearning(
            wrapped, method, params, forget, pad_id=tok.pad_token_id, events=CancelAtOnce()
        )
    assert not any(getattr(m, "gradient_checkpointing", False) for m in wrapped.model.modules())


def test_the_lora_reference_pass_has_no_dropout(fixture_dir):
    """The reference of a LoRA job (the model with its adapter disabled) runs in eval
    mode, as a full-weight reference (a frozen copy) does: on models with dropout (GPT-2,
    OPT) NPO, catnip_ref and the retain KL see the same reference on every pass, not a
    noisy one, and the model's mode is restored after it."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(fixture_dir / "model")
    config = AutoConfig.for_model(
        "gpt2",
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=64,
        resid_pdrop=0.5,
        embd_pdrop=0.5,
        attn_pdrop=0.5,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    expected = model.eval()(input_ids=torch.arange(1, 9)[None]).logits
    wrapped = wrap(model, AdapterSpec(type="lora", r=4), need_reference=True)
    wrapped.model.train()
    ids = torch.arange(1, 9)[None]
    with wrapped.reference_mode() as reference:
        first = reference(input_ids=ids).logits
    with wrapped.reference_mode() as reference:
        second = reference(input_ids=ids).logits
    assert torch.equal(first, second)
    torch.testing.assert_close(first, expected)
    assert wrapped.model.training


def test_simnpo_normalises_in_the_log_probs_precision():
    """SimNPO divides beta by the lengths in the log-probs' dtype (torch divides by
    integer lengths in float32, ~1e-8 relative off in float64): in float64 the loss equals
    the formula's to 1e-13."""
    from core.engine import losses

    logp = torch.full((1, 3), -10.0, dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss = losses.simnpo_from_logprobs(logp, mask, 1.0, 0.0)
    u = -(1.0 / 3.0) * -30.0  # -(beta/|y|) * sum log z, in float64
    expected = 2.0 * math.log1p(math.exp(-u))  # -2 log sigmoid(u), stably
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected, rel=1e-13, abs=0)
