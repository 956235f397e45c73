"""Which class of worker can run a job: the operator names the classes and their device
memory (WORKER_CLASSES, e.g. {"l4": 24, "h100": 80}), each served by workers started
with `unlearn worker --class NAME` on a queue of its own; a job goes to the smallest
class its estimated memory fits, and one that fits none is refused at submission. A
class's workers have one GPU each unless WORKER_CLASS_GPUS says more; a job sharded over
N GPUs (resources.gpus) goes to a class with at least N, needing an N-th of its memory on
each (FSDP splits weights, gradients and optimizer state; activations are not split, which
the headroom covers for the usual batch).

The estimate: bf16 weights (2 bytes per parameter) for a LoRA job, NF4 ones (about
0.55) for QLoRA; for full weights,
16 bytes per trained parameter (bf16 weights and gradients, fp32 master copy, Adam's
two fp32 moments); a quarter more for activations and the framework. An operator who
knows better registers the model with `--needs-gb`."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from core.errors import SpecError

GB = 1e9
HEADROOM = 1.25


def parameter_count(directory: Path) -> int | None:
    """Parameters of a model directory, from its safetensors headers (no weights read);
    None where there are none to read."""
    total, found = 0, False
    for path in sorted(directory.glob("*.safetensors")):
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, tensor in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for size in tensor["shape"]:
                count *= size
            total += count
        found = True
    return total if found else None


def job_gigabytes(parameters: int, adapter_type: str, *, quantized: bool = False) -> float:
    per_parameter = (0.55 if quantized else 2.0) if adapter_type == "lora" else 16.0
    return parameters * per_parameter * HEADROOM / GB


def route(
    classes: dict[str, float],
    *,
    parameters: int | None,
    needs_gb: float | None,
    adapter_type: str,
    model: str,
    quantized: bool = False,
    gpus: int = 1,
    class_gpus: dict[str, int] | None = None,
) -> str:
    """The smallest class with room for the job (the largest where nothing is known of
    the model); SpecError, naming what it needs and what there is, where none has.
    A job sharded over `gpus` devices (resources.gpus) needs a class whose workers have
    that many (`class_gpus`, 1 where not named), and a `gpus`-th of its memory on each."""
    per_worker = class_gpus or {}
    ordered = sorted(classes.items(), key=lambda item: (item[1], item[0]))
    enough = [(name, memory) for name, memory in ordered if per_worker.get(name, 1) >= gpus]
    if not enough:
        most = max(per_worker.get(name, 1) for name in classes)
        raise SpecError(
            f"resources.gpus {gpus}: no worker class here has that many GPUs (at most {most}); "
            "lower resources.gpus",
            param="resources.gpus",
            code="no_worker_class",
        )
    if needs_gb is None and parameters is None:
        return enough[-1][0]
    needed = (
        needs_gb
        if needs_gb is not None
        else job_gigabytes(parameters or 0, adapter_type, quantized=quantized)
    )
    for name, memory in enough:
        if needed / gpus <= memory:
            return name
    largest, memory = enough[-1]
    hint = " (a LoRA adapter needs about an eighth of that)" if adapter_type != "lora" else ""
    shared = f", {needed / gpus:.3g} GB on each of {gpus} GPUs" if gpus > 1 else ""
    raise SpecError(
        f"a {adapter_type} job on {model!r} needs about {needed:.3g} GB of device memory"
        f"{shared}{hint}; the largest worker class here, {largest!r}, has {memory:g} GB",
        param="adapter.type",
        code="no_worker_class",
    )
