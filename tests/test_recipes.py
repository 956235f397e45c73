"""`unlearn bench --recipes`: the held-out neighbours are never training data, each
recipe's spec parses, and a row reads its job's metrics."""

from __future__ import annotations

import json

from core.demo.build import demo_spec
from core.demo.recipes import DISTILL, RECIPES, bench_data, recipe_row, recipe_spec
from core.engine.spec import parse_spec


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_held_out_neighbours_are_in_no_recipe_s_training_data(fixture_dir, tmp_path):
    files = bench_data(fixture_dir, tmp_path)
    held_out = {r["prompt"] for r in _lines(files.neighbors_held_out)}
    assert held_out
    names = {r["fact"].split("/")[0] for r in _lines(files.neighbors_held_out)}
    assert not names & set(files.neighbors_trained)
    retain = {r["prompt"] for r in _lines(files.retain_in_domain)}
    assert not held_out & retain
    distilled = " ".join(r["text"] for r in _lines(files.distill))
    assert not any(name in distilled for name in names)
    assert all(name in distilled for name in files.neighbors_trained)


def test_every_recipe_is_a_valid_spec(fixture_dir, tmp_path):
    files = bench_data(fixture_dir, tmp_path)
    base = demo_spec(fixture_dir)
    for name, recipe in RECIPES.items():
        spec = parse_spec(recipe_spec(base, recipe, fixture_dir, files))
        assert spec.eval.neighbor_qa == str(files.neighbors_held_out), name
        assert (spec.robustify is not None) == ("distill" in name), name
        assert (spec.hyperparameters.selective is not None) == (
            "selective" in name or "mask" in name
        ), name
        if "kl:domain" in name:
            assert spec.retain_file == str(files.retain_in_domain)
        if spec.robustify is not None:
            assert spec.robustify.alpha == DISTILL["alpha"]


def test_a_row_reads_its_job_s_metrics():
    f1 = {"rouge_l_f1": 0.25}
    metrics = {
        "before": {"retain_knowmem": {"rouge_l_f1": 1.0}, "neighbor_knowmem": {"rouge_l_f1": 1.0}},
        "after": {
            "forget_knowmem": f1,
            "retain_knowmem": {"rouge_l_f1": 0.9},
            "neighbor_knowmem": {"rouge_l_f1": 0.5},
        },
        "robustness": {
            "relearn": {
                "recovery": 0.7,
                "worst_cell": "qa, lr 0.001, 20 steps",
                "cells": [
                    {"status": "done", "forget_knowmem_f1": 0.4},
                    {"status": "done", "forget_knowmem_f1": 0.8},
                    {"status": "skipped"},
                ],
            }
        },
        "steps": {"done": 7},
        "verdict": "fail",
    }
    row = recipe_row("x", {"metrics": metrics, "seconds": 12.0, "peak_rss_mb": 900.0})
    assert row["forget_knowmem"] == 25.0 and row["neighbors"] == 50.0
    assert row["worst_attack_knowmem"] == 80.0 and row["recovery"] == 0.7
    assert row["utility"] == 90.0 and row["distill_steps"] is None
    assert recipe_row("y", {"error": "boom"}) == {"recipe": "y", "error": "boom"}
