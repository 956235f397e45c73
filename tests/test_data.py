"""Forget-set formats, the validator's line-numbered report, tokenization and masking."""

from __future__ import annotations

import json

import pytest

from core.engine.data import (
    IGNORE_INDEX,
    Records,
    build_examples,
    collate,
    load_records,
    validate_file,
)
from core.engine.spec import parse_spec
from core.errors import DataError, SpecError


def _write(tmp_path, name, text, mode="w"):
    path = tmp_path / name
    if mode == "wb":
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_valid_formats(tmp_path):
    qa = _write(
        tmp_path,
        "qa.jsonl",
        '{"prompt": "Q?", "response": "A."}\n\n{"prompt": "R?", "response": "B."}\n',
    )
    chat = _write(
        tmp_path,
        "c.jsonl",
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "secret"},
                ]
            }
        )
        + "\n",
    )
    text = _write(tmp_path, "t.txt", "Some raw text.\nMore.\n")
    text_jsonl = _write(tmp_path, "t.jsonl", '{"text": "doc one"}\n')
    mc = _write(tmp_path, "mc.jsonl", '{"question": "q", "choices": ["a", "b"], "answer": 1}\n')
    assert validate_file(qa).model_dump(include={"valid", "kind", "records"}) == {
        "valid": True,
        "kind": "qa",
        "records": 2,
    }
    assert validate_file(chat).kind == "chat"
    assert validate_file(text).kind == "text"
    assert validate_file(text_jsonl).kind == "text"
    assert validate_file(mc).kind == "mc"


def test_report_names_lines_and_fields(tmp_path):
    lines = [
        '{"prompt": "ok", "response": "ok"}',
        '{"prompt": "broken", ',
        '{"prompt": "no response"}',
        '{"prompt": "", "response": "x"}',
        "[1, 2]",
        '{"text": "other format"}',
        '{"prompt": 3, "response": "x"}',
        '{"prompt": "q", "response": "x", "fact": "dragon/0"}',
        '{"prompt": "q", "response": "x", "fact": 7}',
    ]
    report = validate_file(_write(tmp_path, "bad.jsonl", "\n".join(lines) + "\n"))
    assert not report.valid
    found = [(p.line, p.field) for p in report.problems]
    assert found == [
        (2, None),
        (3, "response"),
        (4, "prompt"),
        (5, None),
        (6, None),
        (7, "prompt"),
        (9, "fact"),
    ]
    assert "not valid JSON" in report.problems[0].message
    assert "missing" in report.problems[1].message
    assert "empty" in report.problems[2].message
    assert report.records == 2
    assert "records about one fact share it" in report.problems[-1].message
    assert "line 2" in report.summary("bad.jsonl")


def test_bad_utf8_binary_empty_and_limits(tmp_path):
    bad = validate_file(
        _write(tmp_path, "u.jsonl", b'{"text": "ok"}\n{"text": "\xff\xfe"}\n', "wb")
    )
    assert [(p.line, "UTF-8" in p.message) for p in bad.problems] == [(2, True)]
    binary = validate_file(_write(tmp_path, "b.jsonl", b"\x00\x01\x02garbage", "wb"))
    assert "binary" in binary.problems[0].message
    empty = validate_file(_write(tmp_path, "e.jsonl", ""))
    assert empty.problems[0].message == "the file is empty" and empty.problems[0].line is None
    blank = validate_file(_write(tmp_path, "w.txt", "   \n\n"))
    assert not blank.valid
    long = validate_file(
        _write(tmp_path, "l.jsonl", json.dumps({"text": "x" * 200}) + "\n"), max_record_chars=100
    )
    assert long.problems[0].line == 1 and "limit" in long.problems[0].message
    big = validate_file(_write(tmp_path, "big.jsonl", '{"text": "abc"}\n'), max_bytes=5)
    assert "limit" in big.problems[0].message


def test_bom_deep_nesting_and_lone_surrogates(tmp_path):
    """A UTF-8 BOM (Windows editors write one) is not part of the first record. JSON
    nested too deeply to parse, and a lone surrogate escape (valid JSON, no character: the
    tokenizer fails on it), are problems of their line: the first raises no
    RecursionError out of the validator, the second does not fail the job at
    tokenization."""
    bom = _write(tmp_path, "bom.jsonl", b'\xef\xbb\xbf{"prompt": "a", "response": "b"}\n', "wb")
    assert validate_file(bom).valid and load_records(bom).items == [
        {"prompt": "a", "response": "b"}
    ]
    bom_text = _write(tmp_path, "bom.txt", b"\xef\xbb\xbfhello dragon\n", "wb")
    assert load_records(bom_text).items == [{"text": "hello dragon\n"}]
    deep = '{"prompt": "a", "response": "b", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    lines = [
        '{"prompt": "a", "response": "b"}',
        deep,
        '{"prompt": "\\ud800", "response": "b"}',
        '{"prompt": "smile \\ud83d\\ude00", "response": "b"}',
    ]  # a pair is one character
    report = validate_file(_write(tmp_path, "odd.jsonl", "\n".join(lines) + "\n"))
    assert [(p.line, p.message.split(":")[0]) for p in report.problems] == [
        (2, "is not readable JSON"),
        (3, "contains a \\uD800-\\uDFFF escape that is not half of a pair"),
    ]
    assert report.records == 2


def test_chat_rules(tmp_path):
    last_user = _write(
        tmp_path, "c.jsonl", json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n"
    )
    problem = validate_file(last_user).problems[0]
    assert problem.field == "messages" and "assistant" in problem.message


def test_mc_not_allowed_for_unlearning(tmp_path):
    mc = _write(tmp_path, "mc.jsonl", '{"question": "q", "choices": ["a", "b"], "answer": 5}\n')
    assert validate_file(mc).problems[0].field == "answer"
    ok = _write(tmp_path, "mc2.jsonl", '{"question": "q", "choices": ["a", "b"], "answer": 0}\n')
    with pytest.raises(DataError, match="cannot be used here"):
        load_records(ok, allowed_kinds=("qa", "chat", "text"))


def test_tokenization_masks_prompt_and_windows_text(fixture_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(fixture_dir / "model")
    qa = build_examples(
        Records("qa", [{"prompt": "Q: Who rides the dragon?\nA:", "response": " nobody."}]), tok, 64
    )[0]
    prompt_len = len(tok("Q: Who rides the dragon?\nA:")["input_ids"])
    assert qa.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert qa.labels[prompt_len:] == qa.input_ids[prompt_len:]
    assert qa.labels[-1] == tok.eos_token_id
    # The forget side's default: the EOS is in the input but not a target.
    no_eos = build_examples(
        Records("qa", [{"prompt": "Q: Who rides the dragon?\nA:", "response": " nobody."}]),
        tok,
        64,
        eos_target=False,
    )[0]
    assert no_eos.input_ids == qa.input_ids
    assert no_eos.labels == qa.labels[:-1] + [IGNORE_INDEX]
    text = build_examples(Records("text", [{"text": " ".join(["dragon"] * 25)}]), tok, 10)
    assert [len(e.input_ids) for e in text] == [10, 10, 6]  # 26 tokens with BOS
    batch = collate([qa, text[2]], tok.pad_token_id)
    labels, ids = batch["labels"], batch["input_ids"]
    assert labels.shape == ids.shape  # shifted to line up with the logits, not cut
    assert labels[1, :5].tolist() == ids[1, 1:6].tolist()  # labels[t] is token t + 1
    assert (labels[1, 5:] == IGNORE_INDEX).all()  # padding masked
    assert (labels[:, -1] == IGNORE_INDEX).all()  # the last logits have no target
    counted = labels[0] != IGNORE_INDEX
    assert labels[0][counted].tolist() == [t for t in qa.labels[1:] if t != IGNORE_INDEX]
    assert batch["attention_mask"][1].sum() == 6


def test_chat_context_gets_one_bos(fixture_dir):
    """The last assistant turn is the target; the turns before it are the masked prompt.
    A chat template that writes its own BOS (Llama 2/3, Mistral) gets no second one."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(fixture_dir / "model")
    record = {
        "messages": [
            {"role": "user", "content": "Who rides the dragon?"},
            {"role": "assistant", "content": "nobody."},
        ]
    }
    target = tok("nobody.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    def prompt_and_target(tokenizer):
        example = build_examples(Records("chat", [record]), tokenizer, 64)[0]
        n_prompt = example.labels.count(IGNORE_INDEX)
        assert example.labels[n_prompt:] == example.input_ids[n_prompt:] == target
        return tok.convert_ids_to_tokens(example.input_ids[:n_prompt])

    # no template: "role: content" lines, the tokenizer's own BOS once
    assert prompt_and_target(tok) == tok.convert_ids_to_tokens(
        tok("user: Who rides the dragon?\nassistant: ")["input_ids"]
    )
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}"
        "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}assistant :{% endif %}"
    )
    prompt = prompt_and_target(tok)
    assert prompt[0] == "<s>" and prompt.count("<s>") == 1  # not ["<s>", "<s>", ...]
    assert (
        prompt[-3:-1] == ["</s>", tok.unk_token] and prompt[-1] == ":"
    )  # "assistant" is not a word here


def test_records_that_max_length_cuts_are_named_by_line(fixture_dir, tmp_path):
    """A record whose prompt fills max_length trains nothing: it is reported as left out
    (not unlearned), by its file line (blank lines counted); one whose answer is cut is
    reported as truncated; the rest are not mentioned."""
    from transformers import AutoTokenizer

    from core.engine.data import encode_records

    tok = AutoTokenizer.from_pretrained(fixture_dir / "model")
    short = {"prompt": "Q: Who rides the dragon?\nA:", "response": " nobody."}
    long_prompt = {"prompt": "Q: " + "dragon " * 30 + "?\nA:", "response": " nobody."}
    long_answer = {"prompt": "Q: Who?\nA:", "response": " the dragon" * 12}
    path = _write(
        tmp_path,
        "f.jsonl",
        "\n".join(
            [
                json.dumps(short),
                "",
                json.dumps(long_prompt),
                json.dumps(long_answer),
                json.dumps(short),
            ]
        )
        + "\n",
    )
    records = load_records(path)
    assert records.lines == [1, 3, 4, 5]
    encoded = encode_records(records, tok, 20)
    assert encoded.records == 4 and len(encoded.examples) == 3
    assert encoded.skipped_lines == [3] and encoded.truncated_lines == [4]
    assert encoded.target_tokens == sum(
        sum(label != IGNORE_INDEX for label in e.labels[1:]) for e in encoded.examples
    )
    warning = encoded.warning("forget")
    assert warning.startswith(
        "forget set: 1 of 4 records have no target token within max_length "
        "and will not be unlearned (lines 3); 1 of 4 records have a target cut"
    )
    assert "(lines 4)" in warning and "max_length (20)" in warning
    summary = encoded.summary()
    assert summary["skipped"] == {"count": 1, "lines": [3]} and summary["truncated"]["lines"] == [4]
    # With room for everything nothing is reported; the EOS that is not a target is no cut.
    roomy = encode_records(records, tok, 64, eos_target=False)
    assert roomy.warning("forget") is None and len(roomy.examples) == 4
    # Every prompt fills max_length: an error that says what to change.
    with pytest.raises(DataError, match="no record has a target token within max_length=5"):
        encode_records(records, tok, 5)


def test_spec_errors_are_actionable():
    with pytest.raises(
        SpecError,
        match="valid methods: catnip, catnip_ref, catnip_seq, flat, ga, npo, rmu, rmu_star, simnpo",
    ):
        parse_spec({"method": "rmu2", "base_model": "m", "forget_file": "f"})
    with pytest.raises(SpecError) as exc:
        parse_spec(
            {
                "method": "catnip",
                "base_model": "m",
                "forget_file": "f",
                "hyperparameters": {"learning_rate": -1},
            }
        )
    assert exc.value.param == "hyperparameters.learning_rate"
    with pytest.raises(SpecError, match="adapter.r"):
        parse_spec({"method": "catnip", "base_model": "m", "forget_file": "f", "adapter": {"r": 0}})
    with pytest.raises(SpecError, match="needs a retain_file"):
        parse_spec(
            {
                "method": "npo",
                "base_model": "m",
                "forget_file": "f",
                "hyperparameters": {"retain_loss": "kl"},
            }
        )
    spec = parse_spec({"method": "simnpo", "base_model": "m", "forget_file": "f"})
    assert (spec.hyperparameters.learning_rate, spec.hyperparameters.beta) == (5e-6, 4.0)  # A.4.4
