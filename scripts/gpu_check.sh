#!/usr/bin/env bash
# The GPU checks of the engine in one command, on a machine with CUDA, from the
# repository root: the tests marked `gpu`, the engine benchmark with bf16 models (the small
# one and a 1.1B Llama for the step times; the loss alone on [8, 2048, 32000] logits too),
# and the bf16 full-weight precision benchmark (fp32 master weights vs none) on CUDA.
# Logs go to the folder given (default ./gpu-check). Exits non-zero if either fails.
#
# It needs only the engine's packages in the python3 it finds (torch with CUDA,
# transformers, peft, safetensors, tokenizers, pyyaml, pydantic, typer, rouge-score and
# triton); the service's (FastAPI, SQLAlchemy, Celery, ...) are not imported.
#
#     bash scripts/gpu_check.sh [OUT_DIR]
set -uo pipefail
out=${1:-gpu-check}
mkdir -p "$out"
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

"$python" - <<'EOF' 2>&1 | tee "$out/device.txt"
import torch, transformers, peft
assert torch.cuda.is_available(), "no CUDA device: these checks need one"
print("device", torch.cuda.get_device_name(), "| torch", torch.__version__,
      "| transformers", transformers.__version__, "| peft", peft.__version__)
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 1

"$python" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/pytest-gpu.log"
tests=${PIPESTATUS[0]}
# the benchmarks' JSON on stdout goes to its file; their warnings to stderr.log
"$python" benchmarks/bench_engine.py --device cuda --dtype bf16 2>>"$out/stderr.log" \
    | tee "$out/bench-cuda-bf16.json"
bench=${PIPESTATUS[0]}
"$python" benchmarks/bench_engine.py --device cuda --dtype bf16 --step-model 1b 2>>"$out/stderr.log" \
    | tee "$out/bench-cuda-bf16-1b.json"
bench_1b=${PIPESTATUS[0]}
"$python" benchmarks/bench_engine.py --device cuda --losses-only --loss-shape 8,2048,32000 2>>"$out/stderr.log" \
    | tee "$out/bench-cuda-loss-8x2048.json"
bench_large=${PIPESTATUS[0]}
"$python" benchmarks/bench_precision.py --device cuda 2>&1 | tee "$out/bench-precision-cuda.md"
precision=${PIPESTATUS[0]}
echo "pytest -m gpu: exit $tests; bench_engine: exit $bench (1b: $bench_1b, 8x2048: $bench_large);" \
     "bench_precision: exit $precision" \
    | tee "$out/summary.txt"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ] && [ "$bench_1b" -eq 0 ] && [ "$bench_large" -eq 0 ] \
    && [ "$precision" -eq 0 ]
