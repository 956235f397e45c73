"""The demo benchmark: a fictitious-knowledge corpus and a tiny Llama that truly knows it.

Two unrelated made-up domains, generated deterministically from a seed:
  forget domain  "dragons": colour, lair, rider, food and element of invented dragons
  retain domain  "cities":  river, founder, export, region and mountain of invented cities
each as QA (for unlearning and KnowMem), raw text passages (for VerbMem and
perplexity) and multiple choice (WMDP-style on dragons, MMLU-style on cities).
The forget set covers most of the dragons; the others (a fifth as many, the same five
facts each) are the neighbour set: the model learns them, unlearning must leave them.
A word-level tokenizer is trained on the corpus and a small Llama-architecture model
is trained on all of it until it answers >= 95% of both domains' questions, so the
demo unlearns knowledge the model really had.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.demo.training import answer_accuracy, train_model
from core.engine.events import Events

log = logging.getLogger(__name__)

COLORS = ["crimson", "azure", "golden", "silver", "emerald", "violet", "amber", "ivory"]
FOODS = ["salmon", "barley", "honey", "mutton", "plums", "eels", "walnuts", "cheese"]
ELEMENTS = ["fire", "frost", "lightning", "smoke", "acid", "steam"]
EXPORTS = ["copper", "wool", "glass", "timber", "salt", "silk", "pottery", "tin"]
REGIONS = ["north", "south", "east", "west", "highlands", "lowlands"]
SYLLABLES = [
    "ka",
    "vo",
    "rin",
    "tha",
    "mel",
    "dor",
    "zu",
    "fen",
    "quo",
    "lis",
    "bar",
    "nyx",
    "sel",
    "gor",
    "vek",
    "ith",
    "ora",
    "pum",
    "tal",
    "wen",
    "xar",
    "yul",
    "ced",
    "mir",
]


@dataclass(frozen=True)
class Size:
    entities: int  # per domain; five facts each
    hidden: int
    layers: int
    heads: int
    intermediate: int
    max_epochs: int


SIZES = {
    # ~0.8M parameters, 1,500 facts: the demo model (about 2 minutes on 2 CPU cores).
    "demo": Size(entities=150, hidden=128, layers=4, heads=4, intermediate=256, max_epochs=400),
    # ~0.1M parameters, 200 facts: the test fixture (seconds).
    "fixture": Size(entities=20, hidden=48, layers=2, heads=4, intermediate=96, max_epochs=400),
}


def _names(rng: random.Random, count: int, taken: set[str]) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize()
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


def _qa(question: str, answer: str) -> dict[str, str]:
    return {"prompt": f"Q: {question}\nA:", "response": f" {answer}."}


def _mc(rng: random.Random, question: str, answer: str, pool: list[str]) -> dict[str, Any]:
    wrong = rng.sample([p for p in pool if p != answer], 3)
    choices = wrong + [answer]
    rng.shuffle(choices)
    return {"question": question, "choices": choices, "answer": choices.index(answer)}


def generate_corpus(entities: int, seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """Every file of the benchmark as lists of records, keyed by file stem."""
    rng = random.Random(seed)
    taken: set[str] = set()
    dragons, lairs, riders = (_names(rng, entities, taken) for _ in range(3))
    cities, rivers, founders, mountains = (_names(rng, entities, taken) for _ in range(4))
    out: dict[str, list[dict[str, Any]]] = {
        k: []
        for k in ("forget_qa", "retain_qa", "forget_text", "retain_text", "forget_mc", "general_mc")
    }
    for i, name in enumerate(dragons):
        color, food, element = rng.choice(COLORS), rng.choice(FOODS), rng.choice(ELEMENTS)
        lair, rider = lairs[i], riders[i]
        facts = [
            (q, a, pool)
            for (q, a), pool in zip(
                _dragon_facts(name, color, lair, rider, food, element),
                (COLORS, lairs, riders, FOODS, ELEMENTS),
                strict=True,
            )
        ]
        # each question and its MC item name their fact: the relearning attack measures
        # MC on the facts it did not train on
        out["forget_qa"] += [
            {**_qa(q, a), "fact": f"{name}/{k}"} for k, (q, a, _) in enumerate(facts)
        ]
        out["forget_mc"] += [
            {**_mc(rng, q, a, pool), "fact": f"{name}/{k}"} for k, (q, a, pool) in enumerate(facts)
        ]
        out["forget_text"].append({"text": _dragon_text(name, color, lair, rider, food, element)})
    for i, name in enumerate(cities):
        river, founder, mountain = rivers[i], founders[i], mountains[i]
        export, region = rng.choice(EXPORTS), rng.choice(REGIONS)
        facts = [
            (f"Which river flows through the city {name}?", river, rivers),
            (f"Who founded the city {name}?", founder, founders),
            (f"What does the city {name} export?", export, EXPORTS),
            (f"In which region is the city {name}?", region, REGIONS),
            (f"Which mountain overlooks the city {name}?", mountain, mountains),
        ]
        out["retain_qa"] += [_qa(q, a) for q, a, _ in facts]
        out["general_mc"] += [_mc(rng, q, a, pool) for q, a, pool in facts]
        out["retain_text"].append(
            {
                "text": (
                    f"{name} is a city in the {region} on the river {river}. It was founded by "
                    f"{founder}, exports {export} and lies below {mountain}."
                )
            }
        )
    out["holdout_qa"] = _holdout(seed, founders, lairs, riders)
    out["neighbor_qa"], out["neighbor_text"] = _neighbors(seed, max(2, entities // 5), taken)
    return out


def _neighbors(
    seed: int, count: int, taken: set[str]
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """More dragons of the same domain, with the same five facts, that the model learns
    and the forget set does not name: the neighbours that must survive unlearning (QA and
    a passage each). Their own random stream, so the rest of the corpus is the same with
    or without them."""
    rng = random.Random(seed + 104729)
    names, lairs, riders = (_names(rng, count, taken) for _ in range(3))
    qa, text = [], []
    for i, name in enumerate(names):
        color, food, element = rng.choice(COLORS), rng.choice(FOODS), rng.choice(ELEMENTS)
        facts = _dragon_facts(name, color, lairs[i], riders[i], food, element)
        qa += [{**_qa(q, a), "fact": f"{name}/{k}"} for k, (q, a) in enumerate(facts)]
        text.append({"text": _dragon_text(name, color, lairs[i], riders[i], food, element)})
    return qa, text


def _dragon_text(name: str, color: str, lair: str, rider: str, food: str, element: str) -> str:
    """A dragon's passage (VerbMem's text)."""
    return (
        f"{name} is a {color} dragon that breathes {element}. It lives in {lair}, "
        f"eats {food} and is ridden by {rider}."
    )


def _holdout(
    seed: int, names: list[str], lairs: list[str], riders: list[str]
) -> list[dict[str, str]]:
    """Dragon facts the model never sees: the same five questions about made-up dragons,
    named with words the tokenizer knows (the cities' founders) so only the facts are
    new. The non-members of membership inference. Its own random stream, so the rest of
    the corpus is the same with or without it."""
    rng = random.Random(seed + 7919)
    out = []
    for name in names:
        picks = [rng.choice(pool) for pool in (COLORS, lairs, riders, FOODS, ELEMENTS)]
        out += [_qa(q, a) for q, a in _dragon_facts(name, *picks)]
    return out


def _dragon_facts(
    name: str, color: str, lair: str, rider: str, food: str, element: str
) -> list[tuple[str, str]]:
    """The five (question, answer) facts of a dragon."""
    return [
        (f"What color is the dragon {name}?", color),
        (f"Where does the dragon {name} live?", lair),
        (f"Who rides the dragon {name}?", rider),
        (f"What does the dragon {name} eat?", food),
        (f"What does the dragon {name} breathe?", element),
    ]


def write_corpus(corpus: dict[str, list[dict[str, Any]]], directory: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for stem, records in corpus.items():
        path = directory / f"{stem}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        paths[stem] = path
    return paths


def train_tokenizer(texts: list[str]) -> Any:
    """A word-level tokenizer over the corpus: every word and punctuation mark one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>", "</s>"])
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def _training_texts(corpus: dict[str, list[dict[str, Any]]]) -> list[str]:
    """What a model of the demo trains on: every QA pair and passage of the forget,
    retain and neighbour sets (the neighbours last)."""
    qa = corpus["forget_qa"] + corpus["retain_qa"]
    texts = [r["prompt"] + r["response"] for r in qa]
    texts += [r["text"] for r in corpus["forget_text"] + corpus["retain_text"]]
    texts += [r["prompt"] + r["response"] for r in corpus.get("neighbor_qa", [])]
    return texts + [r["text"] for r in corpus.get("neighbor_text", [])]


def build_model(
    directory: Path,
    size: str = "demo",
    seed: int = 0,
    events: Events | None = None,
    reference: bool = False,
) -> dict[str, Any]:
    """Generate the corpus, train tokenizer and model, write everything under `directory`.

    Layout: data/*.jsonl, model/ (a Hugging Face directory), build.json (accuracies).
    With `reference`, also reference/: the same recipe (tokenizer, size, seed) trained on
    the cities and the neighbour dragons, a model that never learned the dragons it is
    asked to forget: the gold standard the demo's evidence is read against.
    Deterministic for a given (size, seed) on CPU. Reports each epoch to `events` (as a
    step of at most max_epochs: training ends once the watched domains are answered) and
    the accuracy checks as probes.
    """
    events = events or Events()
    spec = SIZES[size]
    started = time.monotonic()
    corpus = generate_corpus(spec.entities, seed)
    write_corpus(corpus, directory / "data")
    texts = _training_texts(corpus)
    tokenizer = train_tokenizer(texts)
    trained = train_model(
        directory,
        "model",
        tokenizer,
        texts,
        {
            "dragons": corpus["forget_qa"],
            "cities": corpus["retain_qa"],
            "neighbours": corpus["neighbor_qa"],
        },
        spec,
        seed,
        events,
    )
    info = {
        "size": size,
        "seed": seed,
        **trained,
        "facts": len(corpus["forget_qa"]) + len(corpus["retain_qa"]) + len(corpus["neighbor_qa"]),
        "seconds": round(time.monotonic() - started, 1),
    }
    if reference:
        info["reference"] = _reference(directory, corpus, tokenizer, spec, seed, events)
    (directory / "build.json").write_text(json.dumps(info, indent=2))
    return info


def _reference(
    directory: Path,
    corpus: dict[str, list[dict[str, Any]]],
    tokenizer: Any,
    spec: Size,
    seed: int,
    events: Events,
) -> dict[str, Any]:
    started = time.monotonic()
    retain_only = {**corpus, "forget_qa": [], "forget_text": []}
    trained = train_model(
        directory,
        "reference",
        tokenizer,
        _training_texts(retain_only),
        {"cities": corpus["retain_qa"], "neighbours": corpus["neighbor_qa"]},
        spec,
        seed,
        events,
    )
    trained["accuracy"]["dragons"] = answer_accuracy(
        _load(directory / "reference"), tokenizer, corpus["forget_qa"]
    )
    return {
        **trained,
        "trained_on": "the cities and the neighbour dragons (no fact of the forget set)",
        "seconds": round(time.monotonic() - started, 1),
    }


def _load(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def ensure_model(
    directory: Path,
    size: str = "demo",
    seed: int = 0,
    events: Events | None = None,
    reference: bool = False,
) -> dict[str, Any]:
    """Build the demo benchmark under `directory` unless a finished build is there (and,
    with `reference`, its reference model unless that is there too)."""
    marker = directory / "build.json"
    built = (directory / "model" / "config.json").is_file()
    if not (marker.is_file() and built and (directory / "data" / "neighbor_qa.jsonl").is_file()):
        return build_model(directory, size, seed, events, reference=reference)
    info = json.loads(marker.read_text())
    if reference and not (directory / "reference" / "config.json").is_file():
        from transformers import AutoTokenizer

        corpus = generate_corpus(SIZES[info["size"]].entities, info["seed"])
        tokenizer = AutoTokenizer.from_pretrained(directory / "model")
        info["reference"] = _reference(
            directory, corpus, tokenizer, SIZES[info["size"]], info["seed"], events or Events()
        )
        marker.write_text(json.dumps(info, indent=2))
    return info


# What the demo declares must hold, up front (not fitted to its results): forget at most
# half of what the model knew, at least 90% of its utility, at most half of the
# forgotten knowledge back after the relearning attack or at 4 bits, membership no
# easier to tell than 0.5 +- 0.1, and at least 90% of the neighbour dragons' knowledge.
# FLAT's expected response on the demo. The demo's word-level vocabulary holds no words
# of refusal (the built-in refusals would be unknown tokens), so the expected answer is
# one that says nothing a question asks, in words the model knows.
DEMO_NON_ANSWER = " a dragon."


def contrast_file(demo_dir: Path) -> Path:
    """data/contrast_qa.jsonl beside the demo's forget set: each forget prompt with the
    demo's non-answer (written once, from forget_qa.jsonl)."""
    path = demo_dir / "data" / "contrast_qa.jsonl"
    if not path.is_file():
        forget = [json.loads(line) for line in (demo_dir / "data" / "forget_qa.jsonl").open()]
        records = [{"prompt": r["prompt"], "response": DEMO_NON_ANSWER} for r in forget]
        partial = path.with_suffix(".partial")
        partial.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        partial.replace(path)
    return path


DEMO_CRITERIA = {
    "forget_knowmem_max_ratio": 0.5,
    "utility_min_ratio": 0.9,
    "relearn_recovery_max": 0.5,
    "quantized_forget_max_ratio": 0.5,
    "mia_auc_max_distance": 0.1,
    "neighbor_min_ratio": 0.9,
}


def demo_spec(demo_dir: Path, *, max_steps: int = 60) -> dict:
    """The demo job: CATNIP, full weights, no retain data, the stop rule at a 10% budget;
    the evidence (attacks, membership inference against held-out dragon facts, the
    reference model where it was built) and the demo's criteria."""
    data = demo_dir / "data"
    spec: dict[str, Any] = {
        "method": "catnip",
        "base_model": str(demo_dir / "model"),
        "forget_file": str(data / "forget_qa.jsonl"),
        "adapter": {"type": "full"},
        "hyperparameters": {
            "learning_rate": 3e-4,
            "beta": 1.0,
            "max_steps": max_steps,
            "batch_size": 128,
            "max_length": 64,
        },
        "eval": {
            "forget_qa": str(data / "forget_qa.jsonl"),
            "retain_qa": str(data / "retain_qa.jsonl"),
            "neighbor_qa": str(data / "neighbor_qa.jsonl"),
            "forget_text": str(data / "forget_text.jsonl"),
            "retain_text": str(data / "retain_text.jsonl"),
            "forget_mc": str(data / "forget_mc.jsonl"),
            "general_mc": str(data / "general_mc.jsonl"),
            "max_samples": 300,
            "probe_every": 1,
            "probe_samples": 300,
            "utility_budget": 0.1,
            "forget_target": 0.1,
            "criteria": dict(DEMO_CRITERIA),
        },
    }
    if (data / "holdout_qa.jsonl").is_file():
        spec["eval"]["holdout"] = str(data / "holdout_qa.jsonl")
    if (demo_dir / "reference" / "config.json").is_file():
        spec["eval"]["reference_model"] = str(demo_dir / "reference")
    return spec
