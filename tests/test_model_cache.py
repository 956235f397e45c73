"""The worker's warm model cache (core.engine.model_cache): a later job on the same model
gets a copy of it, so its "before" metrics equal a fresh load's, and nothing one job
does (LoRA wrapping, full-weight training) reaches the cached model or the next job."""

from __future__ import annotations

import torch

from core.engine.model_cache import ModelCache
from core.engine.modeling import load_base
from core.engine.pipeline import run_job
from core.engine.spec import parse_spec


def spec(fixture_dir, adapter: dict) -> object:
    data = fixture_dir / "data"
    return parse_spec(
        {
            "method": "catnip",
            "base_model": str(fixture_dir / "model"),
            "forget_file": str(data / "forget_qa.jsonl"),
            "adapter": adapter,
            "hyperparameters": {
                "learning_rate": 1e-2,
                "max_steps": 4,
                "batch_size": 16,
                "max_length": 64,
            },
            "eval": {
                "forget_qa": str(data / "forget_qa.jsonl"),
                "retain_qa": str(data / "retain_qa.jsonl"),
                "max_samples": 40,
                "probe_every": 100,
                "utility_budget": 1.0,  # the stop rule keeps the last state, not the first
                "robustness": {
                    "relearn": {"enabled": False},
                    "quantization": {"enabled": False},
                    "in_context": {"enabled": False},
                },
            },
        }
    )


def differences(a: object, b: object, path: str = "") -> list[str]:
    """Where two JSON-like values differ, as paths (empty: equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [
            d
            for k in sorted(set(a) | set(b))
            for d in differences(a.get(k), b.get(k), f"{path}.{k}")
        ]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in differences(x, y, f"{path}[{i}]")
        ]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def test_jobs_on_a_warm_model_start_as_from_a_fresh_load(fixture_dir, tmp_path):
    lora, full = {"type": "lora", "r": 4}, {"type": "full"}
    cold = run_job(spec(fixture_dir, lora), tmp_path / "cold", device="cpu")
    cache = ModelCache(1 << 30)
    first = run_job(spec(fixture_dir, lora), tmp_path / "a", device="cpu", models=cache)
    trained = run_job(spec(fixture_dir, full), tmp_path / "b", device="cpu", models=cache)
    third = run_job(spec(fixture_dir, lora), tmp_path / "c", device="cpu", models=cache)
    assert [r.metrics["model_cache"]["cache"] for r in (first, trained, third)] == [
        "miss",
        "hit",
        "hit",
    ]
    assert "model_cache" not in cold.metrics
    for result in (first, trained, third):
        assert differences(result.metrics["before"], cold.metrics["before"]) == []
    # the full-weight job did change its copy: the test would see a leak
    assert trained.metrics["after"] != trained.metrics["before"]
    fresh, _ = load_base(fixture_dir / "model", torch.device("cpu"))
    [(cached, _, _)] = cache.entries.values()
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, cached.state_dict()[name]), name
    assert not any(name.startswith("base_model") for name in cached.state_dict())  # no LoRA


def test_a_model_over_the_budget_or_changed_on_disk_is_loaded_again(fixture_dir, tmp_path):
    import shutil

    copy_dir = tmp_path / "model"
    shutil.copytree(fixture_dir / "model", copy_dir)
    device = torch.device("cpu")
    tiny = ModelCache(1)  # smaller than any model: loads every time, keeps nothing
    tiny.load(copy_dir, device)
    assert tiny.last["cache"] == "miss" and not tiny.entries
    cache = ModelCache(1 << 30)
    cache.load(copy_dir, device)
    cache.load(copy_dir, device)
    assert cache.last["cache"] == "hit"
    config = copy_dir / "config.json"
    config.write_text(config.read_text())  # re-registered: the files' times change
    import os

    os.utime(config, ns=(1, 1))
    cache.load(copy_dir, device)
    assert cache.last["cache"] == "miss" and len(cache.entries) == 1
    assert ModelCache(0).load(copy_dir, device) and True
