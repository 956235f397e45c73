"""The robust options in the job spec (torch-free validation, as the API does it) and the
distillation set's overlap check, which names the lines that repeat forget data."""

from __future__ import annotations

import json

import pytest

from core.engine.formats import Records
from core.engine.robust.overlap import check_distill_set, overlapping_lines
from core.engine.spec import parse_spec
from core.errors import DataError, SpecError

BASE = {"method": "catnip", "base_model": "m", "forget_file": "f.jsonl"}


def _spec(**over):
    return parse_spec({**BASE, **over})


def test_the_robust_options_are_off_by_default_and_typed():
    spec = _spec()
    assert spec.robustify is None and spec.distill_file is None
    assert spec.hyperparameters.selective is None and spec.hyperparameters.attack_in_loop is None
    spec = _spec(
        retain_file="r.jsonl",
        distill_file="d.jsonl",
        robustify={"alpha": 0.6, "steps": 10},
        hyperparameters={"selective": {"mode": "both", "components": 4}, "attack_in_loop": {}},
    )
    assert spec.robustify.alpha == 0.6 and spec.robustify.learning_rate == 1e-4
    assert spec.hyperparameters.selective.mode == "both"
    assert spec.hyperparameters.attack_in_loop.every == 1


@pytest.mark.parametrize(
    ("over", "param", "words"),
    [
        ({"robustify": {}}, "distill_file", "come together"),
        ({"distill_file": "d.jsonl"}, "robustify", "come together"),
        ({"robustify": {"alpha": 1.5}, "distill_file": "d"}, "robustify.alpha", "less than"),
        (
            {
                "robustify": {},
                "distill_file": "d",
                "adapter": {"type": "full"},
                "resources": {"gpus": 2},
            },
            "robustify",
            "one device",
        ),
        ({"hyperparameters": {"selective": {}}}, "retain_file", "needs a retain_file"),
        (
            {"hyperparameters": {"selective": {"mode": "all"}}, "retain_file": "r"},
            "hyperparameters.selective.mode",
            "project",
        ),
        (
            {"method": "rmu", "retain_file": "r", "hyperparameters": {"attack_in_loop": {}}},
            "hyperparameters.attack_in_loop",
            "step loss",
        ),
        (
            {"hyperparameters": {"attack_in_loop": {}, "sam_rho": 0.1}},
            None,
            "does not combine",
        ),
    ],
)
def test_bad_robust_options_are_refused_naming_the_field(over, param, words):
    with pytest.raises(SpecError) as caught:
        _spec(**over)
    assert words in caught.value.message, caught.value.message
    if param is not None:
        assert caught.value.param == param


def _records(kind, items):
    return Records(kind, items, [2 * i + 1 for i in range(len(items))])  # lines 1, 3, 5...


FORGET = _records(
    "qa",
    [
        {"prompt": "Where was Ona Vex born?", "response": "In Tarrow."},
        {
            "prompt": "What did Ona Vex write in the spring of her last year?",
            "response": "A treatise on river glass and its colours.",
        },
    ],
)


def test_a_distill_set_with_forget_data_is_refused_naming_its_lines():
    distill = _records(
        "text",
        [
            {"text": "Tarrow is a town on the river."},  # the answer alone: a neighbour
            {"text": "Notes: where was ona vex born? in tarrow. The end."},  # record 1 whole
            {"text": "She wrote a treatise on river glass and its colours, they say."},
            {"text": "Mira Osk was born in Lund."},
        ],
    )
    assert overlapping_lines(FORGET, distill) == [(3, 1), (5, 3)]
    with pytest.raises(DataError) as caught:
        check_distill_set(FORGET, distill)
    message = caught.value.message
    assert caught.value.param == "distill_file"
    assert "2 records" in message and "line 3 (forget_file line 1)" in message
    assert "line 5 (forget_file line 3)" in message


def test_a_clean_distill_set_passes():
    distill = _records(
        "qa",
        [
            {"prompt": "Where was Mira Osk born?", "response": "In Lund."},
            {"prompt": "What is in Tarrow?", "response": "A river and glass works."},
        ],
    )
    assert overlapping_lines(FORGET, distill) == []
    check_distill_set(FORGET, distill)


def test_the_check_reads_chat_records(tmp_path):
    from core.engine.formats import load_records

    path = tmp_path / "d.jsonl"
    chat = {
        "messages": [
            {"role": "user", "content": "Where was Ona Vex born?"},
            {"role": "assistant", "content": "In Tarrow."},
        ]
    }
    other = {
        "messages": [
            {"role": "user", "content": "Where was Mira Osk born?"},
            {"role": "assistant", "content": "In Lund."},
        ]
    }
    path.write_text(json.dumps(other) + "\n" + json.dumps(chat) + "\n")
    distill = load_records(path)
    assert overlapping_lines(FORGET, distill) == [(2, 1)]


def _robust(**over):
    raw = {
        "profile": "robust",
        "method": "catnip",
        "base_model": "m",
        "forget_file": "f",
        "retain_file": "r",
        "distill_file": "d",
        **over,
    }
    return parse_spec(raw)


def test_the_robust_profile_fills_what_the_spec_leaves_out():
    spec = _robust(hyperparameters={"learning_rate": 1e-3, "selective": {"components": 4}})
    assert spec.profile == "robust" and spec.hyperparameters.retain_loss == "kl"
    assert spec.hyperparameters.learning_rate == 1e-3
    assert spec.hyperparameters.selective.mode == "project"
    assert spec.hyperparameters.selective.components == 4  # the spec's field wins
    assert spec.robustify is not None and spec.robustify.alpha == 0.6
    assert _robust(robustify={"alpha": 0.3}).robustify.alpha == 0.3
    # the standard profile adds nothing
    plain = parse_spec({"method": "catnip", "base_model": "m", "forget_file": "f"})
    assert plain.profile == "standard" and plain.robustify is None
    assert plain.hyperparameters.selective is None


def test_the_robust_profile_names_the_file_it_needs():
    for missing in ("retain_file", "distill_file"):
        with pytest.raises(SpecError) as caught:
            _robust(**{missing: None})
        assert caught.value.param == missing and 'profile "robust"' in caught.value.message
