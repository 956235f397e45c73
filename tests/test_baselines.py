"""FLAT and RMU: their losses by hand, what RMU trains and reads, FLAT's contrast set,
their data requirements, and that each does what it says on the fixture model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from engine_setup import StopAfter, method_data, setup_run, train

from core.demo.build import contrast_file
from core.engine import losses
from core.engine.contrast import BUILT_IN, REFUSALS, build_contrast, contrast_records
from core.engine.data import encode_records, load_records
from core.engine.modeling import AdapterSpec, decoder_layers
from core.engine.pipeline import run_job
from core.engine.spec import parse_spec
from core.engine.spec.methods import METHODS, parse_params
from core.engine.steps import StepInputs, hidden_states_at, rmu_layers, rmu_step
from core.engine.train import run_unlearning
from core.errors import DataError, SpecError

# --- the losses by hand --------------------------------------------------------------


def test_flat_tv_hand_computed_value_and_direction():
    """L = tanh(P_f)/2 - tanh(P_e)/2, P the per-sample mean token probability, then the
    mean over samples. Forget: sample 1 has 0.5 and 0.2 (mean 0.35), sample 2 has 0.9
    (its second position does not count): P_f = 0.625. Contrast: 0.1 and 0.3: P_e = 0.2."""
    logp = torch.tensor([[0.5, 0.2], [0.9, 0.7]]).log().requires_grad_(True)
    mask = torch.tensor([[True, True], [True, False]])
    contrast = torch.tensor([[0.1], [0.3]]).log().requires_grad_(True)
    contrast_mask = torch.tensor([[True], [True]])
    loss = losses.flat_tv_from_logprobs(logp, mask, contrast, contrast_mask)
    expected = 0.5 * math.tanh(0.625) - 0.5 * math.tanh(0.2)
    assert loss.item() == pytest.approx(expected, abs=1e-7)
    loss.backward()
    # descending the loss lowers every counted forget probability, raises every contrast one
    assert (logp.grad[mask] > 0).all() and logp.grad[1, 1] == 0
    assert (contrast.grad < 0).all()
    # d/dlog z of tanh(P_f)/2 at z = 0.5 in sample 1: (1 - tanh^2 0.625)/2 * z / 2 / 2
    d = (1 - math.tanh(0.625) ** 2) / 2 * 0.5 / 2 / 2
    assert logp.grad[0, 0].item() == pytest.approx(d, rel=1e-6)


def test_hidden_mse_hand_computed_value():
    """mean over real tokens of ||h - target||^2 / H; padding does not count."""
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]], requires_grad=True)  # [1, 2, 2]
    target = torch.tensor([1.0, 0.0])  # broadcast: RMU's c * u
    # token 1: (0 + 4) / 2 = 2; token 2 is padding
    assert losses.hidden_mse(hidden, target, torch.tensor([[1, 0]])).item() == 2.0
    # both count: (2 + (4 + 16) / 2) / 2 = 6
    assert losses.hidden_mse(hidden, target, torch.tensor([[1, 1]])).item() == 6.0
    same = losses.hidden_mse(hidden, hidden.detach(), torch.tensor([[1, 1]]))
    assert same.item() == 0.0
    bf16 = losses.hidden_mse(hidden.bfloat16(), target, torch.tensor([[1, 1]]))
    assert bf16.dtype == torch.float32  # in float32 whatever the hidden states' dtype


# --- RMU: what it trains, what it reads ------------------------------------------------


def test_rmu_layers_follow_the_official_choice():
    params = parse_params("rmu", {})
    assert rmu_layers(params, 32) == (7, [5, 6, 7])  # the official Zephyr-7B setting
    assert rmu_layers(params, 4) == (1, [0, 1])  # the same relative depth
    assert rmu_layers(params, 2) == (0, [0])
    assert rmu_layers(parse_params("rmu", {"layer": 3, "update_layers": [1, 3]}), 4) == (3, [1, 3])
    with pytest.raises(SpecError, match="out of range: the model has 4 layers") as exc:
        rmu_layers(parse_params("rmu", {"layer": 4}), 4)
    assert exc.value.param == "hyperparameters.layer"
    with pytest.raises(SpecError, match="all after the steered layer 1"):
        rmu_layers(parse_params("rmu", {"layer": 1, "update_layers": [2, 3]}), 4)
    with pytest.raises(SpecError, match=r"update_layers \[9\] out of range"):
        rmu_layers(parse_params("rmu", {"update_layers": [9]}), 4)


@pytest.mark.parametrize("adapter_type", ["lora", "full"])
def test_rmu_trains_only_the_mlp_output_of_its_layers(fixture_dir, adapter_type):
    wrapped, *_ = setup_run(fixture_dir, AdapterSpec(type=adapter_type), "rmu", layer=1)
    names = sorted(wrapped.trainable())
    if adapter_type == "lora":
        assert len(names) == 4 and all(  # A and B of two layers' down projections
            ".layers.0.mlp.down_proj.lora_" in n or ".layers.1.mlp.down_proj.lora_" in n
            for n in names
        )
    else:
        assert names == [
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.1.mlp.down_proj.weight",
        ]
        # the frozen reference: copies of the two update layers, not of the model
        assert set(wrapped.reference_layers) == {0, 1} and wrapped.reference is None


def test_rmu_names_missing_modules(fixture_dir):
    with pytest.raises(SpecError, match="layer 0 has no module 'mlp.nope'"):
        setup_run(fixture_dir, AdapterSpec(), "rmu", update_modules=["mlp.nope"])
    lora_elsewhere = AdapterSpec(target_modules=["q_proj"])
    with pytest.raises(SpecError, match="no LoRA weight on them"):
        setup_run(fixture_dir, lora_elsewhere, "rmu")


def test_rmu_direction_is_fixed_by_the_seed(fixture_dir):
    first = setup_run(fixture_dir, AdapterSpec(), "rmu", steering_coeff=6.5)[0].prepared[1]
    again = setup_run(fixture_dir, AdapterSpec(), "rmu", steering_coeff=6.5)[0].prepared[1]
    other = setup_run(fixture_dir, AdapterSpec(), "rmu", steering_coeff=6.5, seed=1)[0]
    assert first.control.norm().item() == pytest.approx(6.5)
    assert (first.control >= 0).all()  # u uniform in [0, 1)^H, as the official code draws it
    assert torch.equal(first.control, again.control)
    assert not torch.equal(first.control, other.prepared[1].control)


@pytest.mark.parametrize("layer", [0, 1])
def test_hidden_states_at_stops_after_its_layer(fixture_dir, layer):
    """The steered layer's output, as a full forward gives it, without running what is
    above: the next layer, or the vocabulary projection after the last layer."""
    wrapped, tok, *_, forget, _ = setup_run(fixture_dir, AdapterSpec(type="full"), "catnip")
    model = wrapped.model.eval()
    stack = decoder_layers(model)
    ids = torch.tensor([forget[0].input_ids])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    calls = []
    watched = [stack[1], model.get_output_embeddings()]
    handles = [m.register_forward_hook(lambda m, a, o: calls.append(m)) for m in watched]
    with torch.no_grad():
        got = hidden_states_at(model, stack, layer, batch)
        assert calls == ([] if layer == 0 else [stack[1]])
        for handle in handles:
            handle.remove()
        full = model(**batch, output_hidden_states=True).hidden_states
    if layer == 0:  # hidden_states[i + 1] is layer i's output (the last one is normed)
        torch.testing.assert_close(got, full[1])
    else:
        torch.testing.assert_close(model.model.norm(got), full[2])


def test_rmu_loss_is_its_formula(fixture_dir):
    """forget: mean over tokens of ||h_L - c u||^2 / H from a full forward's hidden
    states; retain: 0 before any update (the model is the frozen one)."""
    wrapped, tok, method, params, forget, retain = setup_run(
        fixture_dir, AdapterSpec(), "rmu", alpha=1200.0
    )
    state = wrapped.prepared[1]
    data = method_data(fixture_dir, tok, method, retain)
    from core.engine.data import collate

    forget_batch = collate(forget[:4], tok.pad_token_id)
    retain_batch = collate(data["retain"][:4], tok.pad_token_id)
    loss, terms = rmu_step(
        StepInputs(wrapped, forget_batch, retain=retain_batch, state=state), params
    )
    with torch.no_grad():
        hidden = wrapped.model(
            input_ids=forget_batch["input_ids"],
            attention_mask=forget_batch["attention_mask"],
            output_hidden_states=True,
        ).hidden_states[state.layer + 1]
    real = forget_batch["attention_mask"].bool()
    expected = ((hidden - state.control) ** 2).mean(dim=-1)[real].mean()
    assert terms["forget_mse"] == pytest.approx(expected.item(), rel=1e-5)
    assert terms["retain_mse"] == pytest.approx(0.0, abs=1e-10)
    assert loss.item() == pytest.approx(terms["forget_mse"] + 1200 * terms["retain_mse"])


def test_lora_reference_pass_leaves_what_trains_alone(fixture_dir):
    """peft marks the whole adapter trainable when it is re-enabled; RMU trains two of its
    weights, and after a reference pass it still does."""
    wrapped, *_ = setup_run(fixture_dir, AdapterSpec(), "rmu")
    trains = sorted(wrapped.trainable())
    with wrapped.reference_mode():
        pass
    assert sorted(wrapped.trainable()) == trains and len(trains) == 2


# --- what each does -----------------------------------------------------------------


def test_rmu_turns_forget_activations_to_its_direction_more_than_retain(fixture_dir):
    """After RMU the steered layer's forget-token states point along u (their mean cosine
    with it rises), the retain-token states much less (the retain term holds them)."""
    from core.engine.data import collate

    wrapped, tok, method, params, forget, retain = setup_run(
        fixture_dir, AdapterSpec(type="full"), "rmu", max_steps=12, learning_rate=1e-2
    )
    state = wrapped.prepared[1]

    def cosine(examples):
        batch = collate(examples[:32], tok.pad_token_id)
        with torch.no_grad():
            hidden = hidden_states_at(wrapped.model.eval(), state.stack, state.layer, batch)
        real = hidden[batch["attention_mask"].bool()]
        return torch.cosine_similarity(real, state.control.expand_as(real), dim=-1).mean().item()

    before = cosine(forget), cosine(retain)
    result = run_unlearning(wrapped, method, params, forget, pad_id=tok.pad_token_id, retain=retain)
    after = cosine(forget), cosine(retain)
    assert abs(before[0]) < 0.1 and abs(before[1]) < 0.1  # a random direction, at first
    assert after[0] - before[0] > 0.3, (before, after)
    assert after[0] - before[0] > 1.5 * (after[1] - before[1]), (before, after)
    assert result.history[-1].terms["forget_mse"] < result.history[0].terms["forget_mse"]


def test_rmu_star_has_no_retain_term(fixture_dir):
    wrapped, tok, method, params, forget, _ = setup_run(fixture_dir, AdapterSpec(), "rmu_star")
    result = run_unlearning(wrapped, method, params, forget, pad_id=tok.pad_token_id)
    assert set(result.history[-1].terms) == {"forget_mse"}


def test_flat_moves_forget_and_contrast_probabilities_apart(fixture_dir):
    wrapped, tok, method, params, forget, retain = setup_run(
        fixture_dir, AdapterSpec(), "flat", max_steps=10, learning_rate=3e-3
    )
    result = train(fixture_dir, wrapped, tok, method, params, forget, retain)
    first, last = result.history[0].terms, result.history[-1].terms
    assert last["forget_prob"] < first["forget_prob"] - 0.5, (first, last)
    # the contrast answers hold where they were while the forget answers fall away
    assert last["contrast_prob"] > first["contrast_prob"] - 0.05, (first, last)


@pytest.mark.parametrize("method_id", ["flat", "rmu"])
def test_resume_equals_uninterrupted(fixture_dir, tmp_path, method_id):
    """Cancel at step 2 of 4 and resume: the weights of a straight run, with the contrast
    pairs and the retain batches drawn as an uninterrupted run draws them."""
    from core.errors import JobCancelled

    hp = {"max_steps": 4, "checkpoint_every": 2, "learning_rate": 1e-3}

    def run(directory, events=None):
        wrapped, *rest = setup_run(fixture_dir, AdapterSpec(), method_id, **hp)
        result = train(fixture_dir, wrapped, *rest, checkpoint_dir=directory, events=events)
        return wrapped, result

    straight, _ = run(tmp_path / "a")
    with pytest.raises(JobCancelled):
        run(tmp_path / "b", StopAfter(2))
    resumed, result = run(tmp_path / "b")
    assert [h.step for h in result.history] == [3, 4]
    for name, param in resumed.trainable().items():
        torch.testing.assert_close(param.detach(), straight.trainable()[name], rtol=0, atol=1e-6)


# --- FLAT's contrast set -------------------------------------------------------------


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_built_in_refusals_answer_each_forget_prompt(fixture_dir):
    """Each forget prompt with a refusal drawn by the seed, where the tokenizer can write
    them (here a word-level one that knows their words, as a byte-level one would)."""
    from core.demo.build import train_tokenizer

    records = load_records(fixture_dir / "data" / "forget_qa.jsonl")
    texts = [r["prompt"] + r["response"] for r in records.items] + list(REFUSALS)
    tok = train_tokenizer(texts)
    encoded = encode_records(records, tok, 64)
    made = build_contrast(records, encoded, None, tok, 64, seed=0)
    assert made.paired and made.source == BUILT_IN and len(made.examples) == len(encoded.examples)
    assert made.warning() is None
    said = set()
    for mine, theirs in zip(encoded.examples, made.examples, strict=True):
        prompt = sum(label == losses.IGNORE_INDEX for label in mine.labels)
        assert theirs.input_ids[:prompt] == mine.input_ids[:prompt]  # the same prompt
        answer = [t for t in theirs.labels[prompt:] if t != tok.eos_token_id]
        said.add(tok.decode(answer).replace(" ", ""))
    assert said <= {r.replace(" ", "") for r in REFUSALS} and len(said) > 1
    again = build_contrast(records, encoded, None, tok, 64, seed=0)
    other = build_contrast(records, encoded, None, tok, 64, seed=1)
    assert [e.input_ids for e in again.examples] == [e.input_ids for e in made.examples]
    assert [e.input_ids for e in other.examples] != [e.input_ids for e in made.examples]


def test_refusals_the_tokenizer_cannot_write_are_refused(fixture_dir, tmp_path):
    """The demo's closed vocabulary has no words of refusal: the built-in ones would be
    unknown tokens, and FLAT would teach the model to say those. An error says what to do;
    a contrast_file with such lines trains, with a warning naming them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(fixture_dir / "model")
    records = load_records(fixture_dir / "data" / "forget_qa.jsonl")
    encoded = encode_records(records, tok, 64)
    with pytest.raises(DataError, match="built-in refusals are not in this tokenizer's vocab"):
        build_contrast(records, encoded, None, tok, 64, seed=0)
    odd = [{"prompt": r["prompt"], "response": " a dragon."} for r in records.items]
    odd[2]["response"] = " no clue."
    made = build_contrast(
        records, encoded, load_records(_write(tmp_path / "c.jsonl", odd)), tok, 64, seed=0
    )
    assert made.unknown_lines == [3] and "(lines 3)" in made.warning()


def test_contrast_file_pairs_line_by_line(tmp_path):
    forget = _write(
        tmp_path / "forget.jsonl",
        [{"prompt": "Who is A?", "response": "a"}, {"prompt": "Who is B?", "response": "b"}],
    )
    records = load_records(forget)
    good = _write(
        tmp_path / "good.jsonl",
        [{"prompt": "Who is A?", "response": "No idea."}, {"prompt": "Who is B?", "response": "?"}],
    )
    assert contrast_records(records, load_records(good), 0).items[0]["response"] == "No idea."
    short = _write(tmp_path / "short.jsonl", [{"prompt": "Who is A?", "response": "x"}])
    with pytest.raises(DataError, match="contrast_file has 1 records and the forget set 2"):
        contrast_records(records, load_records(short), 0)
    swapped = _write(
        tmp_path / "swapped.jsonl",
        [{"prompt": "Who is B?", "response": "x"}, {"prompt": "Who is A?", "response": "y"}],
    )
    with pytest.raises(DataError, match="contrast_file line 1: its prompt differs") as exc:
        contrast_records(records, load_records(swapped), 0)
    assert exc.value.param == "contrast_file"
    text = _write(tmp_path / "text.jsonl", [{"text": "x"}, {"text": "y"}])
    with pytest.raises(DataError, match="contrast_file holds text records and the forget set qa"):
        contrast_records(records, load_records(text), 0)
    with pytest.raises(DataError, match="needs a contrast_file"):
        contrast_records(load_records(text), None, 0)
    assert contrast_records(load_records(text), records, 0) is not None  # text: unpaired


def test_contrast_pairs_skip_what_the_forget_set_skips(tmp_path):
    """A forget record max_length leaves without a target is not trained on; its pair
    goes with it, and the rest stay aligned."""
    from core.demo.build import train_tokenizer

    long_prompt = " ".join(["word"] * 40)
    tok = train_tokenizer([long_prompt, "Q1 Q3 one two three", *REFUSALS])
    forget = _write(
        tmp_path / "forget.jsonl",
        [
            {"prompt": "Q1", "response": "one"},
            {"prompt": long_prompt, "response": "two"},
            {"prompt": "Q3", "response": "three"},
        ],
    )
    records = load_records(forget)
    encoded = encode_records(records, tok, 16)
    assert encoded.skipped_lines == [2]
    made = build_contrast(records, encoded, None, tok, 16, seed=0)
    assert len(made.examples) == 2
    for mine, theirs in zip(encoded.examples, made.examples, strict=True):
        assert mine.input_ids[:2] == theirs.input_ids[:2]


# --- data requirements, in the spec ------------------------------------------------------


def _spec(**fields):
    return parse_spec({"base_model": "m", "forget_file": "f", **fields})


def test_data_requirements_are_enforced_with_a_clear_error():
    with pytest.raises(SpecError, match="method rmu needs a retain_file") as exc:
        _spec(method="rmu")
    assert exc.value.param == "retain_file"
    assert _spec(method="rmu", retain_file="r").method == "rmu"
    assert _spec(method="rmu_star").method == "rmu_star"  # forget data only
    with pytest.raises(SpecError, match="contrast_file: method catnip does not use") as exc:
        _spec(method="catnip", contrast_file="c")
    assert exc.value.param == "contrast_file"
    assert _spec(method="flat", contrast_file="c").contrast_file == "c"
    with pytest.raises(SpecError, match="rmu has a retain term of its own"):
        _spec(method="rmu", retain_file="r", hyperparameters={"retain_loss": "kl"})
    with pytest.raises(SpecError, match="leave adapter.layers null") as exc:
        _spec(method="rmu_star", adapter={"type": "full", "layers": [1]})
    assert exc.value.param == "adapter.layers"


def test_official_defaults():
    rmu = parse_params("rmu", {})
    assert (rmu.learning_rate, rmu.epochs, rmu.batch_size) == (5e-5, 1.0, 4)
    assert (rmu.steering_coeff, rmu.alpha, rmu.max_grad_norm) == (20.0, 100.0, None)
    assert (rmu.layer, rmu.update_layers, rmu.update_modules) == (None, None, None)
    assert not hasattr(parse_params("rmu_star", {}), "alpha")
    flat = parse_params("flat", {})
    assert (flat.learning_rate, flat.epochs) == (1e-5, 10.0)  # A.4.4
    assert METHODS["flat"].data == "forget + contrast" and METHODS["rmu"].data == "forget + retain"


# --- the whole job ---------------------------------------------------------------------


def test_flat_and_rmu_jobs_run_and_report_their_data(fixture_dir, tmp_path):
    data = fixture_dir / "data"
    common = {
        "base_model": str(fixture_dir / "model"),
        "forget_file": str(data / "forget_qa.jsonl"),
        "adapter": {"type": "lora"},
    }
    flat = run_job(
        parse_spec(
            {
                **common,
                "method": "flat",
                "contrast_file": str(contrast_file(fixture_dir)),
                "hyperparameters": {"max_steps": 2},
            }
        ),
        tmp_path / "flat",
        device="cpu",
    )
    contrast = flat.metrics["data"]["contrast"]
    assert contrast["source"] == "contrast_file" and contrast["paired"]
    assert contrast["examples"] == flat.metrics["data"]["forget"]["examples"]
    summary = (tmp_path / "flat" / "report" / "summary.md").read_text()
    assert "from the contrast_file, paired with the forget records line by line" in summary
    # without one, the built-in refusals: refused before any step, the demo cannot write them
    with pytest.raises(DataError, match="give a contrast_file"):
        run_job(parse_spec({**common, "method": "flat"}), tmp_path / "flat2", device="cpu")
    assert not (tmp_path / "flat2").exists()
    rmu = run_job(
        parse_spec(
            {
                **common,
                "method": "rmu",
                "retain_file": str(data / "retain_qa.jsonl"),
                "hyperparameters": {"max_steps": 2},
            }
        ),
        tmp_path / "rmu",
        device="cpu",
    )
    assert rmu.loop.steps_done == 2 and (tmp_path / "rmu" / "adapter").is_dir()
    assert set(rmu.loop.history[-1].terms) == {"forget_mse", "retain_mse"}


@pytest.mark.parametrize("method_id", ["flat", "rmu"])
def test_gradient_checkpointing_leaves_the_maths_alone(fixture_dir, method_id):
    """RMU's forward stops after the steered layer, which activation checkpointing then
    recomputes in the backward: the same losses and weights as without it."""
    results = []
    for checkpointing in (False, True):
        wrapped, tok, method, params, forget, retain = setup_run(
            fixture_dir, AdapterSpec(type="full"), method_id, gradient_checkpointing=checkpointing
        )
        data = method_data(fixture_dir, tok, method, retain)
        history = run_unlearning(wrapped, method, params, forget, pad_id=tok.pad_token_id, **data)
        results.append(([h.loss for h in history.history], wrapped.trainable()))
    assert results[0][0] == results[1][0]
    for name, param in results[0][1].items():
        torch.testing.assert_close(param, results[1][1][name], rtol=0, atol=0)
