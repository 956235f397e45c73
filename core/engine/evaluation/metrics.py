"""Before/after evidence: what the model still knows, and what unlearning cost.

Forget:  KnowMem (ROUGE-L of greedy answers to forget questions, F1 as MUSE reports it,
         and recall), VerbMem (ROUGE-L F1 of greedy continuations of forget-text
         prefixes), MC accuracy on a forget-domain set through lm-eval-harness.
Utility: KnowMem on retain questions, perplexity on retain text, MC accuracy on a
         general set through lm-eval-harness.
Neighbours: KnowMem on questions about what sits next to the forget target (the other
         entities of its domain), which must survive.
All generation is batched with left padding and the KV cache; the same settings are
used before and after, and recorded with the numbers.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from core.engine.data import Records, collate, encode_records, load_records
from core.engine.modeling import context_length
from core.engine.spec.parts import EvalSpec

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> tuple[float, float]:
    """(F1, recall) of ROUGE-L between one prediction and its reference."""
    score = _scorer().score(reference, prediction)["rougeL"]
    return score.fmeasure, score.recall


@torch.no_grad()
def greedy_generate(
    model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int, batch_size: int
) -> list[str]:
    """Greedy continuations (decoded, special tokens dropped) of tokenized prompts.
    Batched with left padding; generation uses the KV cache. A prompt longer than the
    model's context leaves (context - max_new_tokens) keeps its end, where the question is."""
    device = next(model.parameters()).device
    limit = context_length(model)
    if limit is not None:
        room = max(1, limit - max_new_tokens)
        prompts = [p[-room:] for p in prompts]
        max_new_tokens = min(max_new_tokens, limit - 1)
    pad = tokenizer.pad_token_id
    outputs: list[str] = []
    was_training = model.training
    model.eval()
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for row, ids in enumerate(chunk):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = generated[:, width:]
        outputs += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    model.train(was_training)
    return outputs


def knowmem(
    model: Any,
    tokenizer: Any,
    records: list[dict[str, Any]],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 64,
    keep: int = 0,
) -> dict[str, Any]:
    """ROUGE-L of greedy answers against reference answers. `keep` samples are returned."""
    from core.engine.data import encode_prompt

    prompts = [encode_prompt(tokenizer, r["prompt"]) for r in records]
    answers = greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    scores = [rouge_l(a, r["response"]) for a, r in zip(answers, records, strict=True)]
    f1, recall = [s[0] for s in scores], [s[1] for s in scores]
    return {
        **_rouge_figures(f1, recall),
        "per_sample_f1": f1,
        "per_sample_recall": recall,
        "samples": [
            {"prompt": r["prompt"], "reference": r["response"], "answer": a}
            for r, a in list(zip(records, answers, strict=True))[:keep]
        ],
    }


def verbmem(
    model: Any,
    tokenizer: Any,
    records: list[dict[str, Any]],
    *,
    batch_size: int = 64,
    max_length: int = 512,
    context: str = "",
) -> dict[str, Any]:
    """ROUGE-L F1 of greedy continuations of the first half of each text against its
    second half (MUSE's VerbMem, with prefix = half the text's tokens). `context`: text
    put before each prefix (after the tokenizer's special tokens), as the in-context
    attack does."""
    prompts, references = [], []
    max_length = min(max_length, context_length(model) or max_length)
    special = len(tokenizer("", add_special_tokens=True)["input_ids"])
    context_ids = tokenizer(context, add_special_tokens=True)["input_ids"] if context else []
    for r in records:
        ids = tokenizer(r["text"], add_special_tokens=True)["input_ids"][:max_length]
        half = max(1, len(ids) // 2)
        prompts.append(context_ids + ids[special:half] if context_ids else ids[:half])
        references.append(tokenizer.decode(ids[half:], skip_special_tokens=True))
    longest = max(len(tokenizer(ref, add_special_tokens=False)["input_ids"]) for ref in references)
    continuations = greedy_generate(model, tokenizer, prompts, max(1, longest), batch_size)
    f1 = [rouge_l(c, ref)[0] for c, ref in zip(continuations, references, strict=True)]
    return {**_rouge_figures(f1), "per_sample_f1": f1}


def _rouge_figures(f1: list[float], recall: list[float] | None = None) -> dict[str, Any]:
    """Mean ROUGE-L F1 (and recall) over the records scored."""
    figures: dict[str, Any] = {"rouge_l_f1": sum(f1) / len(f1)}
    if recall is not None:
        figures["rouge_l_recall"] = sum(recall) / len(recall)
    return {**figures, "n": len(f1)}


def mc_figures(correct: list[bool]) -> dict[str, Any]:
    """MC accuracy over the items asked, from whether each was answered right."""
    return {"accuracy": sum(correct) / len(correct) if correct else None, "n": len(correct)}


@torch.no_grad()
def perplexity(
    model: Any,
    tokenizer: Any,
    records: list[dict[str, Any]],
    *,
    batch_size: int = 64,
    max_length: int = 512,
) -> dict[str, Any]:
    """exp(mean token NLL) over the text records, all tokens counted, in windows of
    max_length tokens (at most the model's context); with each record's summed NLL and
    token count (`per_record_nll`, `per_record_tokens`)."""
    max_length = min(max_length, context_length(model) or max_length)
    encoded = encode_records(Records("text", records), tokenizer, max_length)
    examples, owners = encoded.examples, [line - 1 for line in encoded.example_lines]
    device = next(model.parameters()).device
    record_nll, record_tokens = [0.0] * len(records), [0] * len(records)
    was_training = model.training
    model.eval()
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], tokenizer.pad_token_id)
        logits = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
        ).logits
        labels = batch["labels"].to(device)
        nll = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none"
        )
        rows = nll.reshape(labels.shape).sum(dim=1).tolist()
        counts = (labels != -100).sum(dim=1).tolist()
        for offset, (row_nll, row_tokens) in enumerate(zip(rows, counts, strict=True)):
            record_nll[owners[start + offset]] += row_nll
            record_tokens[owners[start + offset]] += row_tokens
    model.train(was_training)
    return {
        **_perplexity_of(record_nll, record_tokens),
        "per_record_nll": record_nll,
        "per_record_tokens": record_tokens,
    }


def _perplexity_of(nll: list[float], tokens: list[int]) -> dict[str, Any]:
    total_tokens = sum(tokens)
    return {"perplexity": math.exp(sum(nll) / max(1, total_tokens)), "tokens": total_tokens}


def mc_accuracy(
    model: Any,
    tokenizer: Any,
    path: str | Path,
    *,
    limit: int | None = None,
    batch_size: int = 64,
    task_name: str = "unlearn_mc",
    select: Callable[[dict[str, Any]], bool] | None = None,
    context: str = "",
) -> dict[str, Any]:
    """Multiple-choice accuracy through lm-eval-harness on a local JSONL file
    ({question, choices, answer}), offline, with the model already in memory.
    The choice with the highest log-likelihood wins (as WMDP/MMLU in the paper).
    `select`: which of the first `limit` records to ask (accuracy None when none is).
    `per_item_correct`: whether each asked record was answered right, in file order.
    `context`: text put before each question's prompt (the in-context attack's).

    The task reads its prompt ("Q: {question}\nA:"), choices and answer as columns of a
    copy of the first `limit` records, not through Jinja templates (which lm-eval
    compiles once per document), and runs through `lm_eval.evaluate`, not
    `simple_evaluate` (which also collects the environment's pip packages and git
    hash in subprocesses on every call): the same requests and scores for less
    (docs/performance.md, "What the evidence costs")."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    records = load_records(path).items[:limit]
    if select is not None:
        records = [r for r in records if select(r)]
    if not records:
        return {"accuracy": None, "n": 0, "per_item_correct": []}
    task = {
        "task": task_name,
        "dataset_path": "json",
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "prompt",
        "doc_to_choice": "choices",
        "doc_to_target": "answer",
        "target_delimiter": " ",
        "num_fewshot": 0,
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    was_training = model.training
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        docs = Path(tmp) / "docs.jsonl"
        docs.write_text(
            "".join(
                json.dumps(
                    {
                        "prompt": f"{context}Q: {r['question']}\nA:",
                        "choices": r["choices"],
                        "answer": r["answer"],
                    }
                )
                + "\n"
                for r in records
            )
        )
        # the datasets cache of this copy goes with it, not into ~/.cache
        task["dataset_kwargs"] = {
            "data_files": {"test": str(docs)},
            "cache_dir": str(Path(tmp) / "datasets"),
        }
        (Path(tmp) / f"{task_name}.yaml").write_text(json.dumps(task))
        manager = TaskManager(include_path=tmp, include_defaults=False, verbosity="ERROR")
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results = lm_eval.evaluate(
            lm=lm,
            task_dict=manager.load([task_name]),
            bootstrap_iters=0,
            log_samples=True,
            verbosity="ERROR",
        )
    model.train(was_training)
    accuracy = results["results"][task_name]["acc,none"]
    n = results["n-samples"][task_name]["effective"]
    samples = sorted(results["samples"][task_name], key=lambda sample: sample["doc_id"])
    return {
        "accuracy": float(accuracy),
        "n": int(n),
        "per_item_correct": [bool(sample["acc"]) for sample in samples],
    }


def evaluate(
    model: Any,
    tokenizer: Any,
    spec: EvalSpec,
    *,
    max_samples: int | None = None,
    keep_samples: int = 0,
    unwatched_from: int | None = None,
) -> dict[str, Any]:
    """Every metric the eval sets allow, with the settings used.

    unwatched_from: the stop rule watched the first N retain questions; when the file has
    more, KnowMem is also measured on up to max_samples of the rest
    (`retain_knowmem_unwatched`): utility evidence the stop rule could not select for.
    """
    limit = max_samples or spec.max_samples
    files = spec.files()
    metrics: dict[str, Any] = {}

    def records(name: str) -> list[dict[str, Any]]:
        return load_records(files[name]).items[:limit]

    for name in ("forget_qa", "retain_qa", "neighbor_qa"):
        if name not in files:
            continue
        items = load_records(files[name]).items
        metrics[f"{name.split('_')[0]}_knowmem"] = knowmem(
            model,
            tokenizer,
            items[:limit],
            max_new_tokens=spec.max_new_tokens,
            batch_size=spec.batch_size,
            keep=keep_samples,
        )
        rest = items[unwatched_from : unwatched_from + limit] if unwatched_from is not None else []
        if name == "retain_qa" and rest:
            metrics["retain_knowmem_unwatched"] = knowmem(
                model,
                tokenizer,
                rest,
                max_new_tokens=spec.max_new_tokens,
                batch_size=spec.batch_size,
            )
    if "forget_text" in files:
        metrics["forget_verbmem"] = verbmem(
            model, tokenizer, records("forget_text"), batch_size=spec.batch_size
        )
    if "retain_text" in files:
        metrics["retain_perplexity"] = perplexity(
            model, tokenizer, records("retain_text"), batch_size=spec.batch_size
        )
    for name, key in (("forget_mc", "forget_mc"), ("general_mc", "general_mc")):
        if name in files:
            metrics[key] = mc_accuracy(
                model,
                tokenizer,
                files[name],
                limit=limit,
                batch_size=spec.batch_size,
                task_name=f"unlearn_{name}",
            )
    metrics["settings"] = {
        "max_samples": limit,
        "max_new_tokens": spec.max_new_tokens,
        "decoding": "greedy",
        "rouge": "rougeL (rouge-score, no stemmer)",
    }
    return metrics


# what knowmem, verbmem, perplexity and mc_accuracy return per record, beside the figures
PER_RECORD = (
    "per_sample_f1",
    "per_sample_recall",
    "per_record_nll",
    "per_record_tokens",
    "per_item_correct",
)


def strip_per_record(evaluation: dict[str, Any]) -> dict[str, Any]:
    """An evaluation without its per-record values (what is stored of it), in a copy."""
    return {
        name: {k: v for k, v in value.items() if k not in PER_RECORD}
        if isinstance(value, dict)
        else value
        for name, value in evaluation.items()
    }


def on_first(evaluation: dict[str, Any], n: int) -> dict[str, Any] | None:
    """The figures `evaluate(..., max_samples=n)` gives (without its settings and kept
    samples), from a wider evaluation of the same model: each metric over its first n
    records. None when a metric lacks its per-record values (or has none)."""
    out: dict[str, Any] = {}
    for name, value in evaluation.items():
        if name in ("settings", "retain_knowmem_unwatched"):
            continue
        if not value.get("n", value.get("tokens")):
            return None
        if "per_sample_recall" in value:  # KnowMem
            out[name] = _rouge_figures(value["per_sample_f1"][:n], value["per_sample_recall"][:n])
        elif "per_sample_f1" in value:  # VerbMem
            out[name] = _rouge_figures(value["per_sample_f1"][:n])
        elif "per_record_nll" in value:
            out[name] = _perplexity_of(value["per_record_nll"][:n], value["per_record_tokens"][:n])
        elif "per_item_correct" in value:
            out[name] = mc_figures(value["per_item_correct"][:n])
        else:
            return None
    return out


def forget_score(metrics: dict[str, Any]) -> float | None:
    """The headline forget number f (points): forget KnowMem F1, else forget MC accuracy."""
    if "forget_knowmem" in metrics:
        return 100 * metrics["forget_knowmem"]["rouge_l_f1"]
    if "forget_mc" in metrics:
        return 100 * metrics["forget_mc"]["accuracy"]
    return None


def utility_score(metrics: dict[str, Any]) -> float | None:
    """The headline utility number u (points): retain KnowMem F1, else general MC accuracy."""
    if "retain_knowmem" in metrics:
        return 100 * metrics["retain_knowmem"]["rouge_l_f1"]
    if "general_mc" in metrics:
        return 100 * metrics["general_mc"]["accuracy"]
    return None


def tradeoff(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float | None]:
    """Paper 5.1.2: delta f and delta u in points, and dO = -delta f + delta u."""
    f0, f1 = forget_score(before), forget_score(after)
    u0, u1 = utility_score(before), utility_score(after)
    df = None if f0 is None or f1 is None else f1 - f0
    du = None if u0 is None or u1 is None else u1 - u0
    d_o = None if df is None or du is None else -df + du
    return {
        "forget_before": f0,
        "forget_after": f1,
        "delta_f": df,
        "utility_before": u0,
        "utility_after": u1,
        "delta_u": du,
        "delta_o": d_o,
    }
