"""Routing jobs to worker classes by the memory they need (core.service.capacity)."""

from __future__ import annotations

import pytest

from core.errors import SpecError
from core.service.capacity import job_gigabytes, parameter_count, route

CLASSES = {"l4": 24.0, "h100": 80.0, "h200": 141.0}


def test_parameters_are_read_from_the_safetensors_headers(fixture_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fixture_dir / "model")
    stored = sum(t.numel() for t in model.state_dict().values() if isinstance(t, torch.Tensor))
    counted = parameter_count(fixture_dir / "model")
    # tied embeddings are stored once: the headers may count fewer than the state dict
    assert counted is not None and 0 < counted <= stored
    assert counted >= sum(p.numel() for p in model.parameters())
    assert parameter_count(tmp_path) is None


def test_a_job_goes_to_the_smallest_class_it_fits():
    eight_b = 8_000_000_000
    assert job_gigabytes(eight_b, "lora") == pytest.approx(20.0)
    assert job_gigabytes(eight_b, "full") == pytest.approx(160.0)
    assert job_gigabytes(eight_b, "lora", quantized=True) == pytest.approx(5.5)  # QLoRA
    one_b = 1_000_000_000
    common = {"needs_gb": None, "model": "m"}
    assert route(CLASSES, parameters=eight_b, adapter_type="lora", **common) == "l4"
    assert route(CLASSES, parameters=3 * one_b, adapter_type="full", **common) == "h100"
    assert route(CLASSES, parameters=6 * one_b, adapter_type="full", **common) == "h200"
    # what the operator declared wins; nothing known: the largest class
    assert route(CLASSES, parameters=eight_b, needs_gb=70, adapter_type="lora", model="m") == "h100"
    assert route(CLASSES, parameters=None, adapter_type="lora", **common) == "h200"
    seventy_b = 70 * one_b  # QLoRA fits a 70B model where LoRA on bf16 weights does not
    assert (
        route(CLASSES, parameters=seventy_b, adapter_type="lora", quantized=True, **common)
        == "h100"
    )
    with pytest.raises(SpecError):  # 175 GB in bf16
        route(CLASSES, parameters=seventy_b, adapter_type="lora", **common)


def test_a_job_no_class_can_run_is_refused_with_what_it_needs():
    with pytest.raises(SpecError) as refused:
        route(
            CLASSES, parameters=8_000_000_000, adapter_type="full", needs_gb=None, model="llama-8b"
        )
    assert refused.value.code == "no_worker_class" and refused.value.param == "adapter.type"
    assert "needs about 160 GB" in refused.value.message
    assert "'h200', has 141 GB" in refused.value.message
    assert "LoRA" in refused.value.message


def test_a_sharded_job_goes_to_a_class_with_that_many_gpus():
    """An 8B full-weight job (160 GB) fits no one-GPU class; over 2 GPUs of 80 GB it does
    (the one-GPU h100 class is passed over); 200 GB over 2 needs the 141 GB class; a job
    wanting more GPUs than any class has is refused."""
    classes = {"h100": 80.0, "h100x4": 80.0, "h200x2": 141.0}
    gpus = {"h100x4": 4, "h200x2": 2}
    common = {"parameters": 8_000_000_000, "needs_gb": None, "adapter_type": "full", "model": "m"}
    assert route(classes, gpus=2, class_gpus=gpus, **common) == "h100x4"
    assert route(classes, gpus=4, class_gpus=gpus, **common) == "h100x4"
    assert route(classes, gpus=2, class_gpus=gpus, **{**common, "needs_gb": 200}) == "h200x2"
    with pytest.raises(SpecError):  # 160 GB on one GPU
        route(classes, gpus=1, class_gpus=gpus, **common)
    with pytest.raises(SpecError) as refused:
        route(classes, gpus=8, class_gpus=gpus, **common)
    assert refused.value.param == "resources.gpus" and "at most 4" in refused.value.message
    with pytest.raises(SpecError) as refused:  # 80 GB on each of 2 h100x4 GPUs > 80 * 1.25
        route({"h100x4": 60.0}, gpus=2, class_gpus=gpus, **common)
    assert "80 GB on each of 2 GPUs" in refused.value.message
