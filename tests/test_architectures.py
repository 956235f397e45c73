"""The engine on causal LMs other than the demo's Llama: "any local Hugging Face
causal-LM directory" (the README's CLI section). Each architecture is a tiny random
model built from its config with the fixture's tokenizer and saved as a model directory,
so it loads the way a downloaded one would. The families differ where the engine could
assume Llama: the name of the decoder stack (GPT-2, Falcon and BLOOM: `transformer.h`;
OPT: `model.decoder.layers`), Conv1D instead of Linear projections (GPT-2), fused
projections (Falcon, Phi-3), absolute positions (GPT-2, OPT) and ALiBi (BLOOM)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_setup import setup_run

from core.engine.data import build_examples, encode_prompt, load_records
from core.engine.evaluation import greedy_generate
from core.engine.modeling import AdapterSpec, decoder_layers, load_base, save_output
from core.engine.train import run_unlearning
from core.errors import SpecError

CPU = torch.device("cpu")
SMALL = {"num_hidden_layers": 3, "num_attention_heads": 2, "max_position_embeddings": 128}
ARCHITECTURES = {
    "gpt2": {"n_embd": 32, "n_layer": 3, "n_head": 2, "n_positions": 128},
    "gpt_neox": {"hidden_size": 32, "intermediate_size": 64, **SMALL},
    "opt": {"hidden_size": 32, "ffn_dim": 64, "word_embed_proj_dim": 32, **SMALL},
    "falcon": {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2},
    "bloom": {"hidden_size": 32, "n_layer": 3, "n_head": 2},
    "qwen2": {"hidden_size": 32, "intermediate_size": 64, "num_key_value_heads": 1, **SMALL},
    "phi3": {"hidden_size": 32, "intermediate_size": 64, **SMALL},
}


@pytest.fixture(scope="module")
def arch_dirs(fixture_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(fixture_dir / "model")
    root = tmp_path_factory.mktemp("architectures")
    dirs = {}
    for name, sizes in ARCHITECTURES.items():
        config = AutoConfig.for_model(
            name,
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **sizes,
        )
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


def _train(model_dir: Path, fixture_dir: Path, adapter: AdapterSpec, method_id: str = "npo"):
    wrapped, tokenizer, method, params, forget, _ = setup_run(
        fixture_dir, adapter, method_id, model_dir=model_dir, max_steps=2, learning_rate=1e-2
    )
    before = {n: p.detach().clone() for n, p in wrapped.model.named_parameters()}
    trainable = set(wrapped.trainable())
    result = run_unlearning(wrapped, method, params, forget, pad_id=tokenizer.pad_token_id)
    assert result.steps_done == 2
    assert all(torch.isfinite(torch.tensor(h.loss)) for h in result.history)
    changed = {
        n for n, p in wrapped.model.named_parameters() if not torch.equal(p.detach(), before[n])
    }
    return wrapped, tokenizer, trainable, changed, forget


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_full_weights_of_chosen_layers(arch_dirs, fixture_dir, arch):
    """adapter {type: full, layers: [1]} trains exactly decoder layer 1, whatever the stack
    is called (`transformer.h` on GPT-2, Falcon and BLOOM, not only Llama's layers)."""
    model, _ = load_base(arch_dirs[arch], CPU)
    stack = decoder_layers(model)
    assert len(stack) == 3
    layer_1 = {id(p) for p in stack[1].parameters()}
    expected = {n for n, p in model.named_parameters() if id(p) in layer_1}
    del model
    _, _, trainable, changed, _ = _train(
        arch_dirs[arch], fixture_dir, AdapterSpec(type="full", layers=[1])
    )
    assert trainable == expected
    assert changed == expected  # NPO's reference is a frozen copy: only layer 1 moves


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_lora_adapter_round_trips(arch_dirs, fixture_dir, tmp_path, arch):
    """LoRA on every linear projection (Conv1D on GPT-2); the written adapter loads with
    peft onto a fresh base and gives the trained model's logits."""
    from peft import PeftModel

    wrapped, tokenizer, trainable, changed, forget = _train(
        arch_dirs[arch], fixture_dir, AdapterSpec(type="lora", r=4), method_id="catnip"
    )
    assert trainable and changed == trainable
    assert all("lora_" in n for n in trainable)
    save_output(wrapped, tokenizer, tmp_path)
    base, _ = load_base(arch_dirs[arch], CPU)
    ids = torch.tensor([forget[0].input_ids])
    untouched = base(input_ids=ids).logits
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    wrapped.model.eval()
    with torch.no_grad():
        expected = wrapped.model(input_ids=ids).logits
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected)
    assert not torch.allclose(expected, untouched)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_batched_generation_equals_one_by_one(arch_dirs, fixture_dir, arch):
    """KnowMem's batched, left-padded greedy decoding gives each prompt's own answer,
    also with absolute positions (GPT-2, OPT) and ALiBi (BLOOM)."""
    model, tokenizer = load_base(arch_dirs[arch], CPU)
    records = load_records(fixture_dir / "data" / "forget_qa.jsonl").items[:5]
    # prompts of different lengths, so the batch is padded
    prompts = [encode_prompt(tokenizer, r["prompt"] + " and" * i) for i, r in enumerate(records)]
    batched = greedy_generate(model, tokenizer, prompts, 6, batch_size=8)
    assert batched == [greedy_generate(model, tokenizer, [p], 6, batch_size=1)[0] for p in prompts]


def test_layers_of_a_model_without_a_decoder_stack_are_a_spec_error():
    class Flat(torch.nn.Module):
        config = type("Config", (), {"num_hidden_layers": 2})()

        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])  # not 2 long

    with pytest.raises(SpecError, match="cannot find the 2 decoder layers of Flat") as error:
        decoder_layers(Flat())
    assert error.value.param == "adapter.layers"


def test_empty_layer_list_is_refused():
    with pytest.raises(ValueError, match="'layers' is empty"):
        AdapterSpec(type="full", layers=[])


def test_max_length_beyond_the_context_is_cut_to_it(arch_dirs, tmp_path):
    """GPT-2 has a table of 128 learned positions here: 256-token windows would index
    past it (an IndexError deep in the model, a device-side assert on a GPU). They are
    cut at 128, with a warning, and metrics.json records the length used."""
    import json

    import yaml
    from typer.testing import CliRunner

    from core.cli import app

    (tmp_path / "book.jsonl").write_text(
        json.dumps({"text": "the dragon of the city " * 60}) + "\n"
    )
    spec = {
        "method": "catnip",
        "base_model": str(arch_dirs["gpt2"]),
        "forget_file": "book.jsonl",
        "hyperparameters": {"max_steps": 1, "max_length": 256},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["run", str(tmp_path / "job.yaml"), "-o", str(out), "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    assert (
        "[warning] hyperparameters.max_length 256 is longer than the model's context of 128 "
        "positions (max_position_embeddings in its config.json): sequences are cut at 128 "
        "tokens"
    ) in result.output
    data = json.loads((out / "metrics.json").read_text())["data"]["forget"]
    assert (data["max_length"], data["examples"]) == (128, 3)  # 301 tokens with BOS


def test_evaluation_fits_long_inputs_into_the_context(arch_dirs):
    """A KnowMem prompt longer than the context keeps its end (the question); VerbMem and
    perplexity windows are cut at the context. Checked on GPT-2 (128 positions)."""
    from core.engine.evaluation import knowmem, perplexity, verbmem

    model, tokenizer = load_base(arch_dirs["gpt2"], CPU)
    question = {
        "prompt": "the dragon " * 100 + "Q: Who rides the dragon?\nA:",
        "response": " nobody.",
    }
    result = knowmem(model, tokenizer, [question], max_new_tokens=16, keep=1)
    kept = encode_prompt(tokenizer, question["prompt"])[-(128 - 16) :]
    assert (
        result["samples"][0]["answer"]
        == greedy_generate(model, tokenizer, [kept], 16, batch_size=1)[0]
    )
    text = {"text": "the dragon of the city " * 60}  # 300 tokens
    assert verbmem(model, tokenizer, [text])["n"] == 1
    assert (
        perplexity(model, tokenizer, [text])["tokens"] == 301 - 3
    )  # windows of 128: 3 last positions


def test_a_tokenizer_without_pad_or_eos_still_pads(arch_dirs, fixture_dir, tmp_path):
    """Padding is masked out, so any token will do: EOS, else UNK, else BOS. A tokenizer
    with neither pad nor EOS gets UNK as its pad, and its batches collate and run."""
    import json
    import shutil

    from core.engine.data import collate

    shutil.copytree(arch_dirs["gpt2"], tmp_path / "model")
    config_path = tmp_path / "model" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("pad_token", None)
    config.pop("eos_token", None)
    config_path.write_text(json.dumps(config))
    model, tokenizer = load_base(tmp_path / "model", CPU)
    assert tokenizer.eos_token_id is None and tokenizer.pad_token == tokenizer.unk_token
    examples = build_examples(
        load_records(fixture_dir / "data" / "forget_qa.jsonl"), tokenizer, 64
    )[:4]
    batch = collate(examples, tokenizer.pad_token_id)
    assert torch.isfinite(
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ).all()
