"""The worker's warm model cache (core.engine.model_cache): a later job on the same model
gets it from memory (a LoRA job shares the cached weights, a full-weight job copies
them), so its "before" metrics equal a fresh load's, and nothing one job does (LoRA
wrapping, full-weight training, a write to weights it shares) reaches the next job."""

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
    # LoRA jobs share the cached weights (they never write them); full-weight jobs copy
    assert [r.metrics["model_cache"]["shared"] for r in (first, trained, third)] == [
        True,
        False,
        True,
    ]
    assert "model_cache" not in cold.metrics
    for result in (first, trained, third):
        assert differences(result.metrics["before"], cold.metrics["before"]) == []
    # the full-weight job did change its copy: the test would see a leak
    assert trained.metrics["after"] != trained.metrics["before"]
    fresh, _ = load_base(fixture_dir / "model", torch.device("cpu"))
    [entry] = cache.entries.values()
    cached = entry.model
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


def test_a_write_to_shared_weights_never_reaches_the_next_job(fixture_dir, caplog):
    """A shared hit's tensors are the cached ones (nothing copied); a private one's are
    not. A dense write through a shared tensor the way peft merges an adapter
    (`weight.data += delta`, which autograd's version counters do not see) is caught at
    the next hit: that job gets the files' weights, not the written ones."""
    path, cpu = fixture_dir / "model", torch.device("cpu")
    cache = ModelCache(1 << 30)
    first, _ = cache.load(path, cpu, shared=True)
    second, _ = cache.load(path, cpu, shared=True)
    private, _ = cache.load(path, cpu)
    assert cache.last == {"cache": "hit", "shared": False, "seconds": cache.last["seconds"]}

    def pointer(model: object, name: str = "model.layers.0.mlp.up_proj.weight") -> int:
        return model.get_parameter(name).data_ptr()  # type: ignore[attr-defined]

    assert pointer(first) == pointer(second) != pointer(private)
    second.lm_head.requires_grad_(False)  # the copy's own attributes
    assert first.lm_head.weight.requires_grad

    weight = first.get_parameter("model.layers.0.mlp.up_proj.weight")
    weight.data += 0.01 * torch.randn_like(weight)  # what peft's merge does
    assert torch.equal(second.get_parameter("model.layers.0.mlp.up_proj.weight"), weight)
    with caplog.at_level("WARNING", logger="core.engine.model_cache"):
        third, _ = cache.load(path, cpu, shared=True)
    assert cache.last["cache"] == "miss" and "were written to" in caplog.text
    fresh, _ = load_base(path, cpu)
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, third.state_dict()[name]), name
