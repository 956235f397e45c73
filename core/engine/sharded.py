"""One full-weight job over several devices: the unlearning loop under FSDP2.

A job with `resources.gpus: N` (N > 1) trains in N processes that torch's own launcher
(`torch.distributed.run`, torchrun) starts on the worker's host: one per GPU with NCCL,
or N CPU processes with gloo on a host without GPUs (how it is tested). The job's own
process does everything else as for any job (validation, loading, the evaluations, the
audits, the artifacts): before the loop it writes a plan (the examples, the settings,
where the starting weights are), and after it loads the weights rank 0 gathered.

Each rank loads the starting weights, shards every decoder layer and then the rest with
`fully_shard` (parameters, gradients and AdamW state split N ways; on CUDA the shards are
fp32 masters that compute in bf16) and runs core.engine.train.run_unlearning with a
`Shard`: rank r takes micro-batches r, r + N, ... of each step and the gradients are
summed across ranks (FSDP's reduce-scatter, divide factor 1), which is the one-process
step's gradient. Checkpoints are torch.distributed.checkpoint directories: every rank
writes its shard, rank 0 seals the directory with state.json as the one-process format
does, so a killed job resumes (on any number of ranks: DCP reshards on load).

Rank 0 reports steps, checkpoints and resumes as JSON lines in the work directory; the
job's process forwards them to its Events and stops the ranks when the job is cancelled.
The launcher and every rank die with the process that started them (PR_SET_PDEATHSIG),
so a worker killed mid-job leaves no rank behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from core import errors
from core.engine.checkpoint import CHECKPOINTS_KEPT, _checked_state, _checkpoint_dirs
from core.engine.data import Example
from core.engine.events import Events, StepInfo
from core.engine.modeling import Wrapped
from core.engine.spec.methods import Method, TrainingParams
from core.engine.train import LoopResult
from core.errors import DeviceError, JobCancelled

log = logging.getLogger(__name__)

PLAN, EVENTS, TRAINED, RESULT = "plan.pt", "events.jsonl", "trained.pt", "result.json"
POLL_SECONDS = 0.2


# --- the job's side ------------------------------------------------------------------


def check_devices(processes: int, device: torch.device) -> None:
    """DeviceError when a CUDA host has fewer GPUs than the job asks for (a CPU host runs
    that many gloo processes)."""
    if device.type == "cuda" and torch.cuda.device_count() < processes:
        raise DeviceError(
            f"resources.gpus {processes}: this worker has {torch.cuda.device_count()} GPU(s); "
            "route the job to a worker class with enough (WORKER_CLASS_GPUS) or lower it",
            param="resources.gpus",
        )
    if device.type not in ("cuda", "cpu"):
        raise DeviceError(
            f"resources.gpus {processes}: sharded jobs run on CUDA or CPU, not {device.type}",
            param="resources.gpus",
        )


def run_sharded(
    wrapped: Wrapped,
    method: Method,
    params: TrainingParams,
    forget: list[Example],
    *,
    pad_id: int,
    source: Path,
    processes: int,
    device: torch.device,
    work_dir: Path,
    retain: list[Example] | None = None,
    contrast: list[Example] | None = None,
    contrast_paired: bool = True,
    checkpoint_dir: Path | None = None,
    fingerprint: str | None = None,
    events: Events | None = None,
) -> LoopResult:
    """run_unlearning's result, trained by `processes` ranks from the weights at `source`
    (a Hugging Face directory holding what `wrapped.model` holds now); the trained weights
    are loaded into `wrapped.model`. On CUDA the job's own copy of the model waits in host
    memory meanwhile. JobCancelled when events.should_cancel() turns True (the ranks are
    stopped first); a rank's UnlearnError is raised here as it was there."""
    from core.engine import losses

    events = events or Events()
    check_devices(processes, device)
    if params.gradient_accumulation_steps % processes:  # a rank without a micro-batch
        raise ValueError(  # would wait for the others' gradients forever
            f"gradient_accumulation_steps {params.gradient_accumulation_steps} does not split "
            f"between {processes} ranks (the job spec refuses it)"
        )
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    plan = {
        "method": method.id,
        "params": params.model_dump(mode="json"),
        "source": str(source),
        "forget": _plain(forget),
        "retain": _plain(retain),
        "contrast": _plain(contrast),
        "contrast_paired": contrast_paired,
        "pad_id": pad_id,
        "need_reference": wrapped.reference is not None,
        "checkpoint_dir": str(checkpoint_dir) if checkpoint_dir else None,
        "fingerprint": fingerprint,
        "device": device.type,
        "threads": max(1, torch.get_num_threads() // processes),
        "loss_backend": losses.get_backend(),
    }
    torch.save(plan, work_dir / PLAN)
    held = _to_host(wrapped, device)
    try:
        _launch(work_dir, processes, events)
        result = json.loads((work_dir / RESULT).read_text())
        trained = torch.load(work_dir / TRAINED, weights_only=True)
        wrapped.model.load_state_dict(trained)
    finally:
        _back_to(held, device)
    return LoopResult(
        steps_done=result["steps_done"],
        total_steps=result["total_steps"],
        history=[StepInfo(**info) for info in result["history"]],
        stopped_early=result["stopped_early"],
        stop_reason=result["stop_reason"],
        ranks_peak_memory=result["ranks_peak_memory"],
    )


def _plain(examples: list[Example] | None) -> list[tuple[list[int], list[int]]] | None:
    return None if examples is None else [(e.input_ids, e.labels) for e in examples]


def _to_host(wrapped: Wrapped, device: torch.device) -> list[Any]:
    """The job's copies of the model, moved off the GPU while the ranks train on it."""
    held = [m for m in (wrapped.model, wrapped.reference) if m is not None]
    if device.type == "cuda":
        for module in held:
            module.to("cpu")
        torch.cuda.empty_cache()
    return held


def _back_to(held: list[Any], device: torch.device) -> None:
    if device.type == "cuda":
        for module in held:
            module.to(device)


def _launch(work_dir: Path, processes: int, events: Events) -> None:
    """Run the ranks under torchrun, forwarding rank 0's events until they exit."""
    command = [sys.executable, "-m", "core.engine.sharded", "launch", str(processes), str(work_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, torch.get_num_threads() // processes))}
    with (work_dir / "ranks.log").open("wb") as output:
        process = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        forwarded = 0  # bytes of rank 0's event log passed on
        try:
            while process.poll() is None:
                forwarded = _forward(work_dir / EVENTS, forwarded, events)
                if events.should_cancel():
                    _stop(process)
                    raise JobCancelled("cancelled while the sharded ranks trained")
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=POLL_SECONDS)  # returns as soon as the ranks exit
        except BaseException:
            _stop(process)
            raise
        _forward(work_dir / EVENTS, forwarded, events)
    if process.returncode != 0:
        raise _rank_error(work_dir, process.returncode)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the launcher (it stops its ranks), SIGKILL to the group if it lingers."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _forward(path: Path, done: int, events: Events) -> int:
    """Pass on the complete lines of rank 0's event log after its first `done` bytes;
    returns the bytes passed on (a line still being written waits for the next call)."""
    if not path.is_file():
        return done
    with path.open("rb") as handle:
        handle.seek(done)
        new = handle.read()
    complete = new[: new.rfind(b"\n") + 1]
    for line in complete.decode().splitlines():
        event = json.loads(line)
        kind = event.pop("kind")
        if kind == "step":
            events.step(StepInfo(**event))
        elif kind == "checkpoint":
            # the ranks go on while this runs (a worker copies it to the store): rank 0
            # may have pruned it since, for newer ones whose events follow
            try:
                events.checkpoint(Path(event["path"]))
            except FileNotFoundError:
                log.warning("checkpoint %s was pruned before it was passed on", event["path"])
        elif kind == "resumed":
            events.resumed(event["step"])
    return done + len(complete)


def _rank_error(work_dir: Path, returncode: int) -> Exception:
    """The error the first failing rank recorded, as the same UnlearnError where it was
    one; else a RuntimeError with the end of the ranks' log."""
    for path in sorted(work_dir.glob("error-*.json")):
        recorded = json.loads(path.read_text())
        kind = getattr(errors, recorded["type"], None)
        if isinstance(kind, type) and issubclass(kind, errors.UnlearnError):
            return kind(recorded["message"], param=recorded["param"], code=recorded["code"])
        return RuntimeError(
            f"rank {recorded['rank']} failed: {recorded['type']}: {recorded['message']}"
        )
    tail = (work_dir / "ranks.log").read_text(errors="replace")[-2000:]
    return RuntimeError(f"the sharded ranks exited with {returncode}:\n{tail}")


# --- the ranks' side ------------------------------------------------------------------


class Shard:
    """What run_unlearning does differently on rank `rank` of `world`."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def mine(self, indices: list[int]) -> list[int]:
        """This rank's micro-batches of a step's."""
        return indices[self.rank :: self.world]

    def total(self, loss: float, terms: dict[str, float]) -> tuple[float, dict[str, float]]:
        """The step's loss and terms, summed over the ranks' micro-batches."""
        import torch.distributed as dist

        names = sorted(terms)
        values = torch.tensor([loss, *(terms[n] for n in names)], dtype=torch.float64)
        dist.all_reduce(values)
        return float(values[0]), {n: float(v) for n, v in zip(names, values[1:], strict=True)}

    def save(
        self,
        root: Path,
        step: int,
        model: Any,
        optimizer: Any,
        scheduler: Any,
        *,
        fingerprint: str | None,
        stop_reason: str | None = None,
    ) -> Path:
        """step-N/ as torch.distributed.checkpoint writes it (each rank its shard), the
        scheduler and every rank's RNG beside it, sealed by rank 0's state.json."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        final = root / f"step-{step:07d}"
        tmp = root / f".tmp-step-{step:07d}"
        if self.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        dist.barrier()
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
        torch.save(
            {"rng_cpu": torch.get_rng_state(), "rng_cuda": _cuda_rng()},
            tmp / f"rng-{self.rank}.pt",
        )
        dist.barrier()
        if self.rank == 0:
            torch.save({"scheduler": scheduler.state_dict()}, tmp / "scheduler.pt")
            (tmp / "state.json").write_text(
                json.dumps(
                    {
                        "step": step,
                        "stop_reason": stop_reason,
                        "fingerprint": fingerprint,
                        "sharded": self.world,
                    }
                )
            )
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in _checkpoint_dirs(root)[:-CHECKPOINTS_KEPT]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return final

    def load(
        self, path: Path, model: Any, optimizer: Any, scheduler: Any, fingerprint: str | None
    ) -> tuple[int, str | None]:
        """Restore save's checkpoint (written by any number of ranks); its step and stop
        reason. SpecError when it is another run's, or a one-process checkpoint."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        meta = _checked_state(path, fingerprint, sharded=True)
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=path)  # in place
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
        scheduler.load_state_dict(torch.load(path / "scheduler.pt")["scheduler"])
        rng_file = path / f"rng-{self.rank}.pt"
        if rng_file.is_file():  # a rank the saving run did not have keeps its seeded RNG
            rng = torch.load(rng_file)
            torch.set_rng_state(rng["rng_cpu"])
            if rng["rng_cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["rng_cuda"])
        return int(meta["step"]), meta.get("stop_reason")


def _cuda_rng() -> list[torch.Tensor] | None:
    return torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


class _FileEvents(Events):
    """Rank 0's events, one JSON line each, for the job's process to forward."""

    def __init__(self, path: Path):
        self.path = path

    def _write(self, **event: Any) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(event) + "\n")

    def step(self, info: StepInfo) -> None:
        self._write(kind="step", **asdict(info))

    def checkpoint(self, path: Path) -> None:
        self._write(kind="checkpoint", path=str(path))

    def resumed(self, step: int) -> None:
        self._write(kind="resumed", step=step)


def shard_model(model: Any, device: torch.device, *, master_weights: bool) -> None:
    """fully_shard every decoder layer, then the model (embeddings, norm, head: the root
    unit, so tied embeddings stay one parameter). On CUDA with master weights the shards
    stay fp32 and compute in bf16, gradients reduced in fp32."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    from core.engine.modeling import decoder_layers

    policy = MixedPrecisionPolicy()
    if device.type == "cuda" and master_weights:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    for module in model.modules():  # sum, not average: rank r's micro-batches are its own
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain sum (gloo has no other)


def _die_with_parent(sig: int) -> None:
    """This process gets `sig` when the one that started it dies (Linux)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG


def _rank_main(work_dir: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from core.engine import losses
    from core.engine.data import Example
    from core.engine.modeling import AdapterSpec, load_base, peak_memory, wrap
    from core.engine.runtime import quiet_libraries
    from core.engine.spec.methods import get_method, parse_params, prepare
    from core.engine.train import run_unlearning

    _die_with_parent(signal.SIGKILL)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    plan = torch.load(work_dir / PLAN, weights_only=False)
    quiet_libraries()
    torch.set_num_threads(plan["threads"])
    losses.set_backend(plan["loss_backend"])
    if plan["device"] == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    try:
        method = get_method(plan["method"])
        params = parse_params(plan["method"], plan["params"])
        # fp32 shards, the master weights, computing in bf16 on CUDA (shard_model); bf16
        # throughout where the job turned master weights off; fp32 on the CPU
        dtype = torch.bfloat16 if device.type == "cuda" and not params.master_weights else None
        model, _ = load_base(plan["source"], device, dtype or torch.float32)
        wrapped = wrap(model, AdapterSpec(type="full"), need_reference=plan["need_reference"])
        prepare(wrapped, method, params)
        for module in (wrapped.model, wrapped.reference):
            if module is not None:
                shard_model(module, device, master_weights=params.master_weights)

        def examples(key: str) -> list[Example] | None:
            rows = plan[key]
            return None if rows is None else [Example(ids, labels) for ids, labels in rows]

        checkpoint_dir = plan["checkpoint_dir"]
        result = run_unlearning(
            wrapped,
            method,
            params,
            examples("forget") or [],
            pad_id=plan["pad_id"],
            retain=examples("retain"),
            contrast=examples("contrast"),
            contrast_paired=plan["contrast_paired"],
            checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir else None,
            fingerprint=plan["fingerprint"],
            events=_FileEvents(work_dir / EVENTS) if rank == 0 else Events(),
            shard=Shard(rank, world),
        )
        full = get_model_state_dict(
            wrapped.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        peaks: list[Any] = [None] * world
        dist.all_gather_object(peaks, peak_memory(device))
        if rank == 0:
            torch.save(full, work_dir / TRAINED)
            result.ranks_peak_memory = peaks
            (work_dir / RESULT).write_text(json.dumps(asdict(result)))
        dist.barrier()
    except BaseException as exc:
        (work_dir / f"error-{rank}.json").write_text(
            json.dumps(
                {
                    "rank": rank,
                    "type": type(exc).__name__,
                    "message": getattr(exc, "message", str(exc)),
                    "param": getattr(exc, "param", None),
                    "code": getattr(exc, "code", None),
                    "traceback": traceback.format_exc(),
                }
            )
        )
        raise
    finally:
        dist.destroy_process_group()


def _launcher_main(processes: int, work_dir: Path) -> None:
    """torchrun in this process, which dies (SIGTERM: torchrun stops its ranks) with the
    job's process."""
    from torch.distributed.run import main as torchrun

    _die_with_parent(signal.SIGTERM)
    torchrun(
        [
            "--standalone",
            f"--nproc-per-node={processes}",
            "-m",
            "core.engine.sharded",
            "rank",
            str(work_dir),
        ]
    )


if __name__ == "__main__":
    if sys.argv[1] == "launch":
        _launcher_main(int(sys.argv[2]), Path(sys.argv[3]))
    else:
        _rank_main(Path(sys.argv[2]))
