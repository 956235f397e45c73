"""Model loading, LoRA / full-weight wrapping, the reference model, and saving outputs.

Any local Hugging Face causal-LM directory loads the same way the demo model does.
CUDA with bf16 where present, CPU fp32 otherwise. A reference model exists only when
a method needs one: for LoRA it is the same model with its adapter disabled (no copy);
for full-weight unlearning of chosen layers, the same model with frozen copies of those
layers swapped in; for full-weight unlearning of every layer, a frozen copy of the model.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.engine.spec.parts import AdapterSpec
from core.errors import DeviceError, ModelError, SpecError

log = logging.getLogger(__name__)


def reset_peak_memory(device: torch.device) -> None:
    """Start counting the device's peak memory from here (one job's peak, not the process's)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, int | None]:
    """The device's peak allocated bytes since reset_peak_memory (None off CUDA) and this
    process's peak resident set (the host's memory, whatever the device)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "device_bytes": (
            int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
        ),
        "host_bytes": int(rss) * (1 if sys.platform == "darwin" else 1024),
    }


def pick_device(requested: str | None = None) -> torch.device:
    """The requested device (DeviceError if it is no device or not on this machine), or
    CUDA where present, else the CPU."""
    if not requested:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise DeviceError(
            f"device {requested!r} is not a device; use cpu, cuda or cuda:N", param="device"
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise DeviceError(
                f"device {requested!r} was asked for, but this machine has "
                f"{count} CUDA device(s) usable by torch {torch.__version__}",
                param="device",
            )
    return device


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def check_quantization(quantize: str | None, device: torch.device) -> None:
    """QLoRA needs CUDA and bitsandbytes: a DeviceError naming what is missing, before
    anything is loaded."""
    if quantize is None:
        return
    import importlib.util

    missing = []
    if device.type != "cuda":
        missing.append(f"a CUDA device (this worker runs on {device.type})")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the bitsandbytes package")
    if missing:
        raise DeviceError(
            f"adapter.quantize {quantize!r} (QLoRA) needs "
            + " and ".join(missing)
            + "; run it on a CUDA worker with bitsandbytes, or drop adapter.quantize",
            param="adapter.quantize",
            code="qlora_unavailable",
        )


def load_base(
    path: str | Path,
    device: torch.device,
    dtype: torch.dtype | None = None,
    *,
    quantize: str | None = None,
) -> tuple[Any, Any]:
    """(model, tokenizer) from a local Hugging Face directory; ModelError if it cannot load.
    `quantize="nf4"`: the weights in 4-bit NF4 on the CUDA device (QLoRA's base)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is not a Hugging Face model directory (no config.json)")
    check_quantization(quantize, device)
    extra: dict[str, Any] = {}
    if quantize == "nf4":
        from transformers import BitsAndBytesConfig

        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        extra["device_map"] = {"": device.index or 0}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model: Any = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype or default_dtype(device), **extra
        )
    except Exception as exc:  # a bad config can raise anything; out-of-memory is not a model error
        if "OutOfMemory" in type(exc).__name__:
            raise
        raise ModelError(
            f"cannot load the model at {path}: {type(exc).__name__}: {exc}"[:2000]
        ) from exc
    if tokenizer.pad_token_id is None:  # padding is masked out: any existing token will do
        fallback = tokenizer.eos_token or tokenizer.unk_token or tokenizer.bos_token
        if fallback is None:
            raise ModelError(
                f"the tokenizer at {path} has no pad, EOS, UNK or BOS token to pad "
                "batches with; set pad_token in its tokenizer_config.json"
            )
        tokenizer.pad_token = fallback
    if quantize is None:  # a quantized model is placed by its device_map
        model.to(device)
    return model, tokenizer


def context_length(model: Any) -> int | None:
    """The positions the model was built for (`max_position_embeddings`; GPT-2's
    `n_positions`), or None where its config sets no limit (ALiBi models such as BLOOM).
    Past it, models with learned position tables (GPT-2, OPT, GPT-J) fail with an index
    error, on a GPU a device-side assert that spoils the worker's CUDA context."""
    value = getattr(model.config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def fit_max_length(model: Any, max_length: int) -> tuple[int, str | None]:
    """(the sequence length to train with, a warning or None): max_length, cut to the
    model's context where it is longer."""
    limit = context_length(model)
    if limit is None or max_length <= limit:
        return max_length, None
    return limit, (
        f"hyperparameters.max_length {max_length} is longer than the model's context of "
        f"{limit} positions (max_position_embeddings in its config.json): "
        f"sequences are cut at {limit} tokens"
    )


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The model's stack of decoder layers, found by structure, not by name: the
    ModuleList as long as `config.num_hidden_layers` (Llama's `model.layers`, GPT-2's and
    Falcon's `transformer.h`, OPT's `model.decoder.layers`, ...). Where several are that
    long, the one made of the classes the model names as its layers (`_no_split_modules`).
    SpecError when there is none: `adapter.layers` cannot apply to such a model."""
    n_layers = model.config.num_hidden_layers
    stacks = [
        m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers
    ]
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    named = [m for m in stacks if all(type(child).__name__ in layer_classes for child in m)]
    if named or stacks:
        return (named or stacks)[0]
    raise SpecError(
        f"adapter.layers: cannot find the {n_layers} decoder layers of "
        f"{type(model).__name__}; train every layer (layers: null) or use LoRA",
        param="adapter.layers",
    )


@dataclass
class Wrapped:
    """The model being unlearned and how to reach its reference."""

    model: Any  # PeftModel or PreTrainedModel
    adapter: AdapterSpec
    reference: Any | None = None  # full weights, every layer: a frozen copy of the model
    # full weights, chosen layers: frozen copies of those decoder layers alone (by index),
    # and the model's stack they are swapped into (found once, not on every reference pass)
    reference_layers: dict[int, torch.nn.Module] | None = None
    layer_stack: torch.nn.ModuleList | None = None
    # a method's setup on this model and what it returned (core.engine.steps.prepare)
    prepared: tuple[Any, Any] | None = None

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    @contextlib.contextmanager
    def reference_mode(self) -> Iterator[Any]:
        """Yields a module that computes the reference model's logits (no grad): LoRA, the
        model with its adapter disabled; full weights of chosen layers, the model with the
        frozen copies of those layers swapped in (everything else never trains); full
        weights, a frozen copy of the model."""
        with torch.no_grad():
            if self.adapter.type == "lora":
                # eval mode, as the frozen copy of a full-weight reference is: dropout in
                # the base model (GPT-2, OPT) would make the reference a different draw
                # on every pass
                # peft marks the whole adapter trainable again when it re-enables it:
                # what trains is put back as it was (RMU trains a few of its weights)
                was_training = self.model.training
                flags = [(p, p.requires_grad) for p in self.model.parameters()]
                try:
                    with self.model.disable_adapter():
                        self.model.eval()
                        yield self.model
                finally:
                    self.model.train(was_training)
                    for param, flag in flags:
                        param.requires_grad_(flag)
            elif self.reference_layers is not None:
                with self._initial_layers_in():
                    yield self.model
            else:
                if self.reference is None:
                    raise RuntimeError("no reference model was prepared")
                yield self.reference

    @contextlib.contextmanager
    def _initial_layers_in(self) -> Iterator[None]:
        assert self.reference_layers is not None and self.layer_stack is not None
        stack = self.layer_stack
        live = {index: stack[index] for index in self.reference_layers}
        was_training = self.model.training
        try:
            for index, frozen in self.reference_layers.items():
                stack[index] = frozen
            self.model.eval()  # as the frozen copy of a whole model is
            yield
        finally:
            for index, layer in live.items():
                stack[index] = layer
            self.model.train(was_training)


def wrap(model: Any, adapter: AdapterSpec, *, need_reference: bool, seed: int = 0) -> Wrapped:
    """Make the trainable part: a LoRA adapter, or (some of) the full weights.
    `seed` fixes the LoRA initialisation, so a job is reproducible from its spec."""
    if adapter.type == "lora":
        torch.manual_seed(seed)
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=adapter.r,
            lora_alpha=adapter.alpha,  # type: ignore[arg-type]  # peft scales by alpha / r; a float works
            lora_dropout=adapter.dropout,
            target_modules=adapter.target_modules,
            task_type="CAUSAL_LM",
        )
        if adapter.quantize is not None:
            from peft import prepare_model_for_kbit_training

            # norms and the output layer in fp32, inputs that carry gradients: QLoRA's setup
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        try:
            peft_model = get_peft_model(model, config)
        except ValueError as exc:
            raise SpecError(f"adapter: {exc}", param="adapter.target_modules") from exc
        return Wrapped(peft_model, adapter)

    if adapter.layers is None:
        reference = copy.deepcopy(model).eval().requires_grad_(False) if need_reference else None
        return Wrapped(model.requires_grad_(True), adapter, reference)
    n_layers = model.config.num_hidden_layers
    bad = [i for i in adapter.layers if i >= n_layers]
    if bad:
        raise SpecError(
            f"adapter.layers {bad} out of range: the model has {n_layers} layers",
            param="adapter.layers",
        )
    stack = decoder_layers(model)
    chosen = sorted(set(adapter.layers))
    # The reference differs from the model only in the layers that train: copies of those
    # (on WMDP-style jobs a few of many layers), not of the whole model.
    reference_layers = (
        {index: copy.deepcopy(stack[index]).eval().requires_grad_(False) for index in chosen}
        if need_reference
        else None
    )
    model.requires_grad_(False)
    for index in chosen:
        stack[index].requires_grad_(True)
    return Wrapped(model, adapter, reference_layers=reference_layers, layer_stack=stack)


def save_output(
    wrapped: Wrapped, tokenizer: Any, out_dir: Path, base_name: str | None = None
) -> dict[str, Path]:
    """Write the unlearned model. Returns {artifact name: directory}.

    lora -> `adapter/` (adapter_config.json + adapter_model.safetensors), and `model/`
    (merged weights + tokenizer) when adapter.merge; full -> `model/`. `base_name` is
    the base model as the adapter's readers know it (the service: its registered name),
    written as the adapter's `base_model_name_or_path` and in its model card in place
    of the directory it was loaded from.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    model = wrapped.model
    if wrapped.adapter.type == "lora":
        if base_name is not None:  # peft's model card reads the base model's own names
            base = model.get_base_model()
            base.config.name_or_path = base.name_or_path = base_name
            for config in model.peft_config.values():
                config.base_model_name_or_path = base_name
        adapter_dir = out_dir / "adapter"
        # our adapters never train the embeddings: no check against the base model's
        # config, which peft would look up by base_model_name_or_path (a name, here)
        model.save_pretrained(adapter_dir, save_embedding_layers=False)
        tokenizer.save_pretrained(adapter_dir)
        written["adapter"] = adapter_dir
        if wrapped.adapter.merge:
            merged = copy.deepcopy(model).merge_and_unload()
            model_dir = out_dir / "model"
            merged.save_pretrained(model_dir)
            tokenizer.save_pretrained(model_dir)
            written["model"] = model_dir
    else:
        model_dir = out_dir / "model"
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        written["model"] = model_dir
    return written
