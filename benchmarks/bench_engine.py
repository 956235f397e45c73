"""Engine benchmarks, side by side in one run (figures go in the README).

1. CATNIP loss forward+backward vs F.cross_entropy on the same fp32 logits
   [2, 256, 32000] (--loss-shape) with near-certain targets (memorised text), on each
   loss backend: time ratio and extra peak memory ratio (CUDA: max_memory_allocated;
   CPU: peak RSS growth of a fresh process).
   The same for the retain KL term of the +kl methods, against a reference's logits, and
   for CATNIP with the first half of each sequence masked (QA prompts) vs cross-entropy
   with the same mask.
   With --neighbour (CPU): the same losses while another process keeps one core busy,
   in rounds that alternate a quiet pass and a busy pass, with the eager losses on
   their own thread count (the default, `set_cpu_threads`) and on the process's.
2. Step time of CATNIP vs NPO (which needs a live reference forward) on the same model,
   and CATNIP's step time and peak memory with gradient checkpointing vs without, in
   interleaved rounds (--step-rounds); each ratio is the median of the rounds' ratios.

    python benchmarks/bench_engine.py [--device cuda] [--dtype bf16] [--losses-only]
                                      [--step-model small|1b] [--loss-shape 8,2048,32000]
    python benchmarks/bench_engine.py --neighbour python|torch
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core.engine.losses import (
    catnip_loss,
    get_cpu_threads,
    kl_retain_loss,
    set_backend,
    set_cpu_threads,
)

SHAPE = (2, 256, 32000)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def make_inputs(device: str, dtype: torch.dtype, shape: tuple[int, ...] = SHAPE):
    """(logits with grad, labels, reference logits): near-certain targets; the reference
    (for the retain KL) is the logits plus noise, without grad."""
    torch.manual_seed(0)
    logits = torch.randn(*shape, device=device, dtype=torch.float32)
    labels = torch.randint(0, shape[-1], shape[:-1], device=device)
    logits.scatter_(-1, labels[..., None], 30.0)  # near-certain targets: z ~ 1 - 1e-9
    ref = logits + torch.randn_like(logits)
    return logits.to(dtype).requires_grad_(True), labels, ref.to(dtype)


# loss -> its yardstick (cross-entropy on the same counted positions). "catnip" runs on the
# default backend (auto: the Triton kernels on CUDA, eager on the CPU), catnip_eager and
# catnip_compiled on those (catnip_eager is listed on CUDA only, where it differs from
# catnip). kl_retain is the retain term of the +kl methods (full-vocabulary KL to the
# reference) on the default backend, kl_retain_eager on eager (CUDA only, as catnip_eager).
# The *_prompt_masked pair counts only the second half of each sequence, as in a QA forget
# set whose prompts do not count.
YARDSTICK = {
    "catnip": "cross_entropy",
    "catnip_eager": "cross_entropy",
    "catnip_compiled": "cross_entropy",
    "kl_retain": "cross_entropy",
    "kl_retain_eager": "cross_entropy",
    "catnip_prompt_masked": "cross_entropy_prompt_masked",
}
LOSSES = (
    "cross_entropy",
    "catnip",
    "catnip_eager",
    "catnip_compiled",
    "kl_retain",
    "kl_retain_eager",
    "cross_entropy_prompt_masked",
    "catnip_prompt_masked",
)
# each loss's backend (set before every call, so none runs on the one the last left); the rest: auto
BACKEND_OF = {"catnip_eager": "eager", "catnip_compiled": "compiled", "kl_retain_eager": "eager"}
CUDA_ONLY = ("catnip_eager", "kl_retain_eager")


def losses_on(device: str) -> tuple[str, ...]:
    return LOSSES if device.startswith("cuda") else tuple(n for n in LOSSES if n not in CUDA_ONLY)


def run_loss(name: str, logits, labels, ref):
    if name.endswith("_prompt_masked"):
        labels = labels.clone()
        labels[:, : labels.shape[1] // 2] = -100
    set_backend(BACKEND_OF.get(name, "auto"))
    if name.startswith("cross_entropy"):
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    elif name.startswith("kl_retain"):
        loss = kl_retain_loss(logits, ref, labels)
    else:
        loss = catnip_loss(logits, labels, beta=1.0)
    loss.backward()
    logits.grad = None


# --- a busy neighbour ------------------------------------------------------------

# The eager losses on the process's threads (what they did before they got their own),
# against the default; both beside cross-entropy.
NEIGHBOUR_LOSSES = (
    "cross_entropy",
    "catnip",
    "catnip_process_threads",
    "kl_retain",
    "kl_retain_process_threads",
)


def _spin(kind: str, busy, spinning, resting, stop) -> None:
    """The neighbour, while `busy` is set: pure Python arithmetic on one core ("python",
    as an API process serving requests), or torch matrix products on all the cores
    ("torch", as a second job or a test runner). It says which it is doing through
    `spinning` and `resting`, so the timer starts and stops on its state, not on a guess."""
    x = 0.0
    a = b = None
    if kind == "torch":
        a, b = torch.randn(384, 384), torch.randn(384, 384)
    while not stop.is_set():
        if not busy.wait(0.01):
            spinning.clear()
            resting.set()
            continue
        resting.clear()
        spinning.set()
        if a is not None and b is not None:
            for _ in range(20):
                torch.mm(a, b)
        else:
            for i in range(20_000):
                x = (x + i) * 0.5


def run_neighbour_loss(name: str, default_threads: int | None, *inputs) -> None:
    set_cpu_threads(None if name.endswith("_process_threads") else default_threads)
    run_loss(name.removesuffix("_process_threads"), *inputs)


def neighbour_rounds(
    repeats: int, shape: tuple[int, ...], kind: str
) -> dict[str, dict[str, list[float]]]:
    """{quiet|busy: {loss: seconds per forward+backward}}, on the CPU: each round times
    every loss once with the machine quiet, then once while a neighbour process of
    `kind` (see _spin) is busy."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # no fork of a process that ran torch
    busy, spinning, resting, stop = (context.Event() for _ in range(4))
    neighbour = context.Process(
        target=_spin, args=(kind, busy, spinning, resting, stop), daemon=True
    )
    neighbour.start()
    default_threads = get_cpu_threads()
    inputs = make_inputs("cpu", torch.float32, shape)
    times: dict[str, dict[str, list[float]]] = {
        "quiet": {n: [] for n in NEIGHBOUR_LOSSES},
        "busy": {n: [] for n in NEIGHBOUR_LOSSES},
    }
    try:
        for name in NEIGHBOUR_LOSSES:
            for _ in range(3):
                run_neighbour_loss(name, default_threads, *inputs)
        for _ in range(repeats):
            for state in ("quiet", "busy"):
                if state == "busy":
                    busy.set()
                    if not spinning.wait(60):  # busy before the clock starts
                        raise RuntimeError("the neighbour process did not start working")
                for name in NEIGHBOUR_LOSSES:
                    start = time.perf_counter()
                    run_neighbour_loss(name, default_threads, *inputs)
                    times[state][name].append(time.perf_counter() - start)
                busy.clear()
                if not resting.wait(60):  # quiet again before the next quiet pass
                    raise RuntimeError("the neighbour process did not stop working")
    finally:
        set_cpu_threads(default_threads)
        stop.set()
        busy.set()
        neighbour.join(10)
    return times


def neighbour_result(repeats: int, shape: tuple[int, ...], kind: str) -> dict:
    rounds = neighbour_rounds(repeats, shape, kind)
    result: dict = {
        "neighbour": kind,
        "device": "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "loss_cpu_threads": get_cpu_threads(),
        "loss_shape": list(shape),
        "rounds": repeats,
    }
    for state, times in rounds.items():
        for name, seconds in times.items():
            result[f"{state}_{name}_ms"] = round(statistics.median(seconds) * 1e3, 1)
            if name != "cross_entropy":  # the median of the rounds' ratios to cross-entropy
                ratio = statistics.median(
                    t / ce for t, ce in zip(seconds, times["cross_entropy"], strict=True)
                )
                result[f"{state}_{name}_over_cross_entropy"] = round(ratio, 2)
    return result


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_losses(
    device: str, dtype: torch.dtype, repeats: int, shape: tuple[int, ...]
) -> dict[str, list[float]]:
    """Seconds per forward+backward of every loss, measured in interleaved rounds (each
    round runs every loss once), so a slow spell of a shared machine hits all of them
    alike and each round gives a side-by-side ratio."""
    inputs = make_inputs(device, dtype, shape)
    names = losses_on(device)
    for name in names:
        for _ in range(3):
            run_loss(name, *inputs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        for name in names:
            sync(device)
            start = time.perf_counter()
            run_loss(name, *inputs)
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def peak_extra_bytes(name: str, device: str, dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    """Peak memory above the inputs during one forward+backward.

    CUDA: the allocator's peak counter. CPU: a fresh process (nothing else ran in it)
    builds the inputs, then runs the loss once; the growth of its peak RSS is the loss's
    extra peak. Every large CPU tensor here (64 MiB) is above glibc's largest mmap
    threshold (32 MiB), so it is mapped on allocation and unmapped on free, and RSS
    follows the live tensors rather than a heap that keeps freed memory.
    """
    if device.startswith("cuda"):
        inputs = make_inputs(device, dtype, shape)
        run_loss(name, *inputs)  # warm up allocator / kernels
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_loss(name, *inputs)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--cpu-peak-of",
            name,
            "--dtype",
            DTYPE_NAMES[dtype],
            "--loss-shape",
            ",".join(map(str, shape)),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_cpu_peak() -> int:
    """Reset this process's peak RSS to its current RSS (Linux: `5 > clear_refs`) and
    return that RSS in bytes; the growth of VmHWM above it is the peak from here on."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def _cpu_peak_above(base: int) -> int:
    return _status_kib("VmHWM") * 1024 - base


def _cpu_peak_child(name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    """In a fresh process: print the peak-RSS growth (bytes) of one forward+backward.
    A warm-up on small inputs first (compilation, lazy init), then the peak counter is
    reset (Linux: `5 > /proc/self/clear_refs`) once the inputs exist."""
    run_loss(name, *make_inputs("cpu", dtype, (1, 8, 64)))
    inputs = make_inputs("cpu", dtype, shape)
    base = _reset_cpu_peak()
    run_loss(name, *inputs)
    print(_cpu_peak_above(base))


# The step benchmark's random Llamas (vocabulary 32000): "small" (31M parameters, the
# CPU's), "1b" (TinyLlama-1.1B's shapes, for a GPU: the paper's models are 7B).
STEP_MODELS = {
    "small": {
        "hidden_size": 512,
        "intermediate_size": 1376,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
    },
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
    },
}

STEP_CONFIGS = {  # name -> (method id, extra hyperparameters)
    "catnip": ("catnip", {}),
    "npo": ("npo", {}),
    "catnip_checkpointing": ("catnip", {"gradient_checkpointing": True}),
}


def one_step_config(
    name: str, device: str, dtype: torch.dtype, steps: int, model_name: str = "small"
) -> dict[str, float]:
    """Seconds per optimizer step and peak memory above the model (bytes) for one
    configuration on one random Llama of STEP_MODELS (LoRA), batch 4 x 256. The peak counter (CUDA's
    allocator; on CPU the process's peak RSS, reset with /proc/self/clear_refs) is reset
    once the model, its adapter and the examples exist."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from core.engine.data import Example
    from core.engine.events import Events
    from core.engine.modeling import AdapterSpec, wrap
    from core.engine.spec.methods import METHODS, parse_params
    from core.engine.train import run_unlearning

    config = LlamaConfig(vocab_size=32000, **STEP_MODELS[model_name])
    generator = torch.Generator().manual_seed(0)
    examples = [
        Example(ids, ids)
        for ids in torch.randint(0, 32000, (32, 256), generator=generator).tolist()
    ]
    method_id, extra = STEP_CONFIGS[name]
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: a 1B model on the CPU takes minutes
        model = LlamaForCausalLM(config).to(dtype=dtype)
    params = parse_params(
        method_id, {"max_steps": steps + 2, "batch_size": 4, "max_length": 256, **extra}
    )
    wrapped = wrap(model, AdapterSpec(), need_reference=METHODS[method_id].needs_reference(params))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _reset_cpu_peak()

    class StepClock(Events):
        """Records when each optimizer step ended."""

        def __init__(self) -> None:
            self.ends: list[float] = []

        def step(self, info) -> None:
            sync(device)
            self.ends.append(time.perf_counter())

    clock = StepClock()
    run_unlearning(wrapped, METHODS[method_id], params, examples, pad_id=0, events=clock)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _cpu_peak_above(base)
    # the median step after the first two (warm-up: lazy initialisation, allocator growth)
    durations = [b - a for a, b in zip(clock.ends[1:], clock.ends[2:], strict=False)]
    return {"step_s": statistics.median(durations), "peak_bytes": peak}


def step_rounds(
    device: str, dtype: torch.dtype, steps: int, rounds: int, model_name: str
) -> list[dict[str, dict]]:
    """one_step_config for every configuration, in `rounds` interleaved rounds (each round
    runs every configuration once), so a slow spell of a shared machine hits all of them
    alike. On CPU each run is a fresh process, so one configuration's freed memory kept
    by the heap does not hide another's peak."""
    out = []
    for _ in range(rounds):
        results = {}
        for name in STEP_CONFIGS:
            if device.startswith("cuda"):
                results[name] = one_step_config(name, device, dtype, steps, model_name)
                continue
            child = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--step-of",
                    name,
                    "--dtype",
                    DTYPE_NAMES[dtype],
                    "--steps",
                    str(steps),
                    "--step-model",
                    model_name,
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            results[name] = json.loads(child.stdout.strip().splitlines()[-1])
        out.append(results)
    return out


def round_ratio(rounds: list[dict[str, dict]], key: str, top: str, bottom: str) -> float:
    """The median over rounds of that round's top/bottom ratio of `key`."""
    return statistics.median(r[top][key] / r[bottom][key] for r in rounds)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--step-rounds", type=int, default=3)
    parser.add_argument("--losses-only", action="store_true", help="skip the step benchmark")
    parser.add_argument("--loss-shape", default="2,256,32000", help="B,T,V of the loss benchmark")
    parser.add_argument(
        "--step-model",
        default="small",
        choices=list(STEP_MODELS),
        help="the step benchmark's model (1b: for a GPU)",
    )
    parser.add_argument(
        "--neighbour",
        choices=("python", "torch"),
        help="CPU: the losses quiet and beside a busy neighbour process (nothing else): "
        "python = one core of Python, torch = matrix products on every core",
    )
    parser.add_argument("--cpu-peak-of", choices=LOSSES, help=argparse.SUPPRESS)
    parser.add_argument("--step-of", choices=list(STEP_CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    shape = tuple(int(n) for n in args.loss_shape.split(","))
    if args.cpu_peak_of:
        _cpu_peak_child(args.cpu_peak_of, dtype, shape)
        return
    if args.step_of:
        print(json.dumps(one_step_config(args.step_of, "cpu", dtype, args.steps, args.step_model)))
        return
    if args.neighbour:
        print(json.dumps(neighbour_result(args.repeats, shape, args.neighbour), indent=2))
        return
    loss_dtype = torch.float32  # the loss comparison is on fp32 logits, as specified
    rounds = time_losses(args.device, loss_dtype, args.repeats, shape)
    names = losses_on(args.device)
    yardstick = {name: base for name, base in YARDSTICK.items() if name in names}
    times = {name: statistics.median(rounds[name]) for name in names}
    # the ratio is the median over rounds of that round's ratio (both timed back to back)
    ratios = {
        name: statistics.median(t / ce for t, ce in zip(rounds[name], rounds[base], strict=True))
        for name, base in yardstick.items()
    }
    peaks = {name: peak_extra_bytes(name, args.device, loss_dtype, shape) for name in names}
    result = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "loss_shape": list(shape),
        **{f"{name}_ms": round(times[name] * 1e3, 2) for name in names},
        **{f"{name}_time_ratio": round(ratios[name], 3) for name in yardstick},
        **{f"{name}_extra_mib": round(peaks[name] / 2**20, 1) for name in names},
        **{
            f"{name}_memory_ratio": round(peaks[name] / peaks[base], 3)
            for name, base in yardstick.items()
        },
    }
    if not args.losses_only:
        rounds_of_steps = step_rounds(
            args.device, dtype, args.steps, args.step_rounds, args.step_model
        )
        steps = {
            name: {
                key: statistics.median(r[name][key] for r in rounds_of_steps)
                for key in ("step_s", "peak_bytes")
            }
            for name in STEP_CONFIGS
        }
        result.update(
            {
                "step_dtype": args.dtype,
                "step_model": args.step_model,
                **{f"{name}_step_s": round(steps[name]["step_s"], 4) for name in STEP_CONFIGS},
                **{
                    f"{name}_step_peak_mib": round(steps[name]["peak_bytes"] / 2**20, 1)
                    for name in STEP_CONFIGS
                },
                "step_rounds": args.step_rounds,
                "catnip_over_npo_step": round(
                    round_ratio(rounds_of_steps, "step_s", "catnip", "npo"), 3
                ),
                "checkpointing_over_plain_step": round(
                    round_ratio(rounds_of_steps, "step_s", "catnip_checkpointing", "catnip"), 3
                ),
                "checkpointing_over_plain_peak": round(
                    round_ratio(rounds_of_steps, "peak_bytes", "catnip_checkpointing", "catnip"), 3
                ),
            }
        )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
