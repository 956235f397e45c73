"""Sequential unlearning: a job that starts from a previous job's output, the way
deletion requests arrive over time (MUSE's sustainability).

The previous output is a directory holding `adapter/` (a LoRA job) or `model/` (a
full-weight job). The new job trains from the model that output describes:

- after a LoRA job, its adapter is merged into the base weights in memory, so the new
  job's model, its reference (NPO, catnip_ref, the retain KL, RMU's frozen model) and
  its "before" figures are all the previous job's unlearned model;
- after a full-weight job, its weights are loaded in place of the base model's.

What the new job writes stands on the base model the chain started from:

- LoRA after LoRA: one adapter for the whole chain. LoRA deltas on a linear layer add
  up, B1 s1 A1 + B2 s2 A2 = [B1 B2] [s1 A1; s2 A2], so the two adapters are
  concatenated along their rank with each scale folded into its A (scale 1 after):
  rank r1 + r2, loaded on the base model like any other adapter. A module only one
  of them adapts gets zeros in the other's rows. This is peft's `cat` combination of
  `add_weighted_adapter`, done on the saved tensors so that no second copy of the base
  model is loaded.
- LoRA after a full-weight job: the adapter applies to the previous job's weights (its
  `model` artifact), which the chain names; `adapter.merge` writes weights that stand
  alone.
- Full weights: the model directory stands alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.errors import DataError, ModelError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# The tensors of a saved LoRA adapter: a linear layer's lora_A.weight [r, in] and
# lora_B.weight [out, r]; an embedding's lora_embedding_A [r, vocab] and
# lora_embedding_B [dim, r].
_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_|lora_embedding_)[AB](?P<suffix>\.weight|)$"
)

# adapter_config.json fields a concatenation cannot carry over: per-module ranks and
# scales (by pattern), weight-decomposed LoRA and fully trained extra modules. Jobs of
# this service write none of them.
_UNSUPPORTED = {
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "use_dora": "DoRA (use_dora)",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
}


@dataclass(frozen=True)
class StartPoint:
    """Where a job starts: a previous output's adapter (merged into the base in memory,
    concatenated with the new adapter when it is saved) or its full weights."""

    directory: Path
    kind: str  # "adapter" | "model"

    @property
    def path(self) -> Path:
        return self.directory / self.kind


def start_point(directory: str | Path) -> StartPoint:
    """The previous output in `directory` (its adapter where it has one, as a LoRA job with
    adapter.merge has both); DataError naming init_from_job when it holds neither."""
    directory = Path(directory)
    if (directory / "adapter" / ADAPTER_CONFIG).is_file():
        return StartPoint(directory, "adapter")
    if (directory / "model" / "config.json").is_file():
        return StartPoint(directory, "model")
    raise DataError(
        f"init_from_job: {directory} holds no job output: neither adapter/{ADAPTER_CONFIG} "
        "(a LoRA job) nor model/config.json (a full-weight job)",
        param="init_from_job",
    )


def merge_start(model: Any, start: StartPoint) -> Any:
    """The base model with the previous job's adapter merged into its weights (in place;
    the returned module is the base model, no longer wrapped)."""
    from peft import PeftModel

    adapter_config(start.path)  # refuses what a later concatenation could not carry
    try:
        merged = PeftModel.from_pretrained(model, start.path).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as exc:  # shapes or module names of another model
        raise ModelError(
            f"init_from_job: the previous job's adapter does not fit this base model "
            f"({type(exc).__name__}: {str(exc)[:500]}); start from a job on the same base model"
        ) from None
    return merged


def check_same_architecture(base_dir: str | Path, start: StartPoint) -> None:
    """A previous full-weight output must be the base model's architecture (ModelError
    otherwise): its weights replace the base model's."""
    base = json.loads((Path(base_dir) / "config.json").read_text())
    previous = json.loads((start.path / "config.json").read_text())
    for field in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers"):
        if base.get(field) != previous.get(field):
            raise ModelError(
                f"init_from_job: the previous job's model has {field}={previous.get(field)!r}, "
                f"the base model {base.get(field)!r}; start from a job on the same base model"
            )


def adapter_config(directory: Path) -> dict[str, Any]:
    """The adapter's config; ModelError for what `stack_adapters` cannot combine."""
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ModelError(f"init_from_job: a {config.get('peft_type')} adapter; only LoRA stacks")
    for field, what in _UNSUPPORTED.items():
        if config.get(field):
            raise ModelError(f"init_from_job: the previous adapter uses {what}, which cannot stack")
    return config


def _scale(config: dict[str, Any]) -> float:
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / r**0.5 if config.get("use_rslora") else alpha / r


def stack_adapters(first: Path, second: Path, out: Path) -> dict[str, Any]:
    """Write to `out` one adapter whose update is the sum of `first`'s and `second`'s
    (`second` trained on the base model with `first` merged in): see the module
    docstring. Returns its config."""
    from safetensors.torch import load_file, save_file

    configs = [adapter_config(first), adapter_config(second)]
    tensors = [load_file(str(first / ADAPTER_WEIGHTS)), load_file(str(second / ADAPTER_WEIGHTS))]
    ranks = [c["r"] for c in configs]
    scales = [_scale(c) for c in configs]
    rank = sum(ranks)
    pairs: dict[tuple[str, str], str] = {}  # (A key, B key) -> the module, for an error
    for part in tensors:
        for key in part:
            match = _LORA_KEY.match(key)
            if match is None:
                raise ModelError(
                    f"init_from_job: the adapters hold a tensor other than LoRA's A and B "
                    f"({key}), which cannot stack"
                )
            module, kind, suffix = match.group("module", "kind", "suffix")
            pairs[(f"{module}.{kind}A{suffix}", f"{module}.{kind}B{suffix}")] = module
    combined: dict[str, torch.Tensor] = {}
    for a_key, b_key in sorted(pairs):
        a_like, b_like = next((t[a_key], t[b_key]) for t in tensors if a_key in t)
        a_parts, b_parts = [], []
        for part, r, scale in zip(tensors, ranks, scales, strict=True):
            if a_key in part:
                a_parts.append(part[a_key] * scale)
                b_parts.append(part[b_key])
            else:  # this adapter leaves the module alone: zero rows and columns
                a_parts.append(a_like.new_zeros((r, a_like.shape[1])))
                b_parts.append(b_like.new_zeros((b_like.shape[0], r)))
        combined[a_key] = torch.cat(a_parts, dim=0).contiguous()
        combined[b_key] = torch.cat(b_parts, dim=1).contiguous()
    config = dict(configs[1])
    targets = [c["target_modules"] for c in configs]
    config.update(
        r=rank,
        lora_alpha=rank,  # each scale is folded into its A: scale alpha / r = 1
        use_rslora=False,
        target_modules=_union(targets),
    )
    out.mkdir(parents=True, exist_ok=True)  # `out` may be `second`: written aside, then moved
    weights, written = out / f".{ADAPTER_WEIGHTS}.tmp", out / f".{ADAPTER_CONFIG}.tmp"
    save_file(combined, str(weights), metadata={"format": "pt"})
    written.write_text(json.dumps(config, indent=2, sort_keys=True))
    os.replace(weights, out / ADAPTER_WEIGHTS)
    os.replace(written, out / ADAPTER_CONFIG)
    return config


def _union(targets: list[Any]) -> Any:
    """The target_modules of a stack: 'all-linear' where both were, else the named modules
    of both ('all-linear' spelled as the modules the adapter holds is not needed: peft
    matches the saved tensors by name, the names are a record)."""
    if all(t == "all-linear" for t in targets):
        return "all-linear"
    names: set[str] = set()
    for target in targets:
        if isinstance(target, str):
            names.add(target)
        else:
            names.update(target)
    return sorted(names)


def start_digest(start: StartPoint) -> str:
    """sha256 over the previous output's files (names and contents), for the checkpoint
    fingerprint: a resume must start from the same weights."""
    digest = hashlib.sha256()
    for path in sorted(p for p in start.path.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(start.path)).encode() + b"\0")
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def chain_of(start: StartPoint) -> list[dict[str, Any]]:
    """The chain recorded by a local previous output (`unlearn run`): its own chain, then
    itself, named by its directory. The service passes the chain by job id instead."""
    metrics_path = start.directory / "metrics.json"
    previous: dict[str, Any] = {}
    if metrics_path.is_file():
        try:
            previous = json.loads(metrics_path.read_text())
        except (OSError, ValueError):
            previous = {}
    recorded = previous.get("chain")
    earlier: list[dict[str, Any]] = recorded if isinstance(recorded, list) else []
    return [
        *earlier,
        {"job": str(start.directory), "method": previous.get("method"), "output": start.kind},
    ]
