"""QLoRA (adapter.quantize: nf4): LoRA on a 4-bit base through bitsandbytes, on CUDA
only. Here (no CUDA): the spec's rules and the clear refusal before anything loads. The
CUDA run itself is in tests/test_gpu.py (marked gpu)."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from core.cli import app
from core.engine.spec import parse_spec
from core.errors import SpecError


def qlora_spec(fixture_dir, **adapter) -> dict:
    data = fixture_dir / "data"
    return {
        "method": "catnip",
        "base_model": str(fixture_dir / "model"),
        "forget_file": str(data / "forget_qa.jsonl"),
        "adapter": {"type": "lora", "r": 4, "quantize": "nf4", **adapter},
        "hyperparameters": {"max_steps": 2, "batch_size": 8, "max_length": 64},
    }


def test_quantize_is_for_lora_and_not_merged(fixture_dir):
    assert parse_spec(qlora_spec(fixture_dir)).adapter.quantize == "nf4"
    for adapter, words in (
        ({"type": "full"}, "only to adapter type 'lora'"),
        ({"merge": True}, "merging into 4-bit weights"),
        ({"quantize": "int3"}, "nf4"),
    ):
        with pytest.raises(SpecError) as refused:
            parse_spec(qlora_spec(fixture_dir, **adapter))
        assert words in refused.value.message, refused.value.message


def test_qlora_without_cuda_is_refused_before_loading(fixture_dir, tmp_path):
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(qlora_spec(fixture_dir)))
    result = CliRunner().invoke(
        app, ["run", str(tmp_path / "job.yaml"), "-o", str(tmp_path / "out"), "--device", "cpu"]
    )
    assert result.exit_code != 0
    assert "qlora_unavailable" in result.output and "needs a CUDA device" in result.output
    assert "adapter.quantize" in result.output
    assert not (tmp_path / "out" / "adapter").exists()
